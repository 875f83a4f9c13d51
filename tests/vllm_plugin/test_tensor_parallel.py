"""Tensor parallelism on the CPU wheel: TP=3 for the embedded model (3 KV heads, one per rank; threads bound per
rank) gives the same greedy tokens as TP=1 with a sparse MoA plan, and each rank holds only its own head's ring:
every layer's spec is one KV head wide and a request holds exactly the widest single head's pages per layer
(ranks share block ids), not the three heads' pages a TP=1 rank holds."""

from __future__ import annotations

import os

import pytest

from moa_vllm.data import natural_prompt
from moa_vllm.plan import load_plan
from moa_vllm.plan.span import served_length
from moa_vllm.vllm_plugin.settings import DEFAULT_SPAN_GRID
from tests.conftest import PLANS
from tests.vllm_plugin.conftest import close_llm, make_llm
from tests.vllm_plugin.engine_drive import drive, held_ring_blocks, ring_managers

pytestmark = pytest.mark.engine

PLAN = PLANS / "moa-d0.25.json"
MAX_MODEL_LEN = 1024
BLOCK = 32
PROMPTS = [(700, 24), (300, 24)]


@pytest.fixture(scope="module")
def prompts(tokenizer):
    return [(natural_prompt(tokenizer, n, seed=70 + i), m) for i, (n, m) in enumerate(PROMPTS)]


def _run(model_dir, prompts, tp: int):
    held: dict[str, list[int]] = {}
    env = {"VLLM_CPU_OMP_THREADS_BIND": "0|1|0"} if tp == 3 else {}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        llm = make_llm(model_dir, PLAN, max_model_len=MAX_MODEL_LEN, block_size=BLOCK, tensor_parallel_size=tp)
        specs = [m.kv_cache_spec for m in ring_managers(llm)]

        def record(step, ids):
            for rid in ids:
                held.setdefault(rid, held_ring_blocks(llm, rid))

        ids, outs = drive(llm, prompts, f"tp{tp}-", record)
        close_llm(llm)
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return [list(o.token_ids) for o in outs], [held[i] for i in ids], specs


@pytest.fixture(scope="module")
def runs(model_dir, prompts):
    return {tp: _run(model_dir, prompts, tp) for tp in (1, 3)}


def test_tp3_gives_the_tp1_greedy_tokens(runs):
    assert runs[3][0] == runs[1][0]


def test_each_rank_holds_only_its_heads_rings(runs):
    plan = load_plan(PLAN)
    _, held, specs = runs[3]
    assert all(spec.num_kv_heads == 1 and spec.tp_size == 3 for spec in specs)
    for (prompt, max_tokens), blocks in zip(PROMPTS, held):
        n = served_length(prompt, max_tokens, MAX_MODEL_LEN, DEFAULT_SPAN_GRID)
        spans = plan.spans(*n)  # ranks share block ids: the widest rank's group blocks (one KV head each here)
        widest_rank = max(-(-sum(-(-layer[h] // BLOCK) for layer in spans) // len(spans)) for h in range(3))
        assert blocks == [widest_rank]
    _, held1, specs1 = runs[1]
    assert all(spec.num_kv_heads == 3 for spec in specs1)
    for (prompt, max_tokens), blocks in zip(PROMPTS, held1):
        n = served_length(prompt, max_tokens, MAX_MODEL_LEN, DEFAULT_SPAN_GRID)
        spans = plan.spans(*n)
        layer_pages = [-(-sum(-(-s // BLOCK) for s in layer) // 3) for layer in spans]
        assert blocks == [-(-sum(layer_pages) // len(spans))]
