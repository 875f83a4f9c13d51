"""What ring_forward needs from a device's paged attention kernels (kernels_cpu.py, kernels_cuda.py implement it;
backend.ring_kernels picks one per device).

Each (request, KV head) ring is a one-KV-head "virtual sequence" (page table of one-head page ids, seq_len =
min(written, span)); `attend` is causal attention of each virtual sequence's last queries over its ring,
bottom-right aligned, `decode` the one-query case. `write` stores K/V at flat one-head slots in the kernel's own
page format (`format`, which the torch ring prefill reads back). `prefill`, where a device has a ring prefill
kernel (CUDA: moa_kernels' Triton kernel), computes every prefill / chunk row of a step and stores the survivors;
where it is None, ring_forward runs the torch ring prefill (CPU).
"""

from __future__ import annotations

import torch

from moa_vllm.ops.page_format import PageFormat, dequantize, quantize

# vLLM's fp8 KV cache dtypes ("fp8" is e4m3) -> the float8 type the cache bytes hold
FP8_TYPES: dict[str, torch.dtype] = {
    "fp8": torch.float8_e4m3fn,
    "fp8_e4m3": torch.float8_e4m3fn,
    "fp8_e5m2": torch.float8_e5m2,
}


class RingKernels:
    name: str
    prefill_name: str = "the torch ring prefill (moa_vllm/ops/ring_prefill.py, torch CPU flash attention)"
    format: PageFormat
    prefill = None  # or a method (q, k, v, out, cell_view, step, layer, sinks, scale) -> None
    # or a method (query [R, Hq, D], cell_view, heads, blocks [R, P], seq_lens [R], scale, out [R, Hq, D]) -> None:
    # decode of requests whose H rings have equal spans (interleaved: cell h of block k), one sequence each
    decode_heads = None
    # True: the kernels read rings through [R, H, P] page tables derived into the shared scratch (CPU_ATTN); False:
    # they look pages up in vLLM's block table themselves and `decode_rings` decodes (CUDA), no scratch at all.
    page_tables = True
    decode_rings = None  # or a method (query [R, Hq, D], cell_view, block_table [R, B], RingPages [R, H],
    # visible [R * H], scale, out [R, Hq, D], cell_map) -> None

    def __init__(
        self, dtype: torch.dtype, page: int, head_dim: int, max_rows: int = 1024, kv_cache_dtype: str = "auto"
    ) -> None:
        self.dtype, self.page, self.head_dim = dtype, page, head_dim
        self.max_rows = max_rows  # virtual sequences a decode step can have: max_num_seqs x KV heads
        self.kv_cache_dtype = kv_cache_dtype
        self.quant = FP8_TYPES.get(kv_cache_dtype)  # fp8 caches: the float8 type their bytes hold
        if kv_cache_dtype.startswith("fp8") and self.quant is None:
            raise ValueError(f"moa-vllm: unknown fp8 KV cache dtype {kv_cache_dtype!r} (known: {sorted(FP8_TYPES)})")
        self.k_scale = self.v_scale = 1.0
        self._qsl: torch.Tensor | None = None

    def set_scales(self, k_scale: float, v_scale: float, tensors: tuple[torch.Tensor, torch.Tensor] | None = None):
        """The layer's K/V quantization scales (fp8 caches; vLLM sets them on the layer after loading weights);
        `tensors`: the same scales as the layer's device tensors, for kernels that read them there (CUDA)."""
        self.k_scale, self.v_scale = float(k_scale), float(v_scale)

    def read(self, cell_view: torch.Tensor, page_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V of pages [H, P] as [H, P * page, D], in the model's dtype for an fp8 cache."""
        return self.format.read(cell_view, page_ids, (self.k_scale, self.v_scale), self.dtype)

    def as_cached(self, key: torch.Tensor, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """K/V [..., D] as the cache gives them back, so that a prefill chunk's own keys are the values its later
        decode steps read (fp8: quantized as `write` stores them, then dequantized)."""
        if self.quant is None:
            return key, value
        return (
            dequantize(quantize(key, self.quant, self.k_scale), self.quant, self.k_scale, key.dtype),
            dequantize(quantize(value, self.quant, self.v_scale), self.quant, self.v_scale, value.dtype),
        )

    def write(self, cell_view: torch.Tensor, slots: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> None:
        raise NotImplementedError

    def write_quantized(self, cell_view: torch.Tensor, slots: torch.Tensor, key: torch.Tensor, value: torch.Tensor):
        """fp8 caches: float8 of value / scale, rounded to nearest and saturated (`page_format.quantize`), stored as
        bytes in the kernel's page order. Both devices write this way: vLLM's CPU cache write rounds toward zero,
        which costs passkey answers at scale 1 (benchmarks/results/fp8_quantizer)."""
        quant = self.quant
        self.format.store(cell_view, slots, quantize(key, quant, self.k_scale), quantize(value, quant, self.v_scale))

    def attend(
        self,
        query: torch.Tensor,  # [tokens, G, D], each virtual sequence's queries contiguous
        cell_view: torch.Tensor,  # [pages, 2 * page, D]
        tables: torch.Tensor,  # [rows, P] int32
        seq_lens: torch.Tensor,  # [rows] int32: keys in each ring, the step's own included
        query_start_loc: torch.Tensor,  # [rows + 1] int32
        scale: float,
        out: torch.Tensor,  # [tokens, G, D]
        max_query_len: int = 1,
    ) -> None:
        raise NotImplementedError

    def decode(self, query, cell_view, tables, seq_lens, scale: float, out) -> None:
        """One query per virtual sequence: query/out [rows, G, D]."""
        self.attend(query, cell_view, tables, seq_lens, self._query_start_loc(query.shape[0], query.device), scale, out)

    def _query_start_loc(self, rows: int, device: torch.device) -> torch.Tensor:
        """0..rows as int32, a view of one buffer allocated once (a captured CUDA graph keeps its address)."""
        if self._qsl is None:
            self._qsl = torch.arange(self.max_rows + 1, dtype=torch.int32, device=device)
        if rows > self.max_rows:
            raise RuntimeError(f"moa-vllm: {rows} decode virtual sequences, more than max_num_seqs x KV heads")
        return self._qsl[: rows + 1]
