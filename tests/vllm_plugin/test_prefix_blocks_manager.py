"""Prefix caching inside vLLM's real KVCacheManager and BlockPool (no engine): prefix columns after the ring,
released once computed and kept cached, hits only under equal span signatures, optional when the pool is full."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from moa_vllm.plan.prefix import cacheable_blocks
from moa_vllm.plan.ring import cdiv, group_blocks, layer_blocks
from moa_vllm.plan.span import served_length

BLOCK, HEADS, MAX_LEN, GRID = 16, 3, 1024, 8
RULES = [((0.0, 32.0, 100.0), (0.25, 0.0, 0.5)), ((64.0, 64.0, 64.0), (0.0, 0.0, 0.0))]  # (alphas, betas) per layer
MIN_SPAN, SINKS = 16, 4


def _manager(num_blocks: int = 400):
    import moa_vllm

    moa_vllm.register()
    from vllm.v1.core.kv_cache_manager import KVCacheManager
    from vllm.v1.kv_cache_interface import KVCacheConfig, KVCacheGroupSpec

    from moa_vllm.vllm_plugin.moa.kv_spec import MoARingSpec

    groups = [
        KVCacheGroupSpec(
            [f"model.layers.{i}.self_attn.attn" for i in range(len(RULES))],
            MoARingSpec(
                block_size=BLOCK,
                num_kv_heads=HEADS,
                head_size=8,
                dtype=torch.float32,
                sink_tokens=SINKS,
                min_span=MIN_SPAN,
                alphas=tuple(a for a, _ in RULES),
                betas=tuple(b for _, b in RULES),
                span_grid=GRID,
                prefix_blocks=True,
            ),  # fmt: skip
        )
    ]
    config = KVCacheConfig(num_blocks=num_blocks, kv_cache_tensors=[], kv_cache_groups=groups)
    return KVCacheManager(
        config, max_model_len=MAX_LEN, scheduler_block_size=BLOCK, hash_block_size=BLOCK, enable_caching=True
    )


@pytest.fixture()
def manager():
    return _manager()


def _hasher():
    """vLLM's own request block hasher, as EngineCore makes it: the scheduler-side patch signs requests."""
    from vllm.utils.hashing import sha256
    from vllm.v1.core.kv_cache_utils import get_request_block_hasher, init_none_hash

    init_none_hash(sha256)
    return get_request_block_hasher(BLOCK, sha256)


def _request(rid: str, tokens: list[int], max_tokens: int, salt: str | None = None):
    from vllm import SamplingParams
    from vllm.v1.request import Request

    return Request(rid, tokens, SamplingParams(max_tokens=max_tokens), None, cache_salt=salt, block_hasher=_hasher())


def _spans(served: tuple[int, int]) -> list[int]:
    from moa_vllm.plan.prefix import request_spans

    n, cap = served
    alphas, betas = np.array([a for a, _ in RULES]), np.array([b for _, b in RULES])
    return request_spans(alphas, betas, n, MIN_SPAN, cap).ravel().tolist()


def _ring(n: int) -> list[int]:
    """The one group's ring blocks (every layer's layer pages, one block holding a page of each layer)."""
    n, cap = served_length(n, 0, MAX_LEN, GRID)
    return [group_blocks([layer_blocks(a, b, n, MIN_SPAN, BLOCK, HEADS, cap) for a, b in RULES], len(RULES))]


def _schedule(manager, req, chunk: int):
    """What the scheduler does for one chunk: look up hits on first admission, allocate, advance."""
    hit_blocks, hit = (None, 0)
    if req.num_computed_tokens == 0:
        hit_blocks, hit = manager.get_computed_blocks(req)[:2]
    out = manager.allocate_slots(req, chunk, hit, hit_blocks)
    assert out is not None
    req.num_computed_tokens += hit + chunk
    return hit


def _prefill(manager, req, chunk: int = 64) -> int:
    hit = 0
    while req.num_computed_tokens < req.num_prompt_tokens:
        left = req.num_prompt_tokens - req.num_computed_tokens
        if req.num_computed_tokens == 0:
            probe = manager.get_computed_blocks(req)[1]
            left -= probe
        hit += _schedule(manager, req, min(chunk, left))
    manager.allocate_slots(req, 1)  # the next step (decode) releases the last prefix blocks
    return hit


def _columns(manager, rid: str) -> list[list[int]]:
    from moa_vllm.vllm_plugin.moa.kv_spec import ring_managers

    return [[b.block_id for b in m.req_to_blocks[rid][m.ring_blocks(rid) :]] for m in ring_managers(manager)]


def test_prefix_columns_follow_the_ring_and_are_released_once_computed(manager):
    pool = manager.block_pool
    free0 = pool.get_num_free_blocks()
    req = _request("a", list(range(300)), 100)
    _schedule(manager, req, 64)
    ring = _ring(400)
    blocks = manager.coordinator.get_blocks("a")
    assert [len(b) for b in blocks] == [r + 4 for r in ring]  # ring first, then one column per prompt block reached
    _schedule(manager, req, 64)
    cols = _columns(manager, "a")
    assert all(c[:4] == [0] * 4 and 0 not in c[4:8] for c in cols)  # the first chunk's blocks were released
    _prefill(manager, req)
    cols = _columns(manager, "a")
    assert [len(c) for c in cols] == [cacheable_blocks(300, BLOCK)] and all(set(c) == {0} for c in cols)
    assert free0 - pool.get_num_free_blocks() == sum(ring)  # only the rings are held; cached blocks count as free
    assert len(pool.cached_block_hash_to_block) == cacheable_blocks(300, BLOCK)  # one block: every layer's page
    manager.free(req)
    assert pool.get_num_free_blocks() == free0


def test_a_hit_needs_the_same_tokens_and_spans(manager):
    shared = list(range(1000, 1200))  # 12 full blocks, then different suffixes
    a = _request("a", shared + list(range(60)), 100)
    _prefill(manager, a)
    same = _request("b", shared + list(range(500, 540)), 110)  # N 350 vs 360: one grid step -> same spans
    assert served_length(240, 110, MAX_LEN, GRID)[0] == served_length(260, 100, MAX_LEN, GRID)[0]
    assert _prefill(manager, same) == 192  # 12 blocks
    assert _columns(manager, "b") == [[0] * cacheable_blocks(240, BLOCK)]
    other_spans = _request("c", shared + list(range(500, 540)), 700)  # N 940: wider spans on the beta > 0 heads
    hit = _prefill(manager, other_spans)
    # a block ending at e is shared iff every head's spans agree or both reach e
    s1, s2 = (_spans(served_length(n, m, MAX_LEN, GRID)) for n, m in ((260, 100), (240, 700)))
    reach = min(min(x, y) for x, y in zip(s1, s2) if x != y)
    assert 0 < hit == reach // BLOCK * BLOCK < 192
    salted = _request("d", shared + list(range(60)), 100, salt="tenant-2")
    assert _prefill(manager, salted) == 0  # the cache salt separates tenants


def test_a_hit_leaving_one_token_gives_back_a_block(manager):
    a = _request("a", list(range(160)), 20)
    _prefill(manager, a)
    again = _request("b", list(range(161)), 19)  # the first 160 tokens (10 blocks) are cached
    blocks, hit = manager.get_computed_blocks(again)[:2]
    assert hit == 144  # 160 would leave a one-token first step (a "decode" row): one block is given back
    assert [len(g) for g in blocks.blocks] == [9]
    exact = _request("e", list(range(160)), 20)  # vLLM itself stops at 159 tokens -> 9 blocks, 16 tokens left
    assert manager.get_computed_blocks(exact)[1] == 144


def test_no_room_for_prefix_blocks_means_no_caching_not_waiting():
    from moa_vllm.vllm_plugin.moa import request_lengths

    ring = sum(_ring(400))
    manager = _manager(num_blocks=ring + 3)  # the ring fits, a 64-token chunk's 4 prefix blocks do not
    req = _request("a", list(range(300)), 100)
    assert manager.allocate_slots(req, 64) is not None
    assert not request_lengths.caching_allowed("a")
    assert _columns(manager, "a") == [[0] * 4]  # null columns keep the layout
    req.num_computed_tokens = 64
    assert manager.allocate_slots(req, 64) is not None and _columns(manager, "a") == [[0] * 8]
    assert len(manager.block_pool.cached_block_hash_to_block) == 0
    manager.free(req)
    assert request_lengths.caching_allowed("a")  # forgotten with the request


def test_block_table_width_counts_the_prefix_columns(manager):
    spec = manager.kv_cache_config.kv_cache_groups[0].kv_cache_spec
    assert spec.max_num_blocks_per_req(None, MAX_LEN) == spec.blocks_for_length(MAX_LEN) + cdiv(MAX_LEN, BLOCK)
    assert spec.prefix_cacheable


def test_requests_are_signed_before_their_hashes_are_used(manager):
    from moa_vllm.vllm_plugin.patches import is_signed

    req = _request("a", list(range(100)), 20)
    unsigned = list(req.block_hashes)
    manager.get_computed_blocks(req)
    assert is_signed(req) and len(req.block_hashes) == len(unsigned) and req.block_hashes != unsigned


def test_an_unsigned_request_never_caches(manager):
    from moa_vllm.vllm_plugin.moa.kv_spec import ring_managers

    req = _request("a", list(range(100)), 20)
    assert manager.allocate_slots(req, 64) is not None  # signed on the way in
    bare = _request("b", list(range(100)), 20)
    with pytest.raises(RuntimeError, match="without its span signature"):
        ring_managers(manager)[0].cache_blocks(bare, 64)
