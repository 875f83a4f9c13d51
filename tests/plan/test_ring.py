"""Ring layout math: page-aligned rings within one page per head of the plan's tokens; slots never collide."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from moa_vllm.plan.ring import blocks_for_spans, first_pages, flat_page, head_pages, layer_blocks, ring_slot
from moa_vllm.plan.span import span_tokens


@given(st.lists(st.integers(1, 5000), min_size=1, max_size=8), st.sampled_from([16, 32, 128]))
def test_blocks_cover_page_aligned_rings_with_less_than_a_page_per_head(spans, page):
    heads = len(spans)
    pages = head_pages(spans, page)
    assert all(s <= p * page < s + page for s, p in zip(spans, pages))  # alignment: under one page per head
    assert sum(spans) <= sum(pages) * page < sum(spans) + page * heads
    blocks = blocks_for_spans(spans, page, heads)
    assert (blocks - 1) * heads < sum(pages) <= blocks * heads  # then whole blocks of H head pages


def test_rings_start_at_page_boundaries_and_do_not_overlap():
    spans, page = [40, 32, 1, 65], 32
    assert head_pages(spans, page) == [2, 1, 1, 3]
    assert first_pages(spans, page) == [0, 2, 3, 4]
    assert blocks_for_spans(spans, page, 4) == 2  # 7 pages in blocks of 4 head pages


def test_equal_page_rings_interleave_into_vllms_own_layout():
    page, heads = 32, 4
    equal = [40, 64, 33, 50]  # two pages each, spans differ
    got = [[flat_page(equal, h, k, page) for k in range(2)] for h in range(heads)]
    assert got == [[0, 4], [1, 5], [2, 6], [3, 7]]  # head h's page k: cell h of block k
    packed = [40, 32, 1, 65]
    assert [flat_page(packed, h, 0, page) for h in range(heads)] == first_pages(packed, page)


def test_layer_blocks_uses_the_span_rule():
    alphas, betas = [0.0, 100.0, -50.0], [0.5, 0.0, 0.25]
    n = 1000
    spans = [span_tokens(a, b, n, 64) for a, b in zip(alphas, betas)]
    assert spans == [500, 100, 200]
    assert layer_blocks(alphas, betas, n, 64, 32, 3) == -(-(16 + 4 + 7) // 3) == 9


@given(st.integers(0, 16), st.integers(1, 64), st.integers(1, 400))
def test_live_positions_have_distinct_slots(sinks, window, length):
    """After writing positions 0..length-1, the positions a query at length-1 can see occupy distinct slots."""
    span = sinks + window
    live = [p for p in range(length) if p < sinks or length - 1 - p < window]
    slots = [ring_slot(p, sinks, span) for p in live]
    assert len(set(slots)) == len(slots)
    assert all(0 <= s < span for s in slots)
