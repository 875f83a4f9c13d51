"""How a one-KV-head page cell stores its tokens, and reading whole rings back out of it (plain torch).

The layer's cache [num_blocks, H, page, 2D] is viewed as cells [num_blocks * H, 2 * page, D]: a K page then a V
page (vLLM CPU_ATTN's in-cell layout; on GPU the same view split in two is what paged kernels read). Each page is
in the attention kernel's own order: both token-major for GPU kernels; for CPU_ATTN K is dimension-major ([D, page])
on the vector ISA, and with bf16 on AMX both K and V are packed in tiles. `key_index` / `value_index` record each
order as a permutation, so prefill can read rings written by any kernel.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from moa_vllm.ops.ring_layout import CellMap


def cells(kv_cache: torch.Tensor) -> torch.Tensor:
    """[num_blocks, H, page, 2D] -> [num_blocks * H, 2 * page, D] (needs the block-contiguous LBHNC layout)."""
    nb, h, page, two_d = kv_cache.shape
    try:
        return kv_cache.view(nb * h, 2 * page, two_d // 2)
    except RuntimeError as err:
        raise RuntimeError(
            f"moa-vllm: the KV cache view {tuple(kv_cache.shape)} with strides {kv_cache.stride()} is not "
            "block-contiguous [blocks, heads, tokens, 2D] (KV cache layout LBHNC); the ring pages cannot be addressed"
        ) from err


def region_cells(layer_caches: Sequence[torch.Tensor]) -> tuple[torch.Tensor, CellMap]:
    """The KV caches of one group's layers ([num_blocks, H, page, 2D] views of one backing allocation) as ONE view
    of one-KV-head cells, from the lowest layer view's block 0, and the `CellMap` of a block's cells in it: ring
    pages of any layer can then live in any layer page of the request's blocks. Refuses views that are not evenly
    spaced layer regions of one allocation (a layout the cell map cannot describe would address wrong keys)."""
    if not layer_caches:
        raise ValueError("moa-vllm: no MoA layer caches to address")
    views = sorted(layer_caches, key=lambda kv: kv.storage_offset())
    kv0 = views[0]
    blocks, heads = kv0.shape[0], kv0.shape[1]
    first = cells(kv0[:1])  # block 0's cells: a block's [H, page, 2D] must be contiguous (LBHNC or BLHNC)
    cell = first.stride(0)
    storage = kv0.untyped_storage().data_ptr()
    for v in views:
        if v.untyped_storage().data_ptr() != storage or v.shape != kv0.shape or v.stride() != kv0.stride():
            raise RuntimeError(
                "moa-vllm: the MoA layers' KV caches are not same-shaped views of one allocation "
                f"({tuple(v.shape)} {v.stride()} vs {tuple(kv0.shape)} {kv0.stride()}); the cache region "
                "cannot be addressed as one"
            )
    rel = [v.storage_offset() - kv0.storage_offset() for v in views]
    block_stride, rem = divmod(kv0.stride(0), cell)
    layer_stride = rel[1] // cell if len(rel) > 1 else heads * blocks
    even = all(r == j * layer_stride * cell for j, r in enumerate(rel))
    disjoint = (block_stride == heads and layer_stride >= blocks * heads) or (
        layer_stride == heads and block_stride >= len(views) * heads
    )
    if rem or not even or not disjoint:
        raise RuntimeError(
            f"moa-vllm: the MoA layers' KV cache views sit at element offsets {rel} with block stride "
            f"{kv0.stride(0)} (cells of {cell}); not evenly spaced layer regions, refusing to address them as one"
        )
    count = (blocks - 1) * block_stride + (len(views) - 1) * layer_stride + heads
    region = first.as_strided((count, first.shape[1], first.shape[2]), first.stride(), first.storage_offset())
    return region, CellMap(heads, len(views), block_stride, layer_stride)


@dataclass(frozen=True)
class PageFormat:
    page: int
    head_dim: int
    key_index: torch.Tensor | None = None  # [page * D]: flat K-page index of logical (token, dim); None = token-major
    value_index: torch.Tensor | None = None  # the same for the V page
    quant: torch.dtype | None = None  # fp8 caches: the float8 type the cache's bytes hold (values are x / scale)

    @classmethod
    def token_major(cls, page: int, head_dim: int) -> PageFormat:
        return cls(page, head_dim, None)

    @classmethod
    def dim_major(cls, page: int, head_dim: int) -> PageFormat:
        t = torch.arange(page)[:, None]
        d = torch.arange(head_dim)[None, :]
        return cls(page, head_dim, (d * page + t).reshape(-1))

    def read(
        self,
        cell_view: torch.Tensor,
        page_ids: torch.Tensor,
        scales: tuple[float, float] = (1.0, 1.0),
        dtype: torch.dtype | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V of the pages page_ids [H, P] as [H, P * page, D] each (a gather copy, in the cache dtype; an fp8
        cache's values dequantized with the (k, v) scales into `dtype`)."""
        h, p = page_ids.shape
        raw = cell_view[page_ids.long()]  # [H, P, 2 * page, D]
        k = _logical(raw[:, :, : self.page], self.key_index, self.page, self.head_dim)
        v = _logical(raw[:, :, self.page :], self.value_index, self.page, self.head_dim)
        k, v = k.reshape(h, p * self.page, self.head_dim), v.reshape(h, p * self.page, self.head_dim)
        if self.quant is None:
            return k, v
        out = dtype or torch.float32
        return dequantize(k, self.quant, scales[0], out), dequantize(v, self.quant, scales[1], out)

    def store(self, cell_view: torch.Tensor, slots: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> None:
        """Store key/value [W, D] at flat one-head slots [W] in this page order (the inverse of `read`). For a byte
        (fp8) cache key/value are float8 values, stored as their bytes; otherwise they are cast to the cache dtype."""
        page, d = self.page, self.head_dim
        if key.dtype.itemsize == 1 and cell_view.dtype == torch.uint8:
            key, value = key.view(torch.uint8), value.view(torch.uint8)
        flat = cell_view.view(cell_view.shape[0], 2 * page * d)
        slots = slots.long()
        cell = torch.div(slots, page, rounding_mode="floor")[:, None]
        logical = (slots % page)[:, None] * d + torch.arange(d, device=slots.device)[None, :]  # [W, D]
        k_at = logical if self.key_index is None else self.key_index.to(slots.device)[logical]
        v_at = logical if self.value_index is None else self.value_index.to(slots.device)[logical]
        flat[cell, k_at] = key.to(flat.dtype)
        flat[cell, v_at + page * d] = value.to(flat.dtype)


def dequantize(raw: torch.Tensor, quant: torch.dtype, scale: float, dtype: torch.dtype) -> torch.Tensor:
    """fp8 cache bytes -> values: float8(raw) * scale (the kernels store x / scale)."""
    return (raw.contiguous().view(quant).to(torch.float32) * scale).to(dtype)


def quantize(x: torch.Tensor, quant: torch.dtype, scale: float) -> torch.Tensor:
    """Values -> float8 of value / scale, rounded to nearest and saturated at the type's largest finite value (what
    vLLM's CUDA cache writes do; a bare torch cast would turn an overflow into NaN)."""
    limit = torch.finfo(quant).max
    return (x.float() / scale).clamp(-limit, limit).to(quant)


def _logical(pages: torch.Tensor, index: torch.Tensor | None, page: int, head_dim: int) -> torch.Tensor:
    """Pages [H, P, page, D] as stored -> [H, P, page, D] token-major."""
    if index is None:
        return pages
    h, p = pages.shape[:2]
    return pages.reshape(h, p, -1)[:, :, index.to(pages.device)].view(h, p, page, head_dim)


def write_token_major(cell_view: torch.Tensor, slots: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> None:
    """Store key/value [W, D] at flat one-head slots [W] of a token-major cache (GPU kernels' layout). float8 key/value
    (already quantized) go into a byte cache as their bytes."""
    page = cell_view.shape[1] // 2
    cell, offset = torch.div(slots, page, rounding_mode="floor"), slots % page
    if key.dtype.itemsize == 1 and cell_view.dtype == torch.uint8:
        key, value = key.view(torch.uint8), value.view(torch.uint8)
    cell_view[cell, offset] = key.to(cell_view.dtype)
    cell_view[cell, offset + page] = value.to(cell_view.dtype)
