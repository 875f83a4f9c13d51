"""The single definition of a MoA head's span for a request (see README, "Span semantics").

N (the request length) = prompt tokens + the request's max_tokens, capped by max_model_len. It is fixed when the
request is admitted, so a request's cache size never changes while it decodes. With prefix caching on, N is rounded
up to the span grid (`span_length`) so that requests of nearby lengths get equal spans and can share cached prefixes.
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


GRID_MULTIPLE = 16  # grid points are multiples of this many tokens (vLLM's default block size)


def grid_point(k: int, steps_per_octave: int) -> int:
    """The k-th span grid point: 2^(k / steps) rounded up to a multiple of GRID_MULTIPLE (non-decreasing in k)."""
    raw = math.ceil(2.0 ** (k / steps_per_octave) - 1e-9)
    return -(-raw // GRID_MULTIPLE) * GRID_MULTIPLE


def span_length(n: int, max_model_len: int, steps_per_octave: int) -> int:
    """The N spans are computed from: n itself when steps_per_octave is 0, else the smallest grid point >= n, capped
    by max_model_len. Grid points are `steps_per_octave` per doubling, so spans grow by at most 2^(1/steps) - 1 over
    exact N (9% at 8 steps, plus the rounding to 16 tokens) and two requests whose N fall in one grid step have
    identical spans."""
    if steps_per_octave <= 0 or n >= max_model_len:
        return min(n, max_model_len)
    k = max(0, math.floor(steps_per_octave * math.log2(max(n, 1))) - 1)
    while grid_point(k, steps_per_octave) < n:
        k += 1
    return min(grid_point(k, steps_per_octave), max_model_len)


def served_length(prompt_tokens: int, max_tokens: int | None, max_model_len: int, steps_per_octave: int) -> int:
    """N as the plugin sizes a request: request_length rounded up to the span grid."""
    return span_length(request_length(prompt_tokens, max_tokens, max_model_len), max_model_len, steps_per_octave)


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
