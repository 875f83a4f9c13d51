"""Ring kernels on CUDA: decode through vLLM's Triton unified attention over one-KV-head virtual sequences,
prefill and chunked prefill through moa_kernels' Triton ring prefill (one launch for all of a step's chunk rows).

The cache cell is [K page | V page], both token-major, so the one-head view split at the page gives the
[num_pages, page, 1, D] K and V tensors the paged kernel reads (stride-aware; no copy). Decode has no mask: the
token is written first and seq_len = min(written, span), as on CPU. Tested on CPU with vLLM's real Triton kernel in
the Triton interpreter (fp32, fp16) and against the kernel's contract in torch (bf16 too); not yet run on a GPU.
"""

from __future__ import annotations

import torch

from moa_kernels import ring_prefill
from moa_vllm.ops.page_format import PageFormat, write_token_major
from moa_vllm.ops.ring_prefill import survivors
from moa_vllm.vllm_plugin.ring_kernels import RingKernels


class CudaRingKernels(RingKernels):
    name = "vLLM Triton unified_attention"
    prefill_name = "moa_kernels Triton ring prefill"

    def __init__(self, dtype: torch.dtype, page: int, head_dim: int) -> None:
        super().__init__(dtype, page, head_dim)
        self.format = PageFormat.token_major(page, head_dim)

    def write(self, cell_view: torch.Tensor, slots: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> None:
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

        k = cell_view[:, : self.page].unsqueeze(2)  # [pages, page, 1, D]
        v = cell_view[:, self.page :].unsqueeze(2)
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
            k_descale=None,
            v_descale=None,
        )

    def prefill(self, q, k, v, out, cell_view, step, layer: int, sinks: int, scale: float) -> None:
        """Every prefill / chunk row of the step: attend over (ring before the step) + (fresh chunk), then store
        each row's survivors (attending first: a chunk must not overwrite keys its own queries still see)."""
        qsl = step.query_start_loc
        rows = [r for r in range(step.num_decodes, len(step.computed)) if qsl[r + 1] > qsl[r]]
        if not rows:
            return
        tables, spans = step.tables[layer], step.spans[layer]
        ring_prefill(q, k, v, cell_view, tables, spans, step.computed, qsl, rows, sinks, scale, out)
        flat, keys, values = [], [], []
        for r in rows:
            token, head, slot = survivors(step.computed[r], qsl[r + 1] - qsl[r], spans[r], sinks)
            flat.append(
                tables[r, head, torch.div(slot, self.page, rounding_mode="floor")].long() * self.page + slot % self.page
            )
            keys.append(k[qsl[r] + token, head])
            values.append(v[qsl[r] + token, head])
        self.write(cell_view, torch.cat(flat), torch.cat(keys), torch.cat(values))
