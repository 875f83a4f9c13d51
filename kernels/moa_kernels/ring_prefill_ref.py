"""Plain torch reference of `ring_prefill`, same arguments: written independently of the kernel's position-order
walk. It replays every write the ring received (positions 0..computed-1 in order, each into its slot) to learn
which position each slot holds, gathers the ring slot by slot, appends the chunk's fresh keys, and applies the
visibility rule as an explicit mask in float64."""

from __future__ import annotations

import torch

from moa_kernels.ring_prefill import cell_strides


def slot_owners(computed: int, span: int, sinks: int) -> list[int]:
    """Position held by each ring slot after positions 0..computed-1 were written in order (-1 = never written)."""
    owners = [-1] * span
    window = max(span - sinks, 1)
    for p in range(computed):
        owners[p if p < sinks else sinks + (p - sinks) % window] = p
    return owners


def ring_prefill_reference(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    cells: torch.Tensor,  # [pages, 2 * page, D] token-major
    block_table: torch.Tensor,  # [R, B]
    base: torch.Tensor,  # [R, H]: ring page j is flat page base + j * stride, cell flat % C of block flat // C
    stride: torch.Tensor,
    spans: torch.Tensor,
    computed: list[int],
    query_start_loc: list[int],
    rows: list[int],
    sinks: int,
    scale: float,
    out: torch.Tensor,
    *,
    window_delta: int = 0,  # mutation tests only: the visibility rule's windows off by this many tokens
    blocks=None,  # the kernel's tiling and launch data: accepted so the reference takes the kernel's call as is
    launch=None,
    scales: tuple[float, float] = (1.0, 1.0),  # float8 cells: a ring value is float8 * scale
    cell_map=None,  # where a block's cells lie (ring_prefill.cell_strides)
) -> None:
    heads = key.shape[1]
    per_block, block_stride, layer_stride = cell_strides(cell_map, heads)
    group = query.shape[1] // heads
    page = cells.shape[1] // 2
    for r in rows:
        qs, qe = query_start_loc[r], query_start_loc[r + 1]
        c, n = computed[r], qe - qs
        for h in range(heads):
            span = int(spans[r, h])
            owners = torch.tensor(slot_owners(c, span, sinks))
            held = (owners >= 0).nonzero()[:, 0]
            flat = int(base[r, h]) + torch.div(held, page, rounding_mode="floor") * int(stride[r, h])
            within = flat % per_block
            page_ids = block_table[r].long().cpu()[flat // per_block] * block_stride + within // heads * layer_stride
            page_ids = page_ids + within % heads
            k_ring = cells[page_ids, held % page].double() * scales[0]
            v_ring = cells[page_ids, held % page + page].double() * scales[1]
            k_all = torch.cat([k_ring, key[qs:qe, h].double()])
            v_all = torch.cat([v_ring, value[qs:qe, h].double()])
            k_pos = torch.cat([owners[held], torch.arange(c, c + n)])
            q_pos = torch.arange(c, c + n)[:, None]
            rel = q_pos - k_pos[None, :]
            seen = (rel >= 0) & ((k_pos[None, :] < sinks) | (rel < span - sinks + window_delta))
            q = query[qs:qe, h * group : (h + 1) * group].double()  # [n, G, D]
            scores = torch.einsum("ngd,kd->gnk", q, k_all) * scale
            probs = torch.softmax(scores.masked_fill(~seen[None], float("-inf")), dim=-1)
            result = torch.einsum("gnk,kd->ngd", probs, v_all)
            out[qs:qe, h * group : (h + 1) * group] = result.to(out.dtype)
