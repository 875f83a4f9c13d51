"""Driving an in-process engine step by step and reading its KV cache manager: shared by the ring cache and tensor
parallel tests."""

from __future__ import annotations

from moa_vllm.vllm_plugin.moa.kv_spec import MoARingManager
from tests.vllm_plugin.conftest import engine_core


def ring_managers(llm) -> list[MoARingManager]:
    managers = engine_core(llm).scheduler.kv_cache_manager.coordinator.single_type_managers
    return [m for m in managers if isinstance(m, MoARingManager)]


def block_pool(llm):
    return engine_core(llm).scheduler.kv_cache_manager.block_pool


def held_ring_blocks(llm, req_id: str) -> list[int]:
    """Ring blocks per layer (prefix caching adds transient prefix columns after them: test_prefix_cache.py)."""
    return [len(m.req_to_blocks[req_id][: m.ring_blocks(req_id)]) if m.req_to_blocks.get(req_id) else 0
            for m in ring_managers(llm)]  # fmt: skip


def greedy_params(max_tokens: int):
    from vllm import SamplingParams

    return SamplingParams(max_tokens=max_tokens, temperature=0, logprobs=5, ignore_eos=True)


def drive(llm, prompts, tag: str, on_step=None) -> tuple[list[str], list[object]]:
    """Add all requests, step the engine to the end; returns vLLM's internal ids and the final CompletionOutputs."""
    engine = llm.llm_engine
    names = [f"{tag}{i}" for i in range(len(prompts))]
    ids = [engine.add_request(name, {"prompt_token_ids": p}, greedy_params(m)) for name, (p, m) in zip(names, prompts)]
    done: dict[str, object] = {}
    step = 0
    while engine.has_unfinished_requests():
        for out in engine.step():  # outputs carry the caller's ids, the scheduler vLLM's internal ones
            if out.finished:
                done[out.request_id] = out.outputs[0]
        if on_step is not None:
            on_step(step, ids)
        step += 1
    return ids, [done[name] for name in names]
