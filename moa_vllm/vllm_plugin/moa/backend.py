"""The MoA attention backend for vLLM 0.32: metadata builder and attention impl over per-KV-head rings.

Decode rows (one query token) go through vLLM's own paged kernels as one-KV-head virtual sequences
(kernels_cpu.py / kernels_cuda.py); prefill and chunk rows of the same step go through moa_kernels' Triton ring
prefill on CUDA and the token-exact torch ring prefill (moa_vllm/ops/ring_prefill.py) elsewhere. Ring metadata is
built once per step for every layer (ring_state.py).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import ClassVar

import torch
from vllm.config import VllmConfig, get_current_vllm_config
from vllm.logger import init_logger
from vllm.v1.attention.backend import (
    AttentionBackend,
    AttentionCGSupport,
    AttentionImpl,
    AttentionMetadataBuilder,
    AttentionType,
    CommonAttentionMetadata,
)
from vllm.v1.kv_cache_interface import KVCacheLayout

from moa_vllm.ops.page_format import region_cells
from moa_vllm.ops.prefix_blocks import prefix_write_slots, restore_ring
from moa_vllm.ops.ring_layout import CellMap, RingPages, slot_positions
from moa_vllm.ops.ring_prefill import prefill_attention, survivors
from moa_vllm.vllm_plugin.hooks import check_runner_hooks
from moa_vllm.vllm_plugin.moa.engine_context import EngineContext, engine_context
from moa_vllm.vllm_plugin.moa.kv_spec import MoARingSpec, rank_heads
from moa_vllm.vllm_plugin.moa.ring_kernels import RingKernels
from moa_vllm.vllm_plugin.moa.ring_state import RingBuffers, RingState, RingStep, needs_page_tables, widest_pages
from moa_vllm.vllm_plugin.settings import plan_from_vllm_config

logger = init_logger("vllm.moa_vllm")
_LAYER_INDEX = re.compile(r"layers\.(\d+)\.")


def layer_index(layer_name: str) -> int:
    match = _LAYER_INDEX.search(layer_name)
    if match is None:
        raise ValueError(f"moa-vllm: cannot find the layer index in attention layer name {layer_name!r}")
    return int(match.group(1))


def ring_kernels(
    device: torch.device,
    dtype: torch.dtype,
    page: int,
    head_dim: int,
    group: int,
    max_rows: int,
    kv_cache_dtype: str = "auto",
) -> RingKernels:
    """The one switch: CUDA -> Triton decode + Triton ring prefill; anything else -> CPU_ATTN + torch prefill.
    Buffers a captured CUDA graph reads are allocated here, outside any capture. Each device's kernels are
    imported only where they serve."""
    if device.type == "cuda":
        from moa_vllm.vllm_plugin.moa.kernels_cuda import CudaRingKernels  # imports Triton: CUDA only

        kernels = CudaRingKernels(dtype, page, head_dim, max_rows, kv_cache_dtype)
        kernels.allocate(device, group)
        return kernels
    from moa_vllm.vllm_plugin.moa.kernels_cpu import CpuRingKernels  # CPU_ATTN's ops

    return CpuRingKernels(dtype, page, head_dim, max_rows, kv_cache_dtype)


class MoABackend(AttentionBackend):
    forward_includes_kv_cache_update: bool = True  # forward() writes the step's surviving K/V into the rings
    supported_dtypes: ClassVar[list[torch.dtype]] = [torch.float16, torch.bfloat16, torch.float32]
    # fp8 rings: CPU_ATTN with per-layer k/v scales; CUDA: Triton decode + ring prefill, SM 8.9+ (_check_cache_dtype)
    supported_kv_cache_dtypes: ClassVar[list] = [
        "auto", "float16", "bfloat16", "float32", "fp8", "fp8_e4m3", "fp8_e5m2"
    ]  # fmt: skip

    @staticmethod
    def get_name() -> str:
        return "CUSTOM"  # must name an AttentionBackendEnum member; the plugin registers us behind CUSTOM

    @staticmethod
    def get_impl_cls() -> type[MoAImpl]:
        return MoAImpl

    @staticmethod
    def get_builder_cls() -> type[MoAMetadataBuilder]:
        return MoAMetadataBuilder

    @classmethod
    def supports_sliding_window(cls) -> bool:
        return True

    @classmethod
    def supported_kv_cache_layouts(cls) -> tuple[KVCacheLayout, ...]:
        # A block's [H, page, 2D] must be contiguous so that page id = block * H + cell addresses one-head pages.
        return (KVCacheLayout.LBHNC,)

    @classmethod
    def supports_kv_connector(cls) -> bool:
        return False  # rings are laid out per request by the plan; external KV blocks cannot be placed in them

    @classmethod
    def supports_device_cpu_query_lens_mismatch(cls) -> bool:
        return False  # the row split and ring writes are planned from the host query lengths


@dataclass
class MoAMetadata:
    """One per step for every MoA layer (they are one KV cache group); each layer's forward indexes the step's
    [L, ...] tensors with its own layer index."""

    num_actual_tokens: int
    step: RingStep


def _rank_heads(spec: MoARingSpec) -> range:
    if spec.tp_size == 1:
        return range(len(spec.alphas[0]))
    from vllm.distributed import get_tensor_model_parallel_rank

    return rank_heads(len(spec.alphas[0]), spec.num_kv_heads, spec.tp_size)[get_tensor_model_parallel_rank()]


def ring_state(context: EngineContext, vllm_config: VllmConfig, spec: MoARingSpec, device: torch.device) -> RingState:
    """The engine's RingState (made by its first builder), holding every layer's rules for this rank's KV heads."""
    if context.ring_state is None:
        if context.ring_buffers is None:  # allocating them now would be after vLLM's memory profiling
            raise RuntimeError(
                "moa-vllm: no MoA attention layer reserved the ring buffers while the model was built "
                "(MoAImpl.__init__); refusing to allocate them after vLLM profiled memory"
            )
        plan = plan_from_vllm_config(vllm_config)
        heads = _rank_heads(spec)
        alphas = torch.tensor([[layer[h].alpha for h in heads] for layer in plan.rules], dtype=torch.float64)
        betas = torch.tensor([[layer[h].beta for h in heads] for layer in plan.rules], dtype=torch.float64)
        context.ring_state = RingState(
            alphas,
            betas,
            plan.min_span,
            plan.sink_tokens,
            spec.block_size,
            vllm_config.model_config.max_model_len,
            device,
            max_rows=vllm_config.scheduler_config.max_num_seqs,
            prefix=spec.prefix_blocks,
            buffers=context.ring_buffers,
        )
    return context.ring_state


def reserve_ring_buffers(context: EngineContext, vllm_config: VllmConfig, num_kv_heads: int) -> RingBuffers:
    """The ring metadata's device buffers, allocated once per engine while the model is built (the first MoA
    layer's impl), i.e. before vLLM profiles memory: they count as model memory, not as free KV cache space. Sized
    for every plan head's widest ring at max_model_len (this rank's heads are a subset); the page-table scratch only
    where the kernels read page tables (CPU_ATTN), none on CUDA."""
    if context.ring_buffers is None:
        plan = plan_from_vllm_config(vllm_config)
        alphas = torch.tensor([[r.alpha for r in layer] for layer in plan.rules], dtype=torch.float64)
        betas = torch.tensor([[r.beta for r in layer] for layer in plan.rules], dtype=torch.float64)
        page = vllm_config.cache_config.block_size
        max_len = vllm_config.model_config.max_model_len
        pages = widest_pages(alphas, betas, max_len, plan.min_span, page)
        device = torch.device(vllm_config.device_config.device)
        rows = vllm_config.scheduler_config.max_num_seqs
        tables = needs_page_tables(device)
        context.ring_buffers = RingBuffers.allocate(len(plan.rules), rows, num_kv_heads, pages, device, tables)
        logger.info(
            "moa-vllm: ring metadata buffers %.1f MiB (spans of %d rows x %d KV heads; %s)",
            context.ring_buffers.nbytes / 2**20, rows, num_kv_heads,
            f"page-table scratch for {pages} pages at {max_len} tokens, page {page}" if tables
            else "no page tables: the kernels read vLLM's block table",
        )  # fmt: skip
    return context.ring_buffers


class MoAMetadataBuilder(AttentionMetadataBuilder[MoAMetadata]):
    """One builder for all MoA layers (one KV cache group): one build and one block table per step."""

    reorder_batch_threshold: int | None = 1  # decode rows first: they form one kernel call

    @classmethod
    def get_cudagraph_support(cls, vllm_config: VllmConfig, kv_cache_spec) -> AttentionCGSupport:
        """Full CUDA graphs for decode-only batches on CUDA: the decode path reads only persistent buffers and
        never syncs (ring_state.py). Prefill and mixed steps run eagerly (the ring prefill plans on the host).
        MOA_VLLM_CUDA_GRAPHS=0 turns them off."""
        from vllm.platforms import current_platform

        if not current_platform.is_cuda() or not cuda_graphs_enabled():
            return AttentionCGSupport.NEVER
        return AttentionCGSupport.UNIFORM_SINGLE_TOKEN_DECODE

    def __init__(self, kv_cache_spec, layer_names: list[str], vllm_config: VllmConfig, device: torch.device):
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)
        if not isinstance(kv_cache_spec, MoARingSpec):
            raise TypeError(f"moa-vllm: layers {layer_names} got KV cache spec {type(kv_cache_spec).__name__}")
        if len(layer_names) != kv_cache_spec.num_layers:
            raise RuntimeError(
                f"moa-vllm: vLLM put {len(layer_names)} of the plan's {kv_cache_spec.num_layers} MoA layers in one KV "
                "cache group; the ring layout needs every MoA layer in one group"
            )
        self.spec = kv_cache_spec
        check_runner_hooks(vllm_config)  # a runner whose hook is missing would publish nothing: fail at startup
        self.context = engine_context(vllm_config)
        self.state = ring_state(self.context, vllm_config, kv_cache_spec, device)

    def build(
        self, common_prefix_len: int, common_attn_metadata: CommonAttentionMetadata, fast_build: bool = False
    ) -> MoAMetadata:
        c = common_attn_metadata
        step = self.state.step_for(c, self.context.published)
        self.state.fill(c.block_table_tensor[: c.num_reqs])
        if step.prefix_rows:
            ring_blocks = [self.spec.blocks_for_length(n, cap) for n, cap in zip(step.lengths, step.caps, strict=True)]
            self.state.fill_prefix(c.block_table_tensor[: c.num_reqs], ring_blocks)
        return MoAMetadata(num_actual_tokens=c.num_actual_tokens, step=step)

    def build_for_cudagraph_capture(self, common_attn_metadata: CommonAttentionMetadata) -> MoAMetadata:
        """vLLM's capture path (V1 and V2 call it for capture batches, whose rows are no request): the first layer's
        builder publishes a dummy batch of the capture's rows; the other layers share that step."""
        c = common_attn_metadata
        batch, step = self.context.published, self.state.step
        fresh = (
            batch is not None and batch.dummy and batch.rows == c.num_reqs
            and step is not None and step.serial == batch.serial and step.visible is None
        )  # fmt: skip
        if not fresh:
            self.context.publish_dummy(c.num_reqs, self.state.max_model_len)
        return self.build(0, c)


def _check_cache_dtype(kv_cache_dtype: str, vllm_config: VllmConfig) -> None:
    """On CUDA the Triton kernels take the cache in the model's dtype (their dots need one operand dtype) or fp8
    (dequantized into the model's dtype as they load it; Triton's float8e4nv needs compute capability 8.9+)."""
    from vllm.platforms import current_platform

    if not current_platform.is_cuda():
        return
    model_dtype = str(vllm_config.model_config.dtype).removeprefix("torch.") if vllm_config.model_config else None
    if kv_cache_dtype.startswith("fp8"):
        if not current_platform.has_device_capability(89):
            cap = current_platform.get_device_capability()
            raise NotImplementedError(
                f"moa-vllm on CUDA: --kv-cache-dtype {kv_cache_dtype} needs compute capability 8.9+ (Triton's fp8), "
                f"this GPU has {cap.as_version_str() if cap else 'unknown'}; use --kv-cache-dtype auto"
            )
        return
    if kv_cache_dtype not in ("auto", model_dtype):
        raise NotImplementedError(
            f"moa-vllm on CUDA: --kv-cache-dtype {kv_cache_dtype} differs from the model dtype {model_dtype}; "
            "use --kv-cache-dtype auto or fp8"
        )


def cuda_graphs_enabled() -> bool:
    return os.environ.get("MOA_VLLM_CUDA_GRAPHS", "1") != "0"


_logged_once: set[str] = set()


class MoAImpl(AttentionImpl[MoAMetadata]):
    def __init__(
        self,
        num_heads: int,
        head_size: int,
        scale: float,
        num_kv_heads: int | None = None,
        alibi_slopes: list[float] | None = None,
        sliding_window: int | None = None,
        kv_cache_dtype: str = "auto",
        logits_soft_cap: float | None = None,
        attn_type: str = AttentionType.DECODER,
        kv_sharing_target_layer_name: str | None = None,
        **kwargs,
    ) -> None:
        unsupported = {
            "attn_type": attn_type != AttentionType.DECODER,
            "alibi_slopes": alibi_slopes is not None,
            "logits_soft_cap": bool(logits_soft_cap),
            "sliding_window (model-native)": sliding_window is not None,
            "kv_sharing_target_layer_name": kv_sharing_target_layer_name is not None,
        }
        bad = [name for name, is_bad in unsupported.items() if is_bad]
        if bad:
            raise NotImplementedError(f"moa-vllm backend does not support: {', '.join(bad)}")
        self.num_heads, self.head_size, self.scale = num_heads, head_size, float(scale)
        self.num_kv_heads = num_kv_heads or num_heads
        self.kv_cache_dtype = kv_cache_dtype
        self.attn_type = attn_type
        self.kv_sharing_target_layer_name = None
        vllm_config = get_current_vllm_config()
        self.plan = plan_from_vllm_config(vllm_config)
        self._engine = engine_context(vllm_config)
        self._layers = vllm_config.compilation_config.static_forward_context  # layer name -> module (bound caches)
        self._index: int | None = None
        self.max_num_seqs = vllm_config.scheduler_config.max_num_seqs
        _check_cache_dtype(kv_cache_dtype, vllm_config)
        reserve_ring_buffers(engine_context(vllm_config), vllm_config, self.num_kv_heads)
        self._kernels = None
        self._scales: tuple[float, float, tuple[torch.Tensor, torch.Tensor]] | None = None  # fp8 only

    def do_kv_cache_update(self, layer, key, value, kv_cache, slot_mapping) -> None:
        raise RuntimeError("moa-vllm: K/V are written by forward() (forward_includes_kv_cache_update)")

    def _kernels_for(self, kv_cache: torch.Tensor, model_dtype: torch.dtype):
        if self._kernels is None:
            quantized = self.kv_cache_dtype.startswith("fp8")
            self._kernels = ring_kernels(
                kv_cache.device,
                model_dtype if quantized else kv_cache.dtype,  # an fp8 cache holds bytes
                kv_cache.shape[2],
                self.head_size,
                self.num_heads // self.num_kv_heads,
                self.max_num_seqs * self.num_kv_heads,
                self.kv_cache_dtype if quantized else "auto",
            )
            if self._kernels.name not in _logged_once:
                _logged_once.add(self._kernels.name)
                logger.info(
                    "moa-vllm: ring decode through %s; prefill through %s",
                    self._kernels.name,
                    self._kernels.prefill_name,
                )
        return self._kernels

    def _fp8_scales(self, layer: torch.nn.Module, index: int, quant: torch.dtype, device: torch.device):
        """(k_scale, v_scale, their device tensors) of this layer's fp8 rings, fixed at the first forward (the
        weights are loaded by then): a checkpoint's scales (vLLM set the layer's away from 1.0) win, then the
        plan's kv_amax, then vLLM's default 1.0. Persistent tensors, so a captured decode graph reads them."""
        if self._scales is None:
            own = (layer._k_scale_float, layer._v_scale_float)
            planned = self.plan.fp8_scales(index, torch.finfo(quant).max)
            if own != (1.0, 1.0) or planned is None:
                self._scales = (*own, (layer._k_scale, layer._v_scale))
                source = "the checkpoint" if own != (1.0, 1.0) else "none (vLLM's default 1.0)"
            else:
                tensors = tuple(torch.tensor([x], dtype=torch.float32, device=device) for x in planned)
                self._scales = (*planned, tensors)
                source = "the plan's kv_amax"
            if source not in _logged_once:
                _logged_once.add(source)
                logger.info("moa-vllm: fp8 ring scales from %s (layer %d: k %.4g, v %.4g)", source, index,
                            *self._scales[:2])  # fmt: skip
        return self._scales

    def forward(
        self,
        layer: torch.nn.Module,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        kv_cache: torch.Tensor,
        attn_metadata: MoAMetadata | None,
        output: torch.Tensor,
        output_scale: torch.Tensor | None = None,
        output_block_scale: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if attn_metadata is None:  # memory profiling / warm-up run
            return output
        if output_scale is not None or output_block_scale is not None:
            raise NotImplementedError("moa-vllm backend does not support fused output quantization")
        n = attn_metadata.num_actual_tokens
        h, d = self.num_kv_heads, self.head_size
        q = query[:n].view(n, self.num_heads, d)
        k = key[:n].view(n, h, d)
        v = value[:n].view(n, h, d)
        out = output[:n].view(n, self.num_heads, d)
        kernels = self._kernels_for(kv_cache, query.dtype)
        if self._index is None:
            self._index = layer_index(layer.layer_name)
        if kernels.quant is not None:
            kernels.set_scales(*self._fp8_scales(layer, self._index, kernels.quant, kv_cache.device))
        view, cell_map = self._region(kv_cache)
        ring_forward(
            q,
            k,
            v,
            out,
            view,
            cell_map,
            kv_cache.shape[2],
            kernels,
            attn_metadata.step,
            self._index,
            self.plan.sink_tokens,
            self.scale,
        )
        return output

    def _region(self, kv_cache: torch.Tensor) -> tuple[torch.Tensor, CellMap]:
        """The whole MoA KV cache as one view of one-KV-head cells, made once per engine and allocation from every
        MoA layer's bound cache (a layer's rings may live in any layer page of its request's blocks)."""
        key = kv_cache.untyped_storage().data_ptr()
        region = self._engine.cache_region
        if region is None or region[0] != key:
            caches = [m.kv_cache for m in self._layers.values() if isinstance(getattr(m, "impl", None), MoAImpl)]
            caches = [c[0] if isinstance(c, (list, tuple)) else c for c in caches]
            region = (key, *region_cells(caches))
            self._engine.cache_region = region
        return region[1], region[2]


def ring_forward(
    q, k, v, out, view, cell_map: CellMap, page: int, kernels, step: RingStep, layer: int, sinks: int, scale: float
) -> None:
    """One layer's attention for the step: decode rows through the paged kernel, then prefill/chunk rows.

    q/out [T, Hq, D], k/v [T, H, D] (T = the step's tokens), view: the MoA cache region's one-KV-head cells
    [cells, 2 * page, D] (`region_cells`), cell_map: where a block's cells lie in it.
    """
    h, d = k.shape[1], k.shape[2]
    step.finalize(sinks, page, cell_map)
    nd = step.num_decodes
    prefill = nd < len(step.computed)
    heads_batched = nd > 0 and kernels.decode_heads is not None and step.equal_spans(layer)
    if kernels.page_tables and (step.prefix_ids or prefill or not heads_batched):
        # This layer's ring page tables, into the scratch all layers share; fresh, so that a captured graph
        # always records the derivation. A decode-only step of interleaved rings needs none, nor do kernels that
        # read vLLM's block table themselves.
        step.table(layer, fresh=True)
    if step.prefix_ids:
        _prefix_blocks(k, v, view, kernels, step, layer, sinks)
    if nd:
        g = q.shape[1] // h
        # Write first: the new token's slot held the one key its query may no longer see.
        kernels.write(view, step.decode_slots(layer), k[:nd].reshape(nd * h, d), v[:nd].reshape(nd * h, d))
        if heads_batched:  # interleaved rings: one H-head sequence per request over its layer pages
            blocks = step.layer_pages(layer)  # [nd, P]: ring page k of every head is cell h of layer page k
            key, visible = step.head_visible(layer)  # layers of equal spans share it (and the kernel's metadata)
            kernels.decode_heads(q[:nd], view, h, blocks, visible, scale, out[:nd], key=key,
                                 cache=step.kernel_metadata)  # fmt: skip
        elif kernels.decode_rings is not None:  # the kernel looks each ring page up in vLLM's block table
            layout = step.layout(layer)
            kernels.decode_rings(q[:nd], view, step.block_table[:nd], RingPages(*(t[:nd] for t in layout)),
                                 step.visible[layer, : nd * h], scale, out[:nd], cell_map)  # fmt: skip
        else:
            kernels.decode(
                q[:nd].reshape(nd * h, g, d),
                view,
                step.table(layer)[:nd].view(nd * h, -1),
                step.visible[layer, : nd * h],
                scale,
                out[:nd].view(nd * h, g, d),
            )
    if prefill and kernels.prefill is not None:
        kernels.prefill(q, k, v, out, view, step, layer, sinks, scale)
    elif prefill:
        _prefill_rows(q, k, v, out, view, kernels, step, layer, sinks, page, scale)


def _prefix_blocks(k, v, view, kernels, step: RingStep, layer: int, sinks: int) -> None:
    """Prefix caching: the step's prompt tokens into their position-ordered prefix blocks, then the rings of rows
    that hit the cache restored from the hit's blocks. Writes come first: a request may hit blocks whose tokens
    another row of this very step computes (vLLM caches blocks when it allocates them)."""
    rows = {r: step.prefix_pages(r, layer) for r in step.prefix_ids}  # this layer's pages of the prefix blocks
    heads, page = k.shape[1], kernels.format.page
    for r, ids in rows.items():
        start = step.computed[r]
        count = min(step.query_start_loc[r + 1] - step.query_start_loc[r], ids.shape[0] * page - start)
        if count > 0:
            token, head, slots = prefix_write_slots(ids, heads, page, start, count)
            token = token + step.query_start_loc[r]
            kernels.write(view, slots, k[token, head], v[token, head])
    for r in step.restore:
        restore_ring(
            view, kernels.format, kernels.write, rows[r], step.row_table(layer, r), step.spans[layer, r], sinks,
            step.computed[r], scales=(kernels.k_scale, kernels.v_scale), dtype=kernels.dtype,
        )  # fmt: skip


def _prefill_rows(q, k, v, out, view, kernels, step: RingStep, layer: int, sinks: int, page: int, scale: float):
    """Prefill / chunk rows through the torch ring prefill, which attends first and then stores the survivors.
    Rings that hold every position through the chunk's end (dense heads, early chunks) go the same way: their
    queries are all "near" ones (a full block and a causal square of torch's flash kernel), which ran at 2.2-2.5x
    CPU_ATTN's prefill rate over one-head virtual sequences here (benchmarks/prefill_speed.py kernels)."""
    for r in range(step.num_decodes, len(step.computed)):
        if step.query_start_loc[r + 1] > step.query_start_loc[r]:
            _prefill_ring(q, k, v, out, view, kernels, step, layer, r, sinks, page, scale)


def _prefill_ring(
    q,
    k,
    v,
    out,
    view,
    kernels,
    step: RingStep,
    layer: int,
    r: int,
    sinks: int,
    page: int,
    scale: float,
) -> None:
    qs, qe = step.query_start_loc[r], step.query_start_loc[r + 1]
    computed = step.computed[r]
    spans = step.spans[layer, r]  # [H]
    tables = step.table(layer)[r]  # [H, P]
    ring_k = ring_v = ring_pos = None
    if computed > 0:
        held = int(torch.clamp(spans, max=computed).max())
        ring_k, ring_v = kernels.read(view, tables[:, : -(-held // page)])
        ring_k, ring_v = ring_k[:, :held], ring_v[:, :held]
        ring_pos = slot_positions(torch.tensor([computed]), spans[None], sinks, held)[0]
    chunk_k, chunk_v = kernels.as_cached(k[qs:qe], v[qs:qe])  # fp8: the values the cache will give back
    prefill_attention(
        q[qs:qe],
        chunk_k,
        chunk_v,
        ring_k,
        ring_v,
        ring_pos,
        computed,
        spans - sinks,
        sinks,
        scale,
        out[qs:qe],
    )
    # Attend first, then store: a chunk must not overwrite ring keys its own earlier queries still see.
    token, head, slot = survivors(computed, qe - qs, spans, sinks)
    flat = tables[head, torch.div(slot, page, rounding_mode="floor")].long() * page + slot % page
    kernels.write(view, flat, k[qs + token, head], v[qs + token, head])
