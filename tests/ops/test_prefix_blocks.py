"""Prefix blocks: prompt K/V written position-ordered, and a fresh ring restored from them holds exactly what the
ring of a request that computed those positions itself holds."""

from __future__ import annotations

import pytest
import torch

from moa_vllm.ops.page_format import PageFormat, write_token_major
from moa_vllm.ops.prefix_blocks import prefix_write_slots, restore_ring
from moa_vllm.ops.ring_layout import page_tables, ring_slot_of

PAGE, HEADS, D = 8, 3, 4


def _setup(spans: list[int], sinks: int, hit: int):
    n_prefix = -(-hit // PAGE) + 1
    ring_pages = [-(-s // PAGE) for s in spans]
    ring_blocks = -(-sum(ring_pages) // HEADS)
    blocks = 1 + ring_blocks + n_prefix  # block 0: the null block
    view = torch.zeros(blocks * HEADS, 2 * PAGE, D)
    ring_ids = torch.arange(1, 1 + ring_blocks)
    prefix_ids = torch.arange(1 + ring_blocks, blocks)
    span_t = torch.tensor(spans)
    tables = page_tables(span_t[None, None], ring_ids[None], PAGE, max(ring_pages))[0, 0]
    return view, prefix_ids, span_t, tables


@pytest.mark.parametrize(
    ("spans", "sinks", "hit"), [([40, 16, 100], 4, 64), ([24, 24, 24], 0, 96), ([8, 30, 200], 8, 48)]
)
def test_restored_ring_equals_the_ring_of_a_request_that_wrote_every_position(spans, sinks, hit):
    view, prefix_ids, span_t, tables = _setup(spans, sinks, hit)
    fmt = PageFormat.token_major(PAGE, D)
    k = torch.randn(hit, HEADS, D)
    v = torch.randn(hit, HEADS, D)
    token, head, slots = prefix_write_slots(prefix_ids, HEADS, PAGE, 0, hit)
    write_token_major(view, slots, k[token, head], v[token, head])
    restore_ring(view, fmt, write_token_major, prefix_ids, tables, span_t, sinks, hit)
    expect = torch.zeros_like(view)
    for p in range(hit):  # the plain way: every position written into its ring slot in order (later ones win)
        for h in range(HEADS):
            slot = int(ring_slot_of(torch.tensor(p), span_t[h], sinks))
            flat = int(tables[h, slot // PAGE]) * PAGE + slot % PAGE
            write_token_major(expect, torch.tensor([flat]), k[p, h][None], v[p, h][None])
    ring_rows = torch.unique(tables[tables > 0])
    assert torch.equal(view[ring_rows], expect[ring_rows])


def test_null_prefix_columns_are_skipped_and_a_hit_over_one_fails():
    ids = torch.tensor([5, 0, 6])
    token, head, slots = prefix_write_slots(ids, HEADS, PAGE, 4, 2 * PAGE)
    pos = token + 4
    assert not bool(((pos >= PAGE) & (pos < 2 * PAGE)).any())  # block 1 is null: nothing written there
    assert set(torch.div(slots, PAGE * HEADS, rounding_mode="floor").tolist()) == {5, 6}
    view, prefix_ids, span_t, tables = _setup([16, 16, 16], 0, 24)
    prefix_ids[1] = 0
    with pytest.raises(RuntimeError, match="some null"):
        restore_ring(view, PageFormat.token_major(PAGE, D), write_token_major, prefix_ids, tables, span_t, 0, 24)
    with pytest.raises(RuntimeError, match="whole number"):
        restore_ring(view, PageFormat.token_major(PAGE, D), write_token_major, prefix_ids, tables, span_t, 0, 20)
