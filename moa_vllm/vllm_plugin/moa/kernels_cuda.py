"""Ring kernels on CUDA: moa_kernels' Triton ring decode (split-KV) and ring prefill / chunked prefill (one launch
for all of a step's chunk rows). Both look every ring page up in vLLM's block table themselves (`RingPages`: flat =
base + j * stride), so no per-ring page table exists on the GPU: the ring metadata is the spans buffer and two int32
per ring, whatever max_num_seqs and max_model_len are (benchmarks/metadata_bytes.py).

The cache cell is [K page | V page], both token-major. Decode has no mask: the token is written first and the ring
holds exactly min(written, span) keys, as on CPU. Tested on CPU with the kernels in the Triton interpreter (fp32,
fp16) and against their torch references (bf16 too); not yet run on a GPU.

fp8 caches (--kv-cache-dtype fp8 / fp8_e4m3 / fp8_e5m2) hold float8 of value / scale with the layer's per-tensor
k/v scales, as vLLM's own Triton backend stores them (round to nearest, saturated): both kernels dequantize ring
reads, and a prefill chunk's fresh K/V are quantized and dequantized before the kernel sees them, so prefill attends
over exactly what later decode steps read.
"""

from __future__ import annotations

import torch

from moa_kernels import ring_decode, ring_prefill
from moa_kernels.blocks import pick_blocks
from moa_kernels.ring_decode import split_scratch
from moa_kernels.ring_prefill import interpreting, plan_launch
from moa_vllm.ops.page_format import PageFormat, write_token_major
from moa_vllm.ops.ring_layout import CellMap, RingPages, ring_slot_of
from moa_vllm.vllm_plugin.moa.ring_kernels import RingKernels

# Split-KV decode while a step has at most this many rings (few rings, long spans: one program per ring would
# leave most of a GPU idle), over this many segments each; the split scratch is sized for them once.
SPLIT_KV_MAX_RINGS = 128
NUM_SEGMENTS = 16


class CudaRingKernels(RingKernels):
    name = "moa_kernels Triton ring decode"
    page_tables = False  # the kernels read vLLM's block table: no page-table scratch
    prefill_name = "moa_kernels Triton ring prefill"

    def __init__(
        self, dtype: torch.dtype, page: int, head_dim: int, max_rows: int = 1024, kv_cache_dtype: str = "auto"
    ) -> None:
        super().__init__(dtype, page, head_dim, max_rows, kv_cache_dtype)
        self.format = PageFormat(page, head_dim, quant=self.quant)
        self._split: tuple[torch.Tensor, torch.Tensor] | None = None

    def _typed(self, cell_view: torch.Tensor) -> torch.Tensor:
        """The cache's bytes as the float8 type they hold (fp8 caches are allocated as uint8)."""
        return cell_view.view(self.quant) if self.quant is not None and cell_view.dtype != self.quant else cell_view

    def allocate(self, device: torch.device, group: int) -> None:
        """The split-KV scratch a captured decode graph reads, once."""
        self._split = split_scratch(min(SPLIT_KV_MAX_RINGS, self.max_rows), NUM_SEGMENTS, group, self.head_dim, device)

    def write(self, cell_view: torch.Tensor, slots: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> None:
        if self.quant is not None:
            return self.write_quantized(cell_view, slots, key, value)
        write_token_major(cell_view, slots.long(), key, value)

    def decode_rings(
        self,
        query: torch.Tensor,  # [R, H * G, D]
        cell_view: torch.Tensor,
        block_table: torch.Tensor,  # [R, B] the layer's vLLM block table
        layout: RingPages,  # [R, H] each ring's pages in its row's flat page list
        visible: torch.Tensor,  # [R * H] int32
        scale: float,
        out: torch.Tensor,  # [R, H * G, D]
        cell_map: CellMap | None = None,  # where a block's cells lie in cell_view
    ) -> None:
        """One decode token per row over its H rings, through moa_kernels.ring_decode. Split-KV where the step's
        rings fit the scratch: a captured graph has a fixed row count, so the choice is fixed per graph."""
        rings = visible.shape[0]
        split = self._split is not None and rings <= self._split[1].shape[0]
        ring_decode(query, self._typed(cell_view), block_table, layout.base, layout.stride, visible, scale, out,
                    segments=NUM_SEGMENTS if split else 1, scratch=self._split if split else None,
                    scales=(self.k_scale, self.v_scale), cell_map=cell_map)  # fmt: skip

    def prefill(self, q, k, v, out, cell_view, step, layer: int, sinks: int, scale: float) -> None:
        """Every prefill / chunk row of the step in one launch over (ring before the step) + (fresh chunk), then the
        survivors stored (attend first: a chunk must not overwrite keys its own queries still see). No host sync:
        the launch tensors are built once per step, and every chunk token is written, the ones that do not
        survive into the null block's first slot (page 0), so no data-dependent index list is needed."""
        qsl = step.query_start_loc
        rows = [r for r in range(step.num_decodes, len(step.computed)) if qsl[r + 1] > qsl[r]]
        if not rows:
            return
        block_table, layout, spans = step.block_table, step.layout(layer), step.spans[layer]
        blocks = pick_blocks(self.head_dim, q.shape[1] // k.shape[1], interpret=interpreting())
        if step.prefill_launch is None:  # the step's first layer: its tiles, shared by every layer
            step.prefill_launch = plan_launch(step.computed, qsl, rows, blocks.block_t, q.device)
        k_seen, v_seen = self.as_cached(k, v)  # fp8: the chunk's keys as its later decode steps will read them
        ring_prefill(q, k_seen, v_seen, self._typed(cell_view), block_table, layout.base, layout.stride, spans,
                     step.computed, qsl, rows, sinks, scale, out, blocks=blocks, launch=step.prefill_launch,
                     scales=(self.k_scale, self.v_scale), cell_map=step.cell_map)  # fmt: skip
        flat = torch.cat([
            self._survivor_slots(block_table[r], layout.base[r], layout.stride[r], spans[r], step.computed[r], qsl[r],
                                 qsl[r + 1], sinks, step.cell_map)
            for r in rows
        ])  # fmt: skip
        tokens = torch.cat([torch.arange(qsl[r], qsl[r + 1], device=q.device) for r in rows])
        self.write(cell_view, flat.reshape(-1), k[tokens].reshape(-1, k.shape[2]), v[tokens].reshape(-1, v.shape[2]))

    def _survivor_slots(self, blocks, base, stride, spans, computed: int, start: int, end: int, sinks: int,
                        cell_map: CellMap):  # fmt: skip
        """Flat one-head slots [n, H] of a row's chunk tokens: their ring slot where they survive, else 0."""
        pos = torch.arange(computed, end - start + computed, device=spans.device)[:, None]
        window = spans[None, :] - sinks
        keep = (pos < sinks) | ((window > 0) & (pos >= end - start + computed - window))
        slot = ring_slot_of(pos, spans[None, :], sinks)
        flat = base.long()[None, :] + torch.div(slot, self.page, rounding_mode="floor") * stride.long()[None, :]
        page_id = cell_map.flat_cell(blocks[None, :], flat.reshape(1, -1)).view_as(flat)
        return torch.where(keep, page_id * self.page + slot % self.page, 0)
