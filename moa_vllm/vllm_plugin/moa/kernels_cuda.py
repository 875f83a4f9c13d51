"""Ring kernels on CUDA: decode through vLLM's Triton unified attention over one-KV-head virtual sequences,
prefill and chunked prefill through moa_kernels' Triton ring prefill (one launch for all of a step's chunk rows).

The cache cell is [K page | V page], both token-major, so the one-head view split at the page gives the
[num_pages, page, 1, D] K and V tensors the paged kernel reads (stride-aware; no copy). Decode has no mask: the
token is written first and seq_len = min(written, span), as on CPU. Tested on CPU with vLLM's real Triton kernel in
the Triton interpreter (fp32, fp16) and against the kernel's contract in torch (bf16 too); not yet run on a GPU.

fp8 caches (--kv-cache-dtype fp8 / fp8_e4m3 / fp8_e5m2) hold float8 of value / scale with the layer's per-tensor
k/v scales, as vLLM's own Triton backend stores them (round to nearest, saturated): decode passes the layer's scale
tensors to unified_attention in its FP8_PER_TENSOR mode, the prefill kernel dequantizes ring reads, and a prefill
chunk's fresh K/V are quantized and dequantized before the kernel sees them, so prefill attends over exactly what
later decode steps read.
"""

from __future__ import annotations

import torch

from moa_kernels import ring_prefill
from moa_kernels.blocks import pick_blocks
from moa_kernels.ring_prefill import interpreting, plan_launch
from moa_vllm.ops.page_format import PageFormat, write_token_major
from moa_vllm.ops.ring_layout import ring_slot_of
from moa_vllm.vllm_plugin.moa.ring_kernels import RingKernels

# vLLM's own Triton backend: below this many sequences the decode runs the split-KV ("3D") kernel over
# NUM_SEGMENTS softmax segments (vllm/v1/attention/backends/triton_attn.py, MIN_LAUNCH_GRID_SIZE_2D // KV heads;
# a virtual sequence has one KV head).
SPLIT_KV_MAX_SEQS = 128
NUM_SEGMENTS = 16


class CudaRingKernels(RingKernels):
    name = "vLLM Triton unified_attention"
    prefill_name = "moa_kernels Triton ring prefill"

    def __init__(
        self, dtype: torch.dtype, page: int, head_dim: int, max_rows: int = 1024, kv_cache_dtype: str = "auto"
    ) -> None:
        super().__init__(dtype, page, head_dim, max_rows, kv_cache_dtype)
        self.format = PageFormat(page, head_dim, quant=self.quant)
        self._segments: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
        self._descale: tuple[torch.Tensor, torch.Tensor] | None = None  # fp8: the layer's scale tensors

    def set_scales(self, k_scale: float, v_scale: float, tensors: tuple[torch.Tensor, torch.Tensor] | None = None):
        """fp8: the layer's k/v scales, and vLLM's one-element scale tensors on the device holding the same values
        (layer._k_scale / _v_scale: persistent, so a captured decode graph reads them where they are; without them,
        tensors of the floats are made once)."""
        if (k_scale, v_scale) != (self.k_scale, self.v_scale) or tensors is not None:
            self._descale = tensors
        super().set_scales(k_scale, v_scale)

    def _typed(self, cell_view: torch.Tensor) -> torch.Tensor:
        """The cache's bytes as the float8 type they hold (fp8 caches are allocated as uint8)."""
        return cell_view.view(self.quant) if self.quant is not None and cell_view.dtype != self.quant else cell_view

    def _descales(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        if self._descale is None:  # scales given as floats (tests): one-element tensors of them
            f32 = dict(dtype=torch.float32, device=device)
            self._descale = (torch.tensor([self.k_scale], **f32), torch.tensor([self.v_scale], **f32))
        return self._descale

    def allocate(self, device: torch.device, group: int) -> None:
        """Every buffer a captured decode graph reads, once: query_start_loc and the split-KV softmax scratch."""
        self._query_start_loc(0, device)
        rows = min(SPLIT_KV_MAX_SEQS, self.max_rows)
        width = 1 << (self.head_dim - 1).bit_length()
        f32 = dict(dtype=torch.float32, device=device)
        self._segments = (
            torch.empty(rows, group, NUM_SEGMENTS, width, **f32),
            torch.empty(rows, group, NUM_SEGMENTS, **f32),
            torch.empty(rows, group, NUM_SEGMENTS, **f32),
        )

    def write(self, cell_view: torch.Tensor, slots: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> None:
        if self.quant is not None:
            return self.write_quantized(cell_view, slots, key, value)
        write_token_major(cell_view, slots.long(), key, value)

    def attend(
        self,
        query,
        cell_view,
        tables,
        seq_lens,
        query_start_loc,
        scale,
        out,
        max_query_len: int = 1,
        max_seq_len: int | None = None,
    ) -> None:
        """Causal attention of each virtual sequence's last queries over its ring (bottom-right aligned)."""
        from vllm.v1.attention.ops.triton_unified_attention import unified_attention

        typed = self._typed(cell_view)
        k = typed[:, : self.page].unsqueeze(2)  # [pages, page, 1, D]
        v = typed[:, self.page :].unsqueeze(2)
        quant: dict = dict(k_descale=None, v_descale=None)
        if self.quant is not None:
            from vllm.v1.kv_cache_interface import KVQuantMode

            k_descale, v_descale = self._descales(query.device)
            quant = dict(kv_quant_mode=KVQuantMode.FP8_PER_TENSOR, k_descale=k_descale, v_descale=v_descale)
        split = {}
        if self._segments is not None:
            output, maxes, sums = self._segments
            split = dict(
                seq_threshold_3D=output.shape[0],
                num_par_softmax_segments=NUM_SEGMENTS,
                softmax_segm_output=output,
                softmax_segm_max=maxes,
                softmax_segm_expsum=sums,
            )
        unified_attention(
            q=query,
            k=k,
            v=v,
            out=out,
            cu_seqlens_q=query_start_loc,
            max_seqlen_q=max_query_len,
            seqused_k=seq_lens,
            max_seqlen_k=max_seq_len if max_seq_len is not None else tables.shape[1] * self.page,
            softmax_scale=scale,
            causal=True,
            window_size=(-1, -1),
            block_table=tables,
            softcap=0,
            q_descale=None,
            **quant,
            **split,
        )

    def prefill(self, q, k, v, out, cell_view, step, layer: int, sinks: int, scale: float) -> None:
        """Every prefill / chunk row of the step in one launch over (ring before the step) + (fresh chunk), then the
        survivors stored (attend first: a chunk must not overwrite keys its own queries still see). No host sync:
        the launch tensors are built once per step, and every chunk token is written, the ones that do not
        survive into the null block's first slot (page 0), so no data-dependent index list is needed."""
        qsl = step.query_start_loc
        rows = [r for r in range(step.num_decodes, len(step.computed)) if qsl[r + 1] > qsl[r]]
        if not rows:
            return
        tables, spans = step.table(layer), step.spans[layer]
        blocks = pick_blocks(self.head_dim, q.shape[1] // k.shape[1], interpret=interpreting())
        if step.prefill_launch is None:  # the step's first layer: its tiles, shared by every layer
            step.prefill_launch = plan_launch(step.computed, qsl, rows, blocks.block_t, q.device)
        k_seen, v_seen = self.as_cached(k, v)  # fp8: the chunk's keys as its later decode steps will read them
        ring_prefill(q, k_seen, v_seen, self._typed(cell_view), tables, spans, step.computed, qsl, rows, sinks, scale,
                     out, blocks=blocks, launch=step.prefill_launch, scales=(self.k_scale, self.v_scale))  # fmt: skip
        flat = torch.cat(
            [self._survivor_slots(tables[r], spans[r], step.computed[r], qsl[r], qsl[r + 1], sinks) for r in rows]
        )
        tokens = torch.cat([torch.arange(qsl[r], qsl[r + 1], device=q.device) for r in rows])
        self.write(cell_view, flat.reshape(-1), k[tokens].reshape(-1, k.shape[2]), v[tokens].reshape(-1, v.shape[2]))

    def _survivor_slots(self, table, spans, computed: int, start: int, end: int, sinks: int) -> torch.Tensor:
        """Flat one-head slots [n, H] of a row's chunk tokens: their ring slot where they survive, else 0."""
        pos = torch.arange(computed, end - start + computed, device=spans.device)[:, None]
        window = spans[None, :] - sinks
        keep = (pos < sinks) | ((window > 0) & (pos >= end - start + computed - window))
        slot = ring_slot_of(pos, spans[None, :], sinks)
        heads = torch.arange(spans.shape[0], device=spans.device)[None, :]
        page_id = table[heads, torch.div(slot, self.page, rounding_mode="floor")].long()
        return torch.where(keep, page_id * self.page + slot % self.page, 0)
