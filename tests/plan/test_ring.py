"""Ring layout math: block counts within one page per head of the plan's tokens; slots never collide."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from moa_vllm.plan.ring import blocks_for_spans, layer_blocks, ring_slot
from moa_vllm.plan.span import span_tokens


@given(st.lists(st.integers(1, 5000), min_size=1, max_size=8), st.sampled_from([16, 32, 128]))
def test_blocks_cover_the_spans_with_less_than_a_page_per_head(spans, page):
    heads = len(spans)
    slots = blocks_for_spans(spans, page, heads) * page * heads
    assert sum(spans) <= slots < sum(spans) + page * heads


def test_layer_blocks_uses_the_span_rule():
    alphas, betas = [0.0, 100.0, -50.0], [0.5, 0.0, 0.25]
    n = 1000
    spans = [span_tokens(a, b, n, 64) for a, b in zip(alphas, betas)]
    assert spans == [500, 100, 200]
    assert layer_blocks(alphas, betas, n, 64, 32, 3) == -(-800 // 96) == 9


@given(st.integers(0, 16), st.integers(1, 64), st.integers(1, 400))
def test_live_positions_have_distinct_slots(sinks, window, length):
    """After writing positions 0..length-1, the positions a query at length-1 can see occupy distinct slots."""
    span = sinks + window
    live = [p for p in range(length) if p < sinks or length - 1 - p < window]
    slots = [ring_slot(p, sinks, span) for p in live]
    assert len(set(slots)) == len(slots)
    assert all(0 <= s < span for s in slots)
