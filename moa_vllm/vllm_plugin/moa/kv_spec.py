"""KV cache spec and manager for MoA layers: per-KV-head rings, sized by the plan for each request, allocated once;
with prefix caching on, position-ordered prefix blocks that vLLM's block pool caches and evicts.

Every MoA layer gets the same spec (it carries the rules of all MoA layers), so vLLM makes ONE KV cache group for
all of them: one manager, one block table, one set of per-request calls per step, whatever the layer count. A block
is one layer page of [H, block_size] tokens for each of the L layers (vLLM's own layout); the worker sees the whole
region as one-KV-head cells and lays each request's layers out one after another in its block list, so a request
holds ceil(sum over layers of ceil(head pages / H) / L) blocks (moa_vllm/plan/ring.py `group_blocks`). The manager
takes them all when the request is admitted, from the request's N, and never allocates or frees them during decode;
finish, abort and preemption return them through vLLM's own free path.

Prefix caching (spec.prefix_blocks). A ring overwrites its slots, so the cacheable copy of a prompt lives elsewhere:
in ordinary position-ordered blocks (block i = positions [i*B, (i+1)*B) of every KV head, vLLM's own layout), one
per full prompt block, written by the forward next to the ring writes. A request's block list is
[ring blocks..., prefix block 0, 1, ...]: the prefix columns start right after the ring, so the worker finds them
from N alone. A prefix block is held only while its chunk is computed: once its tokens are committed it is
released to the pool, where it stays cached (vLLM's LRU, counted as free) until someone needs the memory. A cache
hit hands the request the cached blocks of its first P tokens as its first prefix columns; the worker copies each
head's sinks and last window positions from them into the request's fresh ring at its first step
(ops/prefix_blocks.py) and the blocks are released at the next step. Prefix blocks are optional: when the pool
cannot give a chunk its prefix blocks, the admission patch retries the allocation without them (the request then
stops caching and gets null columns), so caching never makes a request wait or preempts one. The block hash of a
prefix block carries the request's span signature (plan/prefix.py), so a hit never mixes spans.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from itertools import islice

from vllm.logger import init_logger
from vllm.v1.core.single_type_kv_cache_manager import SingleTypeKVCacheManager
from vllm.v1.kv_cache_interface import AttentionSpec, KVCacheSpec

from moa_vllm.plan.prefix import cacheable_blocks
from moa_vllm.plan.ring import cdiv, group_blocks, layer_blocks
from moa_vllm.vllm_plugin.moa import request_lengths

logger = init_logger("vllm.moa_vllm")  # under "vllm" so vLLM's log config prints it


@functools.lru_cache(maxsize=65536)
def _blocks_for_length(spec: MoARingSpec, n: int, cap: int | None) -> int:
    """Memoised: the scheduler asks several times per request and step."""
    return spec._blocks_uncached(n, cap)


def rank_heads(num_heads: int, heads_per_rank: int, tp_size: int) -> list[range]:
    """Global KV heads held by each tensor-parallel rank (heads are replicated when there are fewer than ranks)."""
    if num_heads >= tp_size:
        return [range(r * heads_per_rank, (r + 1) * heads_per_rank) for r in range(tp_size)]
    return [range(r * num_heads // tp_size, r * num_heads // tp_size + 1) for r in range(tp_size)]


@dataclass(frozen=True, kw_only=True)
class MoARingSpec(AttentionSpec):
    """The one spec of every MoA layer (equal specs make one KV cache group). page_size_bytes is one layer's page,
    as for any attention spec; a block of the group holds one such page per layer (`block_bytes`)."""

    sink_tokens: int
    min_span: int
    alphas: tuple[tuple[float, ...], ...]  # [layer][KV head] of every MoA layer (all ranks)
    betas: tuple[tuple[float, ...], ...]
    tp_size: int = 1
    span_grid: int = 0  # steps per octave N is rounded up to before spans are taken (plan/span.span_length)
    span_floor: int = 0  # the server's span length: spans are taken at no less (settings.span_floor)
    prefix_blocks: bool = False  # prefix caching on: keep position-ordered prefix blocks after the ring

    def __hash__(self) -> int:
        """A cheap hash (equal specs hash equally): the generated one would hash every layer's rules on each call,
        and the scheduler hashes the spec for every memoised block count (`_blocks_for_length`)."""
        return hash((self.block_size, self.num_kv_heads, self.head_size, self.sink_tokens, self.min_span,
                     len(self.alphas), self.tp_size, self.span_grid, self.span_floor, self.prefix_blocks))  # fmt: skip

    @property
    def num_layers(self) -> int:
        return len(self.alphas)

    @property
    def block_bytes(self) -> int:
        """Bytes of one block of the group: one layer page per MoA layer."""
        return self.page_size_bytes * self.num_layers

    def blocks_for_length(self, n: int, cap: int | None = None) -> int:
        """Blocks a request holds with spans at length n and `cap` tokens of its own (None: n); the widest rank's
        need, as ranks share block ids."""
        return _blocks_for_length(self, n, None if cap is None or cap >= n else cap)

    def _blocks_uncached(self, n: int, cap: int | None = None) -> int:
        return max(
            group_blocks(
                [
                    layer_blocks(
                        [alphas[h] for h in heads],
                        [betas[h] for h in heads],
                        n,
                        self.min_span,
                        self.block_size,
                        self.num_kv_heads,
                        cap,
                    )
                    for alphas, betas in zip(self.alphas, self.betas, strict=True)
                ],
                self.num_layers,
            )
            for heads in rank_heads(len(self.alphas[0]), self.num_kv_heads, self.tp_size)
        )

    def max_memory_usage_bytes(self, vllm_config) -> int:
        """One layer's share (vLLM sums this over the group's layers and divides it by the page size per block)."""
        return self.blocks_for_length(vllm_config.model_config.max_model_len) * self.page_size_bytes

    def max_num_blocks_per_req(self, vllm_config, max_len: int) -> int:
        """Block table columns: the widest ring, then (prefix caching) one column per prompt block."""
        return self.blocks_for_length(max_len) + (cdiv(max_len, self.block_size) if self.prefix_blocks else 0)

    @property
    def prefix_cacheable(self) -> bool:
        return self.prefix_blocks

    @property
    def uses_slot_mapping(self) -> bool:
        return False  # the metadata builder addresses ring slots itself

    def is_uniform_with_collection(self, kv_cache_specs: dict[str, KVCacheSpec]) -> bool:
        return all(spec == self for spec in kv_cache_specs.values())


class MoARingManager(SingleTypeKVCacheManager):
    """A request's whole ring at its first allocation, then (prefix caching) one prefix block per full prompt block
    its chunks reach, each released once computed (module docstring)."""

    _logged_no_prefix_cache = False

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._hits: dict[str, list] = {}  # cache-hit blocks between add_local_computed_blocks and the allocation

    @property
    def caching(self) -> bool:
        return self.enable_caching and self.kv_cache_spec.prefix_blocks

    def ring_blocks(self, request_id: str) -> int:
        return self.kv_cache_spec.blocks_for_length(
            request_lengths.admitted(request_id), request_lengths.own_length(request_id)
        )

    def _prefix_target(self, request_id: str, num_tokens: int) -> int:
        """Prefix columns the request has once `num_tokens` tokens have slots: one per full prompt block reached."""
        if not self.caching:
            return 0
        prompt = request_lengths.prompt_tokens(request_id)
        return min(cdiv(num_tokens, self.block_size), cacheable_blocks(prompt, self.block_size))

    def get_num_blocks_to_allocate(
        self,
        request_id: str,
        num_tokens: int,
        new_computed_blocks,
        *args,
        apply_admission_cap: bool = False,
        **kwargs,
    ) -> int:
        held = self.req_to_blocks.get(request_id, ())
        ring = self.ring_blocks(request_id)
        need = max(ring - len(held), 0) + self._get_num_evictable_blocks(new_computed_blocks)
        if apply_admission_cap or not request_lengths.caching_allowed(request_id):
            return need  # the full-sequence gate counts rings only: prefix blocks are transient and optional
        have = max(len(held) - ring, 0) + len(new_computed_blocks)
        return need + max(self._prefix_target(request_id, num_tokens) - have, 0)

    def add_local_computed_blocks(
        self, request_id: str, new_computed_blocks, num_local_computed_tokens: int, *args, **kwargs
    ) -> None:
        """A cache hit: keep the hit blocks (touched, so they are not evicted) until the ring is allocated, so the
        request's list stays [ring..., prefix...]."""
        if self.req_to_blocks.get(request_id):
            raise RuntimeError(f"moa-vllm: cache hit for request {request_id!r}, which already holds blocks")
        hits = list(new_computed_blocks)
        if hits:
            self.block_pool.touch(hits)
        self._hits[request_id] = hits
        self.num_cached_block[request_id] = len(hits)

    def allocate_new_blocks(self, request_id: str, num_tokens: int, num_tokens_main_model: int):
        blocks = self.req_to_blocks[request_id]
        ring = self.ring_blocks(request_id)
        new = []
        if len(blocks) < ring:  # admission (or resumption): the whole ring, then the hit's blocks
            new = self.block_pool.get_new_blocks(ring - len(blocks))
            blocks.extend(new)
            blocks.extend(self._hits.pop(request_id, ()))
            self.num_cached_block.setdefault(request_id, 0)
        missing = self._prefix_target(request_id, num_tokens) - (len(blocks) - ring)
        if missing > 0:
            if request_lengths.caching_allowed(request_id):
                prefix = self.block_pool.get_new_blocks(missing)
            else:  # no room was left for them: null columns keep the layout, the forward skips them
                prefix = [self._null_block] * missing
            blocks.extend(prefix)
            new = new + prefix
        return new

    def allocate_external_computed_blocks(self, request_id: str, *args, **kwargs) -> None:
        raise NotImplementedError("moa-vllm: KV connectors (external computed tokens) are not supported")

    def remove_skipped_blocks(self, request_id: str, processed_computed_tokens: int, num_prompt_tokens=None) -> None:
        """Release the prefix blocks whose tokens are committed; they stay cached in the pool until evicted. (The
        ring keeps every block until the request ends.)"""
        blocks = self.req_to_blocks.get(request_id)
        if not self.caching or not blocks:
            return
        ring = self.ring_blocks(request_id)
        done = min(processed_computed_tokens // self.block_size, len(blocks) - ring)
        freed = []
        for i in range(ring + done - 1, ring - 1, -1):  # later blocks first: a prefix's tail is evicted first
            if blocks[i].is_null:
                break
            freed.append(blocks[i])
            blocks[i] = self._null_block
        if freed:
            self.block_pool.free_blocks(freed)

    def get_num_skipped_tokens(self, num_computed_tokens: int) -> int:
        return 0

    def cache_blocks(self, request, num_tokens: int, *args, **kwargs) -> None:
        rid = request.request_id
        if not self.caching or not request_lengths.caching_allowed(rid):
            return
        if getattr(request, "_moa_span_signature", None) is None:  # patches.SIGNATURE_ATTR (no import cycle)
            raise RuntimeError(
                f"moa-vllm: request {rid!r} would cache blocks hashed without its span signature; another request "
                "with other spans could hit them (the admission_lengths patch did not sign it)"
            )
        prefix = self.req_to_blocks[rid][self.ring_blocks(rid) :]
        cached = self.num_cached_block.get(rid, 0)
        full = min(num_tokens // self.block_size, len(prefix))
        if full > cached:
            self.block_pool.cache_full_blocks(request, prefix, cached, full, self.block_size, self.kv_cache_group_id)
            self.num_cached_block[rid] = full

    def pop_blocks_for_free(self, request_id: str) -> list:
        return super().pop_blocks_for_free(request_id) + self._hits.pop(request_id, [])

    @classmethod
    def find_longest_cache_hit(
        cls, block_hashes, max_length, kv_cache_group_ids, block_pool, kv_cache_spec, *args, **kwargs
    ):
        """The longest run of cached prefix blocks from position 0 (their hashes carry the span signature)."""
        hits = tuple([] for _ in kv_cache_group_ids)
        if not kv_cache_spec.prefix_blocks:
            if not cls._logged_no_prefix_cache:
                logger.info("moa-vllm: prefix caching is off for MoA layers")
                cls._logged_no_prefix_cache = True
            return hits, 0
        if block_pool.hash_block_size != kv_cache_spec.block_size:
            raise RuntimeError(
                f"moa-vllm: block hashes of {block_pool.hash_block_size} tokens but MoA blocks of "
                f"{kv_cache_spec.block_size}; prefix blocks must be hashed at their own size"
            )
        for block_hash in islice(block_hashes, max_length // kv_cache_spec.block_size):
            cached = block_pool.get_cached_block(block_hash, kv_cache_group_ids)
            if not cached:
                break
            for group_hits, block in zip(hits, cached, strict=True):
                group_hits.append(block)
        return hits, len(hits[0]) * kv_cache_spec.block_size


def ring_managers(kv_cache_manager) -> list[MoARingManager]:
    """The MoA group's ring manager among a KV cache manager's per-group managers (one for all MoA layers; a list,
    so that an engine without MoA layers gets none)."""
    return [m for m in kv_cache_manager.coordinator.single_type_managers if isinstance(m, MoARingManager)]


def held(manager: MoARingManager, request_id: str) -> int:
    """Real blocks a request holds in the MoA group (its rings and the prefix blocks not yet released)."""
    return sum(not block.is_null for block in manager.req_to_blocks.get(request_id, ()))


def ring_held(manager: MoARingManager, request_id: str) -> int:
    """Ring blocks a request holds in the MoA group (its allocation for life; prefix blocks in flight left out)."""
    blocks = manager.req_to_blocks.get(request_id, ())
    if blocks and request_lengths.is_admitted(request_id) and hasattr(manager.kv_cache_spec, "blocks_for_length"):
        blocks = blocks[: manager.ring_blocks(request_id)]
    return sum(not block.is_null for block in blocks)
