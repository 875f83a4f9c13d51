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

from moa_vllm.ops.ring_attention import RingBatch, build_ring_batch, plan_spans, ring_attention
from moa_vllm.vllm_plugin import request_lengths
from moa_vllm.vllm_plugin.kv_spec import MoARingSpec, rank_heads
from moa_vllm.vllm_plugin.settings import plan_from_vllm_config

_LAYER_INDEX = re.compile(r"layers\.(\d+)\.")


def layer_index(layer_name: str) -> int:
    match = _LAYER_INDEX.search(layer_name)
    if match is None:
        raise ValueError(f"moa-vllm: cannot find the layer index in attention layer name {layer_name!r}")
    return int(match.group(1))


class MoABackend(AttentionBackend):
    forward_includes_kv_cache_update: bool = True  # forward() attends first, then writes the surviving K/V
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
    ring: RingBatch  # where each request's rings of this layer live, and where this step writes
    request_lengths: torch.Tensor  # [requests] N of each request


def _rank_heads(spec: MoARingSpec) -> range:
    if spec.tp_size == 1:
        return range(len(spec.alphas))
    from vllm.distributed import get_tensor_model_parallel_rank

    return rank_heads(len(spec.alphas), spec.num_kv_heads, spec.tp_size)[get_tensor_model_parallel_rank()]


class MoAMetadataBuilder(AttentionMetadataBuilder[MoAMetadata]):
    """One builder per MoA layer (each layer is its own KV cache group): that layer's rings for the batch."""

    _cudagraph_support: ClassVar[AttentionCGSupport] = AttentionCGSupport.NEVER

    def __init__(self, kv_cache_spec, layer_names: list[str], vllm_config: VllmConfig, device: torch.device):
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)
        if not isinstance(kv_cache_spec, MoARingSpec):
            raise TypeError(f"moa-vllm: layers {layer_names} got KV cache spec {type(kv_cache_spec).__name__}")
        heads = _rank_heads(kv_cache_spec)
        self.alphas = torch.tensor([kv_cache_spec.alphas[h] for h in heads], dtype=torch.float64)
        self.betas = torch.tensor([kv_cache_spec.betas[h] for h in heads], dtype=torch.float64)
        self.spec = kv_cache_spec
        self.max_model_len = vllm_config.model_config.max_model_len

    def build(
        self, common_prefix_len: int, common_attn_metadata: CommonAttentionMetadata, fast_build: bool = False
    ) -> MoAMetadata:
        c = common_attn_metadata
        n_reqs = c.num_reqs
        lengths = torch.from_numpy(request_lengths.current(n_reqs, self.max_model_len))
        spans = plan_spans(self.alphas, self.betas, lengths, self.spec.min_span)
        ring = build_ring_batch(
            spans,
            c.block_table_tensor[:n_reqs],
            c.query_start_loc_cpu[: n_reqs + 1].tolist(),
            c.seq_lens[:n_reqs].cpu().tolist(),
            self.spec.sink_tokens,
            self.spec.block_size,
        )
        return MoAMetadata(num_actual_tokens=c.num_actual_tokens, ring=ring, request_lengths=lengths)


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

    def do_kv_cache_update(self, layer, key, value, kv_cache, slot_mapping) -> None:
        raise RuntimeError("moa-vllm: K/V are written by forward() (forward_includes_kv_cache_update)")

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
        ring_attention(
            query=query[:n].view(n, self.num_heads, d),
            key=key[:n].view(n, self.num_kv_heads, d),
            value=value[:n].view(n, self.num_kv_heads, d),
            kv_cache=kv_cache,
            batch=attn_metadata.ring,
            sinks=self.plan.sink_tokens,
            scale=self.scale,
            out=output[:n].view(n, self.num_heads, d),
        )
        return output
