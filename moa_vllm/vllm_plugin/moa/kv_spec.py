"""KV cache spec and manager for MoA layers: per-KV-head rings, sized by the plan for each request, allocated once.

Every MoA layer gets its own spec (the layer index is a field), so vLLM makes one KV cache group per layer. The
groups share one block pool and alias one memory region, so a block is one layer's page of [H, block_size] tokens
and a request holds, per layer, exactly ceil(sum of its head pages / H) blocks (moa_vllm/plan/ring.py). The manager
takes them all when the request is admitted, from the request's N, and never allocates or frees during decode;
finish, abort and preemption return them through vLLM's own free path.
"""

from __future__ import annotations

from dataclasses import dataclass

from vllm.logger import init_logger
from vllm.v1.core.single_type_kv_cache_manager import SingleTypeKVCacheManager
from vllm.v1.kv_cache_interface import AttentionSpec, KVCacheSpec

from moa_vllm.plan.ring import layer_blocks
from moa_vllm.vllm_plugin.moa import request_lengths

logger = init_logger("vllm.moa_vllm")  # under "vllm" so vLLM's log config prints it


def rank_heads(num_heads: int, heads_per_rank: int, tp_size: int) -> list[range]:
    """Global KV heads held by each tensor-parallel rank (heads are replicated when there are fewer than ranks)."""
    if num_heads >= tp_size:
        return [range(r * heads_per_rank, (r + 1) * heads_per_rank) for r in range(tp_size)]
    return [range(r * num_heads // tp_size, r * num_heads // tp_size + 1) for r in range(tp_size)]


@dataclass(frozen=True, kw_only=True)
class MoARingSpec(AttentionSpec):
    layer_index: int
    sink_tokens: int
    min_span: int
    alphas: tuple[float, ...]  # every KV head of the layer (all ranks)
    betas: tuple[float, ...]
    tp_size: int = 1

    def blocks_for_length(self, n: int) -> int:
        """Blocks of this layer a request of length n holds (the widest rank's need, as ranks share block ids)."""
        return max(
            layer_blocks(
                [self.alphas[h] for h in heads],
                [self.betas[h] for h in heads],
                n,
                self.min_span,
                self.block_size,
                self.num_kv_heads,
            )
            for heads in rank_heads(len(self.alphas), self.num_kv_heads, self.tp_size)
        )

    def max_memory_usage_bytes(self, vllm_config) -> int:
        return self.blocks_for_length(vllm_config.model_config.max_model_len) * self.page_size_bytes

    @property
    def prefix_cacheable(self) -> bool:
        return False

    @property
    def uses_slot_mapping(self) -> bool:
        return False  # the metadata builder addresses ring slots itself

    def is_uniform_with_collection(self, kv_cache_specs: dict[str, KVCacheSpec]) -> bool:
        return all(spec == self for spec in kv_cache_specs.values())


class MoARingManager(SingleTypeKVCacheManager):
    """Takes a request's whole ring allocation at its first allocation; nothing after; no prefix-cache hits."""

    _logged_no_prefix_cache = False

    def _missing_blocks(self, request_id: str) -> int:
        need = self.kv_cache_spec.blocks_for_length(request_lengths.admitted(request_id))
        return max(need - len(self.req_to_blocks.get(request_id, ())), 0)

    def get_num_blocks_to_allocate(self, request_id: str, num_tokens: int, new_computed_blocks, *args, **kwargs) -> int:
        return self._missing_blocks(request_id)

    def allocate_new_blocks(self, request_id: str, num_tokens: int, num_tokens_main_model: int):
        missing = self._missing_blocks(request_id)
        if missing == 0:
            return []
        blocks = self.block_pool.get_new_blocks(missing)
        self.req_to_blocks[request_id].extend(blocks)
        return blocks

    def allocate_external_computed_blocks(self, request_id: str, *args, **kwargs) -> None:
        raise NotImplementedError("moa-vllm: KV connectors (external computed tokens) are not supported")

    def remove_skipped_blocks(self, request_id: str, processed_computed_tokens: int, num_prompt_tokens=None) -> None:
        return  # a ring keeps every block until the request ends

    def get_num_skipped_tokens(self, num_computed_tokens: int) -> int:
        return 0

    def cache_blocks(self, *args, **kwargs) -> None:
        return

    @classmethod
    def find_longest_cache_hit(cls, block_hashes, max_length, kv_cache_group_ids, *args, **kwargs):
        # Ring contents depend on the request's N and positions; the plugin turns prefix caching off at config
        # time, this is the backstop.
        if not cls._logged_no_prefix_cache:
            logger.info("moa-vllm: prefix caching is off for MoA layers")
            cls._logged_no_prefix_cache = True
        return tuple([] for _ in kv_cache_group_ids), 0


def ring_managers(kv_cache_manager) -> list[MoARingManager]:
    """The MoA layers' ring managers among a KV cache manager's per-group managers (one per MoA layer)."""
    return [m for m in kv_cache_manager.coordinator.single_type_managers if isinstance(m, MoARingManager)]
