"""The single definition of a MoA head's span for a request (see README, "Span semantics").

N (the request length) = prompt tokens + the request's max_tokens, capped by max_model_len. It is fixed when the
request is admitted, so a request's cache size never changes while it decodes. Spans are taken at the request's span
length L (`span_length`): N, raised to a client's `moa_span_length` and the server's `span_length` floor where given,
then rounded up to the span grid so that requests of nearby lengths get equal spans and can share cached prefixes.
span = clamp(round_half_up(alpha + beta * L), min_span, N): never below the plan's span at N (L >= N and beta >= 0),
never above N (a request never holds more than N tokens, and a span >= N already sees every key).
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


def span_length(
    n: int, max_model_len: int, steps_per_octave: int, hint: int | None = None, floor: int = 0
) -> int:
    """L, the length spans are computed at: max(n, hint, floor) (hint: the client's `moa_span_length`, floor: the
    server's `span_length`), then n itself when steps_per_octave is 0, else the smallest grid point >= it; capped by
    max_model_len. Grid points are `steps_per_octave` per doubling, so two requests whose lengths fall in one grid
    step have identical spans (at 1 step per octave: every request of N in (2^k, 2^(k+1)]); a conversation whose
    turns share one hint or floor >= their N keeps one L for all of them."""
    n = max(n, hint or 0, floor)
    if steps_per_octave <= 0 or n >= max_model_len:
        return min(n, max_model_len)
    k = max(0, math.floor(steps_per_octave * math.log2(max(n, 1))) - 1)
    while grid_point(k, steps_per_octave) < n:
        k += 1
    return min(grid_point(k, steps_per_octave), max_model_len)


def served_length(
    prompt_tokens: int,
    max_tokens: int | None,
    max_model_len: int,
    steps_per_octave: int,
    hint: int | None = None,
    floor: int = 0,
) -> tuple[int, int]:
    """(L, N) as the plugin sizes a request: its span length and its own length (the cap of every span)."""
    n = request_length(prompt_tokens, max_tokens, max_model_len)
    return span_length(n, max_model_len, steps_per_octave, hint, floor), n


def span_tokens(alpha: float, beta: float, n: int, min_span: int, cap: int | None = None) -> int:
    """Tokens one head keeps (sinks included) for spans taken at length n, a request of `cap` tokens (None: n)."""
    raw = math.floor(alpha + beta * n + 0.5)  # round half up: deterministic across Python/torch
    return min(max(raw, min_span), n if cap is None else min(n, cap))


def window_tokens(span: int, sinks: int) -> int:
    """Recent-window part of a span. Zero when the span is all sinks (then every position < sinks is visible)."""
    return max(span - sinks, 0)


def visible(q: int, k: int, sinks: int, window: int) -> bool:
    """Scalar form of the attention mask, for tests and documentation; kernels vectorise the same rule."""
    return k <= q and (k < sinks or q - k < window)
