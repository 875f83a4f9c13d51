"""Ring page tables of the one MoA group (all layers in one block list, at their region offsets) derived layer by
layer from its block table (what each forward does) equal the all-layer tables; every ring page of every layer and
request is a distinct cell; the decode tokens' slots looked up from the block table alone equal the slots read
through those tables."""

from __future__ import annotations

import torch

from moa_vllm.ops.ring_layout import (
    CellMap,
    blocks_needed,
    decode_slot_parts,
    decode_slots,
    layer_offsets,
    layer_page_table,
    layer_pages,
    page_tables,
    ring_pages,
    ring_slot_of,
)

# the two layouts vLLM can give the group's one allocation: layer-outer (LBHNC) and block-outer (BLHNC)
LAYOUTS = {"layer-outer": lambda h, layers, nb: CellMap(h, layers, h, nb * h), "block-outer": lambda h, layers, nb: CellMap(h, layers, layers * h, h)}  # noqa: E501


def _case(seed: int, layers: int, heads: int, rows: int, page: int, blocks: int = 0):
    """Spans [L, R, H] (row 0 a padding row) and a block table [R, W] of each row's group blocks from a pool."""
    g = torch.Generator().manual_seed(seed)
    spans = torch.randint(0, 9 * page, (layers, rows, heads), generator=g)
    spans[:, 0] = 0  # a padding row: no ring
    need = -(-blocks_needed(spans, page, heads).sum(0) // layers)  # [R] group blocks
    width = int(need.max()) + 2
    pool = torch.randperm(blocks or rows * width, generator=g).to(torch.int32) + 1
    table = pool[: rows * width].view(rows, width).clone()
    table[torch.arange(width)[None, :] >= need[:, None]] = 0  # columns past a row's blocks: vLLM leaves 0
    return spans, table


def test_layer_tables_equal_the_batched_tables_and_land_in_the_scratch():
    for seed, layers, heads in ((0, 3, 8), (1, 4, 3), (2, 2, 1), (3, 1, 3)):
        spans, table = _case(seed, layers, heads, rows=5, page=16)
        cell_map = CellMap(heads, layers)
        offsets = layer_offsets(spans, 16, heads)
        pages = int(ring_pages(spans, 16).max())
        every = page_tables(spans, table, 16, pages, cell_map)
        for layer in range(layers):
            scratch = torch.full((5 * heads * (pages + 3),), -7, dtype=torch.int32)
            out = scratch[: 5 * heads * pages].view(5, heads, pages)
            got = layer_page_table(spans[layer], table, 16, out, offsets[layer], cell_map)
            assert got.data_ptr() == scratch.data_ptr()
            assert torch.equal(got, every[layer])
            assert int(got[0].abs().sum()) == 0  # the padding row points at the null block only


def test_every_ring_page_of_every_layer_is_its_own_cell_inside_its_rows_blocks():
    for name, layout in LAYOUTS.items():
        for seed, layers, heads in ((4, 3, 4), (5, 5, 2)):
            spans, table = _case(seed, layers, heads, rows=4, page=16)
            nb = int(table.max()) + 1
            cell_map = layout(heads, layers, nb)
            pages = int(ring_pages(spans, 16).max())
            ids = page_tables(spans, table, 16, pages, cell_map)  # [L, R, H, P]
            valid = torch.arange(pages) < ring_pages(spans, 16)[..., None]
            assert ids[valid].unique().numel() == int(valid.sum()), name  # no two ring pages share a cell
            for r in range(1, 4):  # each row's pages lie in its own blocks' cells only
                own = cell_map.cell(table[r].long()[:, None], torch.arange(layers * heads)[None, :]).flatten()
                mine = ids[:, r][valid[:, r]]
                assert bool(torch.isin(mine, own[table[r].repeat_interleave(layers * heads) > 0]).all()), name


def test_tables_follow_the_plans_page_list_packed_or_interleaved():
    """Every entry is the cell of flat page offset[l] + plan.ring.flat_page(...) of the row's block list; a row whose
    heads all have equal pages (interleaved) and one whose heads differ (packed) in the same batch."""
    from moa_vllm.plan.ring import flat_page

    page, heads, layers = 16, 4, 2
    spans = torch.tensor([[[20, 32, 17, 30], [20, 70, 1, 33], [16, 16, 16, 16]]] * layers)
    spans[1, 2] = 40
    offsets = layer_offsets(spans, page, heads)
    table = (torch.arange(3 * 8, dtype=torch.int32).view(3, 8) + 5)
    cell_map = CellMap(heads, layers, heads, 100 * heads)  # layer-outer, 100 blocks
    for layer in range(layers):
        got = layer_page_table(spans[layer], table, page, torch.empty(3, heads, 5, dtype=torch.int32),
                               offsets[layer], cell_map)  # fmt: skip
        for r in range(3):
            for h in range(heads):
                for k in range(-(-int(spans[layer, r, h]) // page)):
                    flat = int(offsets[layer, r]) + flat_page(spans[layer, r].tolist(), h, k, page)
                    block, c = int(table[r, flat // (layers * heads)]), flat % (layers * heads)
                    assert int(got[r, h, k]) == block * heads + (c // heads) * 100 * heads + c % heads
    # the interleaved row of layer 0 reads as one H-head sequence: its layer pages, vLLM's cell order inside
    first = offsets[0, 2:3] // heads
    lp = layer_pages(table[2:3], first, 1, cell_map)
    got = layer_page_table(spans[0], table, page, torch.empty(3, heads, 1, dtype=torch.int32), offsets[0], cell_map)
    assert torch.equal(got[2, :, 0], lp[0, 0] * heads + torch.arange(heads))


def test_a_wider_scratch_row_only_adds_zero_columns():
    spans, table = _case(3, 2, 8, rows=4, page=16)
    offsets, cell_map = layer_offsets(spans, 16, 8), CellMap(8, 2)
    pages = int(ring_pages(spans[1], 16).max())
    narrow = layer_page_table(spans[1], table, 16, torch.empty(4, 8, pages, dtype=torch.int32), offsets[1], cell_map)
    wide = layer_page_table(spans[1], table, 16, torch.empty(4, 8, pages + 5, dtype=torch.int32), offsets[1],
                            cell_map)  # fmt: skip
    assert torch.equal(wide[..., :pages], narrow) and int(wide[..., pages:].abs().sum()) == 0


def test_decode_slots_from_the_block_table_equal_the_slots_through_the_page_tables():
    """Packed and interleaved rows, a padding row (spans 0: the null block's first slot), every layer's parts at
    once and each layer's lookup alone: the new token's slot is its ring page's id * page + its slot in the page."""
    page, sinks = 16, 4
    for seed, heads in ((4, 8), (5, 3), (6, 1)):
        spans, table = _case(seed, 3, heads, rows=5, page=page)
        spans = spans.clamp(min=sinks + 1)
        spans[:, 0] = 0
        spans[:, 1] = 3 * page + 5  # equal spans: interleaved rings
        cell_map = CellMap(heads, 3, heads, 64 * heads)
        offsets = layer_offsets(spans, page, heads)
        g = torch.Generator().manual_seed(seed)
        positions = torch.randint(0, 20 * page, (5,), generator=g)
        parts = decode_slot_parts(spans, positions, sinks, page, offsets)
        for layer in range(3):
            pages = int(ring_pages(spans[layer], page).max())
            tables = layer_page_table(spans[layer], table, page, torch.empty(5, heads, pages, dtype=torch.int32),
                                      offsets[layer], cell_map)  # fmt: skip
            slot = ring_slot_of(positions[:, None], spans[layer], sinks)
            want = torch.gather(tables.long(), 2, (slot // page)[..., None])[..., 0] * page + slot % page
            want[0] = 0  # no ring: the null block
            one = type(parts)(*(t[layer] for t in parts))
            assert torch.equal(decode_slots(table, one, page, cell_map), want.reshape(-1))
