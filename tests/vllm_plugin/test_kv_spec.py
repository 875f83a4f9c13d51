"""The ring spec and manager inside vLLM's real KVCacheManager (no engine): admission takes the plan's blocks once,
for all MoA layers in one KV cache group."""

from __future__ import annotations

import pytest
import torch

from moa_vllm.plan.ring import group_blocks, layer_blocks

BLOCK, HEADS, MAX_LEN = 16, 3, 1024
RULES = [((0.0, 32.0, 100.0), (0.25, 0.0, 0.5)), ((64.0, 64.0, 64.0), (0.0, 0.0, 0.0))]  # (alphas, betas) per layer


@pytest.fixture()
def manager():
    import moa_vllm

    moa_vllm.register()  # the patches and the spec registry entry, as in a real vLLM process
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
                sink_tokens=4,
                min_span=16,
                alphas=tuple(a for a, _ in RULES),
                betas=tuple(b for _, b in RULES),
            ),
        )
    ]
    config = KVCacheConfig(num_blocks=200, kv_cache_tensors=[], kv_cache_groups=groups)
    return KVCacheManager(
        config, max_model_len=MAX_LEN, scheduler_block_size=BLOCK, hash_block_size=BLOCK, enable_caching=False
    )


def _request(rid: str, prompt: int, max_tokens: int):
    from vllm import SamplingParams
    from vllm.v1.request import Request

    return Request(rid, list(range(prompt)), SamplingParams(max_tokens=max_tokens), None)


def _want(n: int) -> list[int]:
    """The group's blocks: every layer's layer pages one after another, in blocks of one page per layer."""
    return [group_blocks([layer_blocks(a, b, n, 16, BLOCK, HEADS) for a, b in RULES], len(RULES))]


def test_admission_takes_the_plan_blocks_once_and_free_returns_them(manager):
    from moa_vllm.vllm_plugin.patches import held_blocks

    pool = manager.block_pool
    free0 = pool.get_num_free_blocks()
    req = _request("a", prompt=300, max_tokens=100)  # N = 400
    assert manager.allocate_slots(req, num_new_tokens=64) is not None  # first prefill chunk only
    want = _want(400)
    assert [len(b) for b in manager.coordinator.get_blocks("a")] == want
    assert held_blocks(manager, "a") == sum(want) == free0 - pool.get_num_free_blocks()
    req.num_computed_tokens = 399  # prefill and decode up to the last position: nothing more is ever needed
    assert manager.allocate_slots(req, num_new_tokens=1) is not None
    assert held_blocks(manager, "a") == sum(want)
    manager.free(req)
    assert pool.get_num_free_blocks() == free0


def test_different_n_gets_different_sizes_and_a_full_pool_refuses(manager):
    small, large = _request("s", 50, 10), _request("l", 900, 100)
    assert manager.allocate_slots(small, 16) is not None and manager.allocate_slots(large, 16) is not None
    assert [len(b) for b in manager.coordinator.get_blocks("s")] == _want(60)
    assert [len(b) for b in manager.coordinator.get_blocks("l")] == _want(1000)
    assert _want(60) != _want(1000)
    free = manager.block_pool.get_num_free_blocks()
    too_many = [_request(f"x{i}", 900, 100) for i in range(free // sum(_want(1000)) + 1)]
    results = [manager.allocate_slots(r, 16) for r in too_many]
    assert results[-1] is None  # admission refuses a request whose whole ring does not fit
    assert all(r is not None for r in results[:-1])


def test_unknown_request_length_is_a_clear_error():
    from moa_vllm.vllm_plugin.moa import request_lengths

    with pytest.raises(RuntimeError, match="no request length recorded for request 'nope'"):
        request_lengths.admitted("nope")
