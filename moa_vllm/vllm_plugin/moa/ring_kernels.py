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

from moa_vllm.ops.page_format import PageFormat


class RingKernels:
    name: str
    prefill_name: str = "the torch ring prefill (moa_vllm/ops/ring_prefill.py, torch CPU flash attention)"
    format: PageFormat
    prefill = None  # or a method (q, k, v, out, cell_view, step, layer, sinks, scale) -> None

    def __init__(self, dtype: torch.dtype, page: int, head_dim: int, max_rows: int = 1024) -> None:
        self.dtype, self.page, self.head_dim = dtype, page, head_dim
        self.max_rows = max_rows  # virtual sequences a decode step can have: max_num_seqs x KV heads
        self._qsl: torch.Tensor | None = None

    def write(self, cell_view: torch.Tensor, slots: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> None:
        raise NotImplementedError

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
