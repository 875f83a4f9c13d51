"""Random ring batches for the kernel tests: shuffled pages from a pool whose stale pages hold NaN, rings filled by
writing every earlier position into its slot, chunks of fresh K/V."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from moa_kernels.ring_prefill_ref import slot_owners


@dataclass
class RingBatch:
    query: torch.Tensor
    key: torch.Tensor
    value: torch.Tensor
    cells: torch.Tensor
    block_table: torch.Tensor
    base: torch.Tensor
    stride: torch.Tensor
    spans: torch.Tensor
    computed: list[int]
    query_start_loc: list[int]
    sinks: int
    scale: float
    scales: tuple[float, float] = (1.0, 1.0)  # float8 cells: the (k, v) scales their values are multiplied by
    cell_map: tuple | None = None  # (heads, layers, block_stride, layer_stride): rings in a group of layers

    def args(self, rows: list[int] | None = None) -> tuple:
        rows = list(range(len(self.computed))) if rows is None else rows
        return (
            self.query,
            self.key,
            self.value,
            self.cells,
            self.block_table,
            self.base,
            self.stride,
            self.spans,
            self.computed,
            self.query_start_loc,
            rows,
            self.sinks,
            self.scale,
        )


def ring_blocks(pages: list[list[int]], gen: torch.Generator, spare_columns: int = 2, layers: int = 1):
    """Shuffled blocks for rings of pages [R][H] (block 0, the null block, never used) and each ring's (base,
    stride): block_table [R, B], base and stride [R, H], the one-head cell count to allocate and the cell map.
    layers > 1: the rings are the last layer's of a group of that many layers (vLLM's layer-outer allocation: cell
    c of block b at b * H + (c // H) * blocks * H + c % H), after 2 * (r + 1) layer pages of the layers before."""
    rows, heads = len(pages), len(pages[0])
    before = [2 * (r + 1) if layers > 1 else 0 for r in range(rows)]  # layer pages ahead of this layer's region
    width = max(-(-(b + -(-sum(p) // heads)) // layers) for p, b in zip(pages, before)) + spare_columns
    blocks = rows * width + 4
    pool = (torch.randperm(blocks - 1, generator=gen) + 1).tolist()
    table = torch.tensor([[pool.pop() for _ in range(width)] for _ in range(rows)], dtype=torch.int32)
    layout = [ring_layout_rule(p) for p in pages]
    base = torch.tensor([[b + heads * ahead for b, _ in row] for row, ahead in zip(layout, before)], dtype=torch.int32)
    stride = torch.tensor([[s for _, s in row] for row in layout], dtype=torch.int32)
    cell_map = (heads, layers, heads, blocks * heads) if layers > 1 else None
    return table, base, stride, blocks * heads * layers, cell_map


def cell_of(table, base, stride, r: int, h: int, slot: int, page: int, cell_map=None) -> int:
    """One-head cell of ring (r, h)'s slot, through the block table (the layout rule written out)."""
    heads = base.shape[1]
    _, layers, block_stride, layer_stride = cell_map or (heads, 1, heads, heads)
    flat = int(base[r, h]) + (slot // page) * int(stride[r, h])
    within = flat % (layers * heads)
    return int(table[r, flat // (layers * heads)]) * block_stride + within // heads * layer_stride + within % heads


def make_batch(
    spans: list[list[int]],  # [R][H]
    computed: list[int],
    chunks: list[int],
    *,
    group: int,
    head_dim: int = 32,
    page: int = 16,
    sinks: int = 4,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
    layers: int = 1,
) -> RingBatch:
    gen = torch.Generator().manual_seed(seed)
    heads = len(spans[0])
    pages = [[-(-s // page) for s in row] for row in spans]
    table, base, stride, count, cell_map = ring_blocks(pages, gen, layers=layers)
    cells = torch.full((count, 2 * page, head_dim), float("nan"), dtype=dtype)
    for r in range(len(spans)):  # the ring before the step: every earlier position written into its slot, in order
        for h in range(heads):
            for slot, pos in enumerate(slot_owners(computed[r], spans[r][h], sinks)):
                if pos >= 0:
                    cell = cell_of(table, base, stride, r, h, slot, page, cell_map)
                    k = torch.randn(head_dim, generator=gen)
                    v = torch.randn(head_dim, generator=gen)
                    cells[cell, slot % page] = k.to(dtype)
                    cells[cell, page + slot % page] = v.to(dtype)
    tokens = sum(chunks)
    qsl = [0]
    for c in chunks:
        qsl.append(qsl[-1] + c)
    return RingBatch(
        query=torch.randn(tokens, heads * group, head_dim, generator=gen).to(dtype),
        key=torch.randn(tokens, heads, head_dim, generator=gen).to(dtype),
        value=torch.randn(tokens, heads, head_dim, generator=gen).to(dtype),
        cells=cells,
        block_table=table,
        base=base,
        stride=stride,
        spans=torch.tensor(spans, dtype=torch.int64),
        computed=list(computed),
        query_start_loc=qsl,
        sinks=sinks,
        scale=head_dim**-0.5,
        cell_map=cell_map,
    )


@dataclass
class DecodeBatch:
    """One decode step over rings that live in blocks of vLLM's block table: query [R, H*G, D], one-head cells
    [blocks * H, 2 * page, D] (never-written slots NaN), block_table [R, B], each ring's (base, stride) in its
    row's flat page list and its visible keys."""

    query: torch.Tensor
    cells: torch.Tensor
    block_table: torch.Tensor
    base: torch.Tensor
    stride: torch.Tensor
    visible: torch.Tensor
    scale: float
    scales: tuple[float, float] = (1.0, 1.0)
    cell_map: tuple | None = None  # (heads, layers, block_stride, layer_stride): rings in a group of layers

    def args(self) -> tuple:
        return (self.query, self.cells, self.block_table, self.base, self.stride, self.visible, self.scale)


def ring_layout_rule(pages: list[int]) -> list[tuple[int, int]]:
    """(base, stride) of each head's ring in a row's flat page list, written out from the layout rule: interleaved
    (page k of head h at k * H + h) where every head has the same pages, else packed head after head."""
    heads = len(pages)
    if len(set(pages)) == 1:
        return [(h, heads) for h in range(heads)]
    return [(sum(pages[:h]), 1) for h in range(heads)]


def make_decode_batch(
    spans: list[list[int]],  # [R][H]; 0: a padding row's ring
    seq_lens: list[int],  # [R] keys written so far (the step's own included)
    *,
    group: int,
    head_dim: int = 32,
    page: int = 16,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
    spare_columns: int = 2,
    layers: int = 1,
) -> DecodeBatch:
    gen = torch.Generator().manual_seed(seed)
    rows, heads = len(spans), len(spans[0])
    pages = [[-(-s // page) for s in row] for row in spans]
    table, base, stride, count, cell_map = ring_blocks(pages, gen, spare_columns, layers)
    cells = torch.full((count, 2 * page, head_dim), float("nan"), dtype=dtype)
    visible = torch.zeros(rows * heads, dtype=torch.int32)
    for r in range(rows):
        for h in range(heads):
            n = min(seq_lens[r], spans[r][h])
            visible[r * heads + h] = n
            for slot in range(n):
                cell = cell_of(table, base, stride, r, h, slot, page, cell_map)
                cells[cell, slot % page] = torch.randn(head_dim, generator=gen).to(dtype)
                cells[cell, page + slot % page] = torch.randn(head_dim, generator=gen).to(dtype)
    return DecodeBatch(
        query=torch.randn(rows, heads * group, head_dim, generator=gen).to(dtype),
        cells=cells,
        block_table=table,
        base=base,
        stride=stride,
        visible=visible,
        scale=head_dim**-0.5,
        cell_map=cell_map,
    )
