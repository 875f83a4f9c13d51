"""Plain torch reference of `ring_decode`, same arguments: ring by ring and page by page in Python, float64."""

from __future__ import annotations

import torch

from moa_kernels.ring_prefill import cell_strides


def ring_decode_reference(
    query: torch.Tensor,  # [R, H * G, D]
    cells: torch.Tensor,  # [pages, 2 * page, D]
    block_table: torch.Tensor,  # [R, B]
    base: torch.Tensor,  # [R, H]
    stride: torch.Tensor,  # [R, H]
    visible: torch.Tensor,  # [R * H]
    scale: float,
    out: torch.Tensor,
    *,
    scales: tuple[float, float] = (1.0, 1.0),
    cell_map=None,
    **_kernel_options,  # segments, scratch, block_n: the kernel's work split, same result
) -> None:
    rows, heads = base.shape
    per_block, block_stride, layer_stride = cell_strides(cell_map, heads)
    group = query.shape[1] // heads
    page = cells.shape[1] // 2
    for r in range(rows):
        for h in range(heads):
            n = int(visible[r * heads + h])
            q = query[r, h * group : (h + 1) * group].double()
            if n == 0:
                out[r, h * group : (h + 1) * group] = 0
                continue
            keys, values = [], []
            for s in range(n):
                flat = int(base[r, h]) + (s // page) * int(stride[r, h])
                within = flat % per_block
                page_id = int(block_table[r, flat // per_block]) * block_stride + within // heads * layer_stride
                page_id += within % heads
                keys.append(cells[page_id, s % page].double() * scales[0])
                values.append(cells[page_id, page + s % page].double() * scales[1])
            probs = torch.softmax(q @ torch.stack(keys).T * scale, dim=-1)
            out[r, h * group : (h + 1) * group] = (probs @ torch.stack(values)).to(out.dtype)
