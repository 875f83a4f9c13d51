"""The single definition of a MoA head's span for a request (see README, "Span semantics").

N (the request length) = prompt tokens + the request's max_tokens, capped by max_model_len. It is fixed when the
request is admitted, so a request's cache size never changes while it decodes.
span = clamp(round_half_up(alpha + beta * N), min_span, N): N wins over min_span for short requests.
The first `sinks` positions are kept for every head and count inside the span; the rest of the span is the recent
window. A query at position q sees key k iff k <= q and (k < sinks or q - k < window).
"""

from __future__ import annotations

import math


def request_length(prompt_tokens: int, max_tokens: int | None, max_model_len: int) -> int:
    """N of one request. A missing max_tokens means "up to max_model_len", as in vLLM."""
    if max_tokens is None:
        return max_model_len
    return min(prompt_tokens + max_tokens, max_model_len)


def span_tokens(alpha: float, beta: float, n: int, min_span: int) -> int:
    """Tokens one head keeps (sinks included) for a request of length n."""
    raw = math.floor(alpha + beta * n + 0.5)  # round half up: deterministic across Python/torch
    return min(max(raw, min_span), n)


def window_tokens(span: int, sinks: int) -> int:
    """Recent-window part of a span. Zero when the span is all sinks (then every position < sinks is visible)."""
    return max(span - sinks, 0)


def visible(q: int, k: int, sinks: int, window: int) -> bool:
    """Scalar form of the attention mask, for tests and documentation; kernels vectorise the same rule."""
    return k <= q and (k < sinks or q - k < window)
