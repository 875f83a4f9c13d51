"""The per-KV-head ring cache inside vLLM: allocation fixed at admission and equal to the plan's formula, rings that
wrap many times still match the reference, requests with different N in one batch, forced preemption, and every
block back in the pool afterwards. Everything is read from the engine's own KV cache manager."""

from __future__ import annotations

import time

import pytest

from moa_vllm.data import natural_prompt
from moa_vllm.plan import Plan, PlanMetadata, Rule, fingerprint_from_hf_config, load_hf_config, save_plan
from moa_vllm.plan.ring import group_blocks, layer_blocks
from moa_vllm.plan.span import served_length
from moa_vllm.vllm_plugin.settings import DEFAULT_SPAN_GRID
from tests.vllm_plugin.conftest import close_llm, engine_core, make_llm
from tests.vllm_plugin.engine_drive import block_pool, drive, held_ring_blocks, ring_managers
from tests.vllm_plugin.hf_reference import ReferenceLM
from tests.vllm_plugin.matching import assert_greedy_close

pytestmark = pytest.mark.engine

MAX_MODEL_LEN = 1024
BLOCK = 32
PROMPTS = [(300, 120), (120, 120), (520, 30)]  # (prompt tokens, max_tokens): three different N in one batch
SINKS = 8


def narrow_plan(fp) -> Plan:
    """Small windows, different per KV head (8..28 tokens at these N): 120 generated tokens wrap each ring 4-15x.
    Even layers fit each ring in one 32-token page (one block of 3 head pages per request); odd layers have a
    36-token ring that takes two pages, so 4 pages, two blocks."""
    narrow, wide = ((12, 0.0), (16, 0.0), (20, 0.01)), ((30, 0.0), (32, 0.0), (36, 0.0))
    rules = [
        [Rule(alpha=a, beta=b) for a, b in (wide if layer % 2 else narrow[layer % 3 :] + narrow[: layer % 3])]
        for layer in range(fp.num_layers)
    ]
    meta = PlanMetadata(method="hand-made", tool_version="test")
    return Plan(model=fp, sink_tokens=SINKS, min_span=16, rules=rules, metadata=meta)


def _top5(output) -> list[list[int]]:
    return [sorted(lp, key=lambda t: -lp[t].logprob)[:5] for lp in output.logprobs]


@pytest.fixture(scope="module")
def plan(model_dir) -> Plan:
    return narrow_plan(fingerprint_from_hf_config(load_hf_config(model_dir)))


@pytest.fixture(scope="module")
def prompts(tokenizer):
    return [(natural_prompt(tokenizer, n, seed=40 + i), m) for i, (n, m) in enumerate(PROMPTS)]


@pytest.fixture(scope="module")
def runs(model_dir, plan, prompts, tmp_path_factory):
    path = save_plan(plan, tmp_path_factory.mktemp("plans") / "narrow.json")
    llm = make_llm(model_dir, path, max_model_len=MAX_MODEL_LEN, block_size=BLOCK)
    res: dict[str, object] = {"free_at_start": block_pool(llm).get_num_free_blocks()}
    traces: dict[str, list[list[int]]] = {}

    def record(step, ids):
        for rid in ids:
            traces.setdefault(rid, []).append(held_ring_blocks(llm, rid))

    res["plain"] = drive(llm, prompts, "plain", record)
    res["traces"] = traces
    res["free_after_plain"] = block_pool(llm).get_num_free_blocks()

    preempted: dict[str, object] = {}

    def preempt_once(step, ids):
        sched = engine_core(llm).scheduler
        victim = next((r for r in sched.running if r.request_id == ids[0]), None)
        if step == 30 and victim is not None and victim.num_output_tokens > 10:
            held_before = sum(held_ring_blocks(llm, victim.request_id))
            free_before = block_pool(llm).get_num_free_blocks()
            sched.running.remove(victim)
            sched._preempt_request(victim, time.monotonic())  # what the scheduler itself does under pressure
            preempted.update(
                held=held_before,
                freed=block_pool(llm).get_num_free_blocks() - free_before,
                tokens_before=victim.num_output_tokens,
            )

    res["preempted_run"] = drive(llm, prompts, "again", preempt_once)
    res["preempted"] = preempted
    res["free_after_preempted"] = block_pool(llm).get_num_free_blocks()
    res["page_bytes"] = ring_managers(llm)[0].kv_cache_spec.page_size_bytes
    close_llm(llm)
    return res


def test_blocks_equal_the_plan_formula_and_never_change(runs, plan, prompts):
    for rid, (prompt, max_tokens) in zip(runs["plain"][0], prompts):
        n, cap = served_length(len(prompt), max_tokens, MAX_MODEL_LEN, DEFAULT_SPAN_GRID)
        per_layer = [
            layer_blocks([r.alpha for r in rules], [r.beta for r in rules], n, plan.min_span, BLOCK, len(rules), cap)
            for rules in plan.rules
        ]
        want = [group_blocks(per_layer, len(plan.rules))]  # one group: every layer's layer pages in its blocks
        trace = [t for t in runs["traces"][rid] if any(t)]  # steps while the request was admitted
        assert trace, "request never held blocks"
        assert all(t == want for t in trace), f"N={n}: held {trace[0]} vs plan {want}"
        assert len(set(per_layer)) > 1  # the plan really gives layers different sizes


def test_every_block_returns_to_the_pool(runs):
    assert runs["free_after_plain"] == runs["free_at_start"]
    assert runs["free_after_preempted"] == runs["free_at_start"]


def test_rings_wrap_and_still_match_the_reference(runs, plan, prompts, model_dir):
    ref = ReferenceLM(model_dir)
    for i, (out, (prompt, max_tokens)) in enumerate(zip(runs["plain"][1], prompts)):
        n, cap = served_length(len(prompt), max_tokens, MAX_MODEL_LEN, DEFAULT_SPAN_GRID)
        widest = max(w for layer in plan.windows(n, cap) for w in layer)
        assert max_tokens >= 4 * widest or max_tokens < 100  # the long generations wrap every ring 4x or more
        want = ref.greedy(prompt, max_tokens, plan, MAX_MODEL_LEN)
        assert_greedy_close(list(out.token_ids), _top5(out), want.tokens, want.top5, f"request {i} (N={n})")


def test_forced_preemption_recomputes_the_same_tokens(runs):
    info = runs["preempted"]
    assert info, "the preemption hook never fired"
    assert info["freed"] == info["held"] > 0  # every block of the victim went back at once
    plain = [list(o.token_ids) for o in runs["plain"][1]]
    again = [list(o.token_ids) for o in runs["preempted_run"][1]]
    assert again == plain
