"""KV cache spec and manager for MoA layers: a per-layer recent window plus sink blocks that are never freed.

The window of a layer is the widest recent window any request can have in it (spans grow with N, so that is the
window at N = max_model_len). Blocks wholly behind that window are returned to vLLM's pool as decode advances;
the first ceil(sinks / block_size) blocks stay for the whole request.
"""

from __future__ import annotations

from dataclasses import dataclass

from vllm.logger import init_logger
from vllm.utils.math_utils import cdiv
from vllm.v1.core.single_type_kv_cache_manager import SlidingWindowManager
from vllm.v1.kv_cache_interface import KVCacheSpec, SlidingWindowSpec

logger = init_logger("vllm.moa_vllm")  # under "vllm" so vLLM's log config prints it


@dataclass(frozen=True, kw_only=True)
class MoASpec(SlidingWindowSpec):
    sink_tokens: int = 0

    @property
    def num_sink_blocks(self) -> int:
        return cdiv(self.sink_tokens, self.block_size)

    def max_admission_blocks_per_request(self, max_in_flight_tokens: int, max_model_len: int) -> int:
        window_blocks = super().max_admission_blocks_per_request(max_in_flight_tokens, max_model_len)
        return min(window_blocks + self.num_sink_blocks, cdiv(max_model_len, self.block_size))

    def is_uniform_with_collection(self, kv_cache_specs: dict[str, KVCacheSpec]) -> bool:
        return all(
            isinstance(s, MoASpec) and s.sliding_window == self.sliding_window and s.sink_tokens == self.sink_tokens
            for s in kv_cache_specs.values()
        )


class MoAManager(SlidingWindowManager):
    """SlidingWindowManager that keeps the sink blocks and never serves prefix-cache hits."""

    _logged_no_prefix_cache = False

    def __init__(self, kv_cache_spec: MoASpec, **kwargs) -> None:
        super().__init__(kv_cache_spec, **kwargs)
        self.num_sink_blocks = kv_cache_spec.num_sink_blocks

    def remove_skipped_blocks(
        self, request_id: str, processed_computed_tokens: int, num_prompt_tokens: int | None = None
    ) -> None:
        skipped = self.get_num_skipped_tokens(processed_computed_tokens)
        if skipped <= 0 or request_id not in self.req_to_blocks:
            return
        last = min(skipped // self.block_size, len(self.req_to_blocks[request_id]))
        self._remove_blocks_in_range(request_id, self.num_sink_blocks, last)

    @classmethod
    def find_longest_cache_hit(
        cls,
        block_hashes,
        max_length,
        kv_cache_group_ids,
        block_pool,
        kv_cache_spec,
        drop_eagle_block,
        alignment_tokens,
        dcp_world_size=1,
        pcp_world_size=1,
    ):
        # A hit would need the sink blocks and the window blocks of the same prefix; the plugin turns prefix
        # caching off at config time, this is the backstop.
        if not cls._logged_no_prefix_cache:
            logger.info("moa-vllm: prefix caching is off for MoA layers")
            cls._logged_no_prefix_cache = True
        return tuple([] for _ in kv_cache_group_ids), 0
