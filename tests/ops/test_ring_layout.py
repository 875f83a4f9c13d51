"""One layer's ring page tables derived from its block table (what each forward does) equal the all-layer tables;
the decode tokens' slots looked up from the block table alone equal the slots read through those tables."""

from __future__ import annotations

import torch

from moa_vllm.ops.ring_layout import (
    blocks_needed,
    decode_slot_parts,
    decode_slots,
    layer_page_table,
    page_tables,
    ring_pages,
    ring_slot_of,
)


def _case(seed: int, heads: int, rows: int, page: int):
    g = torch.Generator().manual_seed(seed)
    spans = torch.randint(0, 9 * page, (rows, heads), generator=g)
    spans[0] = 0  # a padding row: no ring
    need = blocks_needed(spans, page, heads)
    width = int(need.max()) + 2
    pool = torch.randperm(rows * width, generator=g).to(torch.int32) + 1
    table = pool.view(rows, width).clone()
    table[torch.arange(width)[None, :] >= need[:, None]] = 0  # columns past a row's blocks: vLLM leaves 0
    return spans, table


def test_layer_tables_equal_the_batched_tables_and_land_in_the_scratch():
    for seed, heads in ((0, 8), (1, 3), (2, 1)):
        spans, table = _case(seed, heads, rows=5, page=16)
        pages = int(ring_pages(spans, 16).max())
        scratch = torch.full((5 * heads * (pages + 3),), -7, dtype=torch.int32)
        out = scratch[: 5 * heads * pages].view(5, heads, pages)
        got = layer_page_table(spans, table, 16, out)
        assert got.data_ptr() == scratch.data_ptr()
        assert torch.equal(got, page_tables(spans[None], table[None], 16, pages)[0])
        assert int(got[0].abs().sum()) == 0  # the padding row points at the null block only
        # every page of every ring is distinct: no two rings share a cell
        valid = torch.arange(pages)[None, None, :] < ring_pages(spans, 16)[..., None]
        ids = got[valid]
        assert ids.unique().numel() == ids.numel()


def test_tables_follow_the_plans_page_list_packed_or_interleaved():
    """Every table entry is block_table[flat // H] * H + flat % H for the flat page moa_vllm.plan.ring assigns; a row
    whose heads all have equal pages (interleaved) and one whose heads differ (packed) in the same batch."""
    from moa_vllm.plan.ring import flat_page

    page, heads = 16, 4
    spans = torch.tensor([[20, 32, 17, 30], [20, 70, 1, 33], [16, 16, 16, 16]])
    need = blocks_needed(spans, page, heads)
    table = (torch.arange(3 * 8, dtype=torch.int32).view(3, 8) + 5).masked_fill(torch.arange(8) >= need[:, None], 0)
    got = layer_page_table(spans, table, page, torch.empty(3, heads, 5, dtype=torch.int32))
    for r in range(3):
        for h in range(heads):
            for k in range(-(-int(spans[r, h]) // page)):
                flat = flat_page(spans[r].tolist(), h, k, page)
                assert int(got[r, h, k]) == int(table[r, flat // heads]) * heads + flat % heads
    assert torch.equal(got[0, :, :2], table[0, :2][None, :] * heads + torch.arange(heads)[:, None])  # interleaved


def test_a_wider_scratch_row_only_adds_zero_columns():
    spans, table = _case(3, 8, rows=4, page=16)
    pages = int(ring_pages(spans, 16).max())
    narrow = layer_page_table(spans, table, 16, torch.empty(4, 8, pages, dtype=torch.int32))
    wide = layer_page_table(spans, table, 16, torch.empty(4, 8, pages + 5, dtype=torch.int32))
    assert torch.equal(wide[..., :pages], narrow) and int(wide[..., pages:].abs().sum()) == 0


def test_decode_slots_from_the_block_table_equal_the_slots_through_the_page_tables():
    """Packed and interleaved rows, a padding row (spans 0: the null block's first slot), every layer's parts at
    once and each layer's lookup alone: the new token's slot is its ring page's id * page + its slot in the page."""
    page, sinks = 16, 4
    for seed, heads in ((4, 8), (5, 3), (6, 1)):
        layers = [_case(seed + 10 * i, heads, rows=5, page=page) for i in range(2)]
        spans = torch.stack([s for s, _ in layers]).clamp(min=sinks + 1)
        spans[:, 0] = 0
        spans[:, 1] = 3 * page + 5  # equal spans: interleaved rings
        g = torch.Generator().manual_seed(seed)
        positions = torch.randint(0, 20 * page, (5,), generator=g)
        parts = decode_slot_parts(spans, positions, sinks, page)
        for layer, (_, table) in enumerate(layers):
            pages = int(ring_pages(spans[layer], page).max())
            tables = layer_page_table(spans[layer], table, page, torch.empty(5, heads, pages, dtype=torch.int32))
            slot = ring_slot_of(positions[:, None], spans[layer], sinks)
            want = torch.gather(tables.long(), 2, (slot // page)[..., None])[..., 0] * page + slot % page
            want[0] = 0  # no ring: the null block
            one = type(parts)(*(t[layer] for t in parts))
            assert torch.equal(decode_slots(table, one, heads, page), want.reshape(-1))
