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
    tables: torch.Tensor
    spans: torch.Tensor
    computed: list[int]
    query_start_loc: list[int]
    sinks: int
    scale: float
    scales: tuple[float, float] = (1.0, 1.0)  # float8 cells: the (k, v) scales their values are multiplied by

    def args(self, rows: list[int] | None = None) -> tuple:
        rows = list(range(len(self.computed))) if rows is None else rows
        return (
            self.query,
            self.key,
            self.value,
            self.cells,
            self.tables,
            self.spans,
            self.computed,
            self.query_start_loc,
            rows,
            self.sinks,
            self.scale,
        )


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
) -> RingBatch:
    gen = torch.Generator().manual_seed(seed)
    rows, heads = len(spans), len(spans[0])
    pages = [[-(-s // page) for s in row] for row in spans]
    width = max(max(p) for p in pages)
    total = sum(sum(p) for p in pages)
    pool = (torch.randperm(total + 5, generator=gen) + 1).tolist()  # extra NaN pages; page 0 never used
    cells = torch.full((total + 6, 2 * page, head_dim), float("nan"), dtype=dtype)
    tables = torch.zeros(rows, heads, width, dtype=torch.int32)
    for r in range(rows):
        for h in range(heads):
            for j in range(pages[r][h]):
                tables[r, h, j] = pool.pop()
    for r in range(rows):  # the ring before the step: every earlier position written into its slot, in order
        for h in range(heads):
            for slot, pos in enumerate(slot_owners(computed[r], spans[r][h], sinks)):
                if pos >= 0:
                    cell = int(tables[r, h, slot // page])
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
        tables=tables,
        spans=torch.tensor(spans, dtype=torch.int64),
        computed=list(computed),
        query_start_loc=qsl,
        sinks=sinks,
        scale=head_dim**-0.5,
    )
