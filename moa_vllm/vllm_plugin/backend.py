"""The MoA attention backend for vLLM 0.32: metadata builder and attention impl over the paged KV cache."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import ClassVar

import torch
from vllm.config import VllmConfig, get_current_vllm_config
from vllm.v1.attention.backend import (
    AttentionBackend,
    AttentionCGSupport,
    AttentionImpl,
    AttentionMetadataBuilder,
    AttentionType,
    CommonAttentionMetadata,
)

from moa_vllm.ops import paged_sink_window_attention, plan_windows
from moa_vllm.plan import Plan
from moa_vllm.vllm_plugin import request_lengths
from moa_vllm.vllm_plugin.settings import plan_from_vllm_config

_LAYER_INDEX = re.compile(r"layers\.(\d+)\.")


def layer_index(layer_name: str) -> int:
    match = _LAYER_INDEX.search(layer_name)
    if match is None:
        raise ValueError(f"moa-vllm: cannot find the layer index in attention layer name {layer_name!r}")
    return int(match.group(1))


class MoABackend(AttentionBackend):
    forward_includes_kv_cache_update: bool = False  # vLLM calls do_kv_cache_update() before forward()
    supported_dtypes: ClassVar[list[torch.dtype]] = [torch.float16, torch.bfloat16, torch.float32]
    supported_kv_cache_dtypes: ClassVar[list] = ["auto", "float16", "bfloat16", "float32"]

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


@dataclass
class MoAMetadata:
    num_actual_tokens: int
    query_start_loc: list[int]
    seq_lens: list[int]
    block_table: torch.Tensor  # [requests, max_blocks]
    windows: torch.Tensor  # [layers, requests, kv_heads] recent window per request and KV head
    request_lengths: torch.Tensor  # [requests] N of each request


class PlanTensors:
    """A plan's rules as tensors, for computing a batch's windows in one vectorised step."""

    def __init__(self, plan: Plan) -> None:
        self.alphas = torch.tensor([[r.alpha for r in layer] for layer in plan.rules], dtype=torch.float64)
        self.betas = torch.tensor([[r.beta for r in layer] for layer in plan.rules], dtype=torch.float64)
        self.min_span = plan.min_span
        self.sinks = plan.sink_tokens

    def windows(self, n: torch.Tensor) -> torch.Tensor:
        return plan_windows(self.alphas, self.betas, n, self.min_span, self.sinks)


class MoAMetadataBuilder(AttentionMetadataBuilder[MoAMetadata]):
    _cudagraph_support: ClassVar[AttentionCGSupport] = AttentionCGSupport.NEVER

    def __init__(self, kv_cache_spec, layer_names: list[str], vllm_config: VllmConfig, device: torch.device):
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)
        self.plan = PlanTensors(plan_from_vllm_config(vllm_config))
        self.max_model_len = vllm_config.model_config.max_model_len

    def build(
        self, common_prefix_len: int, common_attn_metadata: CommonAttentionMetadata, fast_build: bool = False
    ) -> MoAMetadata:
        c = common_attn_metadata
        n_reqs = c.num_reqs
        lengths = torch.from_numpy(request_lengths.current(n_reqs, self.max_model_len))
        return MoAMetadata(
            num_actual_tokens=c.num_actual_tokens,
            query_start_loc=c.query_start_loc_cpu[: n_reqs + 1].tolist(),
            seq_lens=c.seq_lens[:n_reqs].cpu().tolist(),
            block_table=c.block_table_tensor[:n_reqs],
            windows=self.plan.windows(lengths),
            request_lengths=lengths,
        )


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
        self.kv_head_offset = self._kv_head_offset(vllm_config)
        self._layer: int | None = None

    def _kv_head_offset(self, vllm_config: VllmConfig) -> int:
        """First global KV head this rank holds (tensor parallel shards KV heads across ranks)."""
        total = self.plan.model.num_kv_heads
        if total == self.num_kv_heads:
            return 0
        from vllm.distributed import get_tensor_model_parallel_rank, get_tensor_model_parallel_world_size

        rank, world = get_tensor_model_parallel_rank(), get_tensor_model_parallel_world_size()
        return (rank * total // world) if total >= world else (rank * total) // world

    def _layer_of(self, layer: torch.nn.Module) -> int:
        if self._layer is None:
            self._layer = layer_index(layer.layer_name)
        return self._layer

    def do_kv_cache_update(
        self,
        layer: torch.nn.Module,
        key: torch.Tensor,
        value: torch.Tensor,
        kv_cache: torch.Tensor,
        slot_mapping: torch.Tensor,
    ) -> None:
        if kv_cache.numel() == 0:
            return
        d = self.head_size
        k_cache, v_cache = kv_cache[..., :d], kv_cache[..., d:]  # logical [blocks, kv_heads, block_size, D]
        block_size = kv_cache.shape[2]
        n = slot_mapping.shape[0]
        valid = slot_mapping >= 0
        slots = slot_mapping[valid].long()
        blocks, offsets = slots // block_size, slots % block_size
        k_cache[blocks, :, offsets] = key[:n][valid].to(k_cache.dtype)
        v_cache[blocks, :, offsets] = value[:n][valid].to(v_cache.dtype)

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
        d = self.head_size
        n = attn_metadata.num_actual_tokens
        layer_idx = self._layer_of(layer)
        heads = slice(self.kv_head_offset, self.kv_head_offset + self.num_kv_heads)
        out = output[:n].view(n, self.num_heads, d)
        paged_sink_window_attention(
            query=query[:n].view(n, self.num_heads, d),
            k_cache=kv_cache[..., :d],
            v_cache=kv_cache[..., d:],
            block_table=attn_metadata.block_table,
            query_start_loc=attn_metadata.query_start_loc,
            seq_lens=attn_metadata.seq_lens,
            windows=attn_metadata.windows[layer_idx, :, heads],
            sinks=self.plan.sink_tokens,
            scale=self.scale,
            out=out,
        )
        return output
