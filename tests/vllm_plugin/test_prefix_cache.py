"""Prefix caching with MoA rings on the real engine: a cache hit gives the greedy tokens of the same request served
with caching off (same spans: the span grid is set explicitly there), for dense, uniform and MoA plans, prefixes
shorter and longer than the spans, hits at block boundaries, mid-ring and within one step; multi-turn chat;
eviction under memory pressure; cache salt; vLLM's own hit counters. (Scheduler-side accounting without an engine:
test_prefix_blocks_manager.py.)"""

from __future__ import annotations

import pytest

from moa_vllm.data import natural_prompt
from moa_vllm.vllm_plugin.settings import DEFAULT_SPAN_GRID
from tests.conftest import PLANS
from tests.vllm_plugin.conftest import close_llm, engine_core, make_llm

pytestmark = pytest.mark.engine

MAX_MODEL_LEN, BLOCK, CHUNK, MAX_TOKENS = 2048, 32, 128, 12  # CPU_ATTN (stock) takes blocks of 32k
PLAN_FILES = {"dense": "dense.json", "uniform": "uniform-d0.25.json", "moa": "moa-d0.25.json"}


def _params(max_tokens: int = MAX_TOKENS):
    from vllm import SamplingParams

    return SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)


def _one(
    llm, prompt: list[int], salt: str | None = None, max_tokens: int = MAX_TOKENS, hint: int | None = None
) -> tuple[list[int], int]:
    item = {"prompt_token_ids": prompt} | ({"cache_salt": salt} if salt else {})
    params = _params(max_tokens)
    if hint is not None:
        params.extra_args = {"moa_span_length": hint}  # the client's span length (vllm_xargs over the API)
    out = llm.generate([item], params, use_tqdm=False)[0]
    return list(out.outputs[0].token_ids), out.num_cached_tokens or 0


def _batch(llm, prompts: list[list[int]]) -> list[tuple[list[int], int]]:
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], _params(), use_tqdm=False)
    return [(list(o.outputs[0].token_ids), o.num_cached_tokens or 0) for o in outs]


@pytest.fixture(scope="module")
def prompts(tokenizer):
    long = natural_prompt(tokenizer, 640, seed=71)  # longer than every d0.25 span at N ~ 800 (~200 tokens)
    short = natural_prompt(tokenizer, 40, seed=72)  # shorter than the spans and than one 64-token sink set
    tail = [natural_prompt(tokenizer, 60 + 7 * i, seed=80 + i) for i in range(6)]
    whole = long[: 640 // BLOCK * BLOCK]  # a prompt of whole blocks: its hit ends at a block boundary
    return {
        "warm": long + tail[0],
        "mid_ring": long + tail[1],  # hits 640 tokens: wrapped rings restored from the prefix blocks
        "short_warm": short + tail[2],
        "short_hit": short + tail[3],  # hits 32 tokens: below every span
        "boundary": whole + tail[4][:32],
        "same_step": [long + tail[5], long + tail[5][:-3] + tail[4][:3]],  # admitted together: one hits the other
    }


CHAT_OUT = 16


def _chat(
    llm, tokenizer, turns: int = 3, start: int = 300, hint: int | None = None
) -> list[tuple[list[int], int, int]]:
    """Each turn = the whole history (earlier prompts and answers) + a new user message: (answer, hit, prompt)."""
    history: list[int] = natural_prompt(tokenizer, start, seed=90)
    out = []
    for t in range(turns):
        history = history + natural_prompt(tokenizer, 40, seed=91 + t)
        answer, cached = _one(llm, history, max_tokens=CHAT_OUT, hint=hint)
        out.append((answer, cached, len(history)))
        history = history + answer
    return out


def _shareable(plan_file: str, prompt: int, earlier: list[int]) -> int:
    """The longest hit a turn may get from the blocks earlier turns cached: up to the narrowest span the two
    requests disagree on (plan/prefix.py), within the earlier prompt's whole blocks."""
    import numpy as np

    from moa_vllm.plan import load_plan
    from moa_vllm.plan.prefix import request_spans
    from moa_vllm.plan.span import served_length

    plan = load_plan(PLANS / plan_file)
    alphas = np.array([[r.alpha for r in layer] for layer in plan.rules])
    betas = np.array([[r.beta for r in layer] for layer in plan.rules])

    def spans(p: int):
        n, cap = served_length(p, CHAT_OUT, MAX_MODEL_LEN, DEFAULT_SPAN_GRID)
        return request_spans(alphas, betas, n, plan.min_span, cap)

    best = 0
    for before in earlier:
        a, b = spans(prompt).ravel(), spans(before).ravel()
        reach = min((min(x, y) for x, y in zip(a, b) if x != y), default=before)
        best = max(best, min(reach, before) // BLOCK * BLOCK)
    return best


HINTED_CHAT_START = 420  # turns of N 476..~620: across the 512-token grid point (grid 1), under one hint


def _serve(llm, prompts, tokenizer, hinted: bool = False) -> dict:
    res = {name: _one(llm, p) for name, p in prompts.items() if name != "same_step"}
    res["same_step"] = _batch(llm, prompts["same_step"])
    res["chat"] = _chat(llm, tokenizer)
    if hinted:
        res["hinted_chat"] = _chat(llm, tokenizer, start=HINTED_CHAT_START, hint=MAX_MODEL_LEN)
    return res


@pytest.fixture(scope="module")
def runs(model_dir, prompts, tokenizer):
    """Every engine of this module, one at a time: per plan caching on (the default) and off with the same spans."""
    res = {}
    common = dict(max_model_len=MAX_MODEL_LEN, block_size=BLOCK, max_num_batched_tokens=CHUNK)
    for name, file in PLAN_FILES.items():
        plan = PLANS / file
        llm = make_llm(model_dir, plan, **common)
        res[name, "on"] = _serve(llm, prompts, tokenizer, hinted=name == "moa")
        core = engine_core(llm)
        res[name, "free"] = core.scheduler.kv_cache_manager.block_pool.get_num_free_blocks()
        res[name, "blocks"] = core.scheduler.kv_cache_manager.block_pool.num_gpu_blocks
        close_llm(llm)
        off = {"moa": {"plan": str(plan), "span_grid": DEFAULT_SPAN_GRID}}
        llm = make_llm(model_dir, plan, enable_prefix_caching=False, additional_config=off, **common)
        res[name, "off"] = _serve(llm, prompts, tokenizer, hinted=name == "moa")
        close_llm(llm)
    llm = make_llm(model_dir, None, **common)  # stock vLLM, its own prefix caching on
    res["stock"] = _serve(llm, prompts, tokenizer)
    close_llm(llm)
    return res


@pytest.mark.parametrize("plan", list(PLAN_FILES))
def test_hits_give_the_tokens_of_caching_off(runs, plan):
    on, off = runs[plan, "on"], runs[plan, "off"]
    assert on["mid_ring"][1] == 640 and on["short_hit"][1] == 32 and on["boundary"][1] == 640
    assert max(c for _, c in on["same_step"]) > 0
    assert all(c == 0 for _, c in off["same_step"]) and off["mid_ring"][1] == 0
    for name in ("warm", "mid_ring", "short_warm", "short_hit", "boundary"):
        assert on[name][0] == off[name][0], f"{plan}: {name} (hit {on[name][1]} tokens)"
    assert [t for t, _ in on["same_step"]] == [t for t, _ in off["same_step"]]


@pytest.mark.parametrize("plan", list(PLAN_FILES))
def test_multi_turn_chat_equals_no_cache(runs, plan):
    """Each turn's N grows, so sparse plans share only what equal spans allow (docs/architecture.md); the dense
    plan's spans always reach the history, so it hits all of it."""
    on, off = runs[plan, "on"]["chat"], runs[plan, "off"]["chat"]
    assert [t for t, _, _ in on] == [t for t, _, _ in off]
    assert on[0][1] == 0
    prompts = [p for _, _, p in on]
    for t in range(1, len(on)):
        assert on[t][1] <= _shareable(PLAN_FILES[plan], prompts[t], prompts[:t]), (t, on[t][1])
    if plan == "dense":
        assert all(c >= 300 for _, c, _ in on[1:]), [c for _, c, _ in on]


def test_a_chat_under_one_span_hint_hits_its_whole_history_and_equals_no_cache(runs):
    """The client's moa_span_length holds every turn's spans still (plan/span.span_length), so each turn hits all
    whole blocks of the previous prompt even where N crosses a grid point; tokens are those of caching off."""
    from moa_vllm.plan.span import span_length
    from moa_vllm.vllm_plugin.settings import DEFAULT_SPAN_GRID

    on, off = runs["moa", "on"]["hinted_chat"], runs["moa", "off"]["hinted_chat"]
    assert [t for t, _, _ in on] == [t for t, _, _ in off]
    prompts = [p for _, _, p in on]
    unhinted = {span_length(p + CHAT_OUT, MAX_MODEL_LEN, DEFAULT_SPAN_GRID) for p in prompts}
    assert len(unhinted) > 1  # without the hint the turns' spans would move
    # turn 0 may hit the unhinted chat's opening blocks (same text, spans that reach them); every later turn hits
    # all whole blocks of the turn before
    assert [c for _, c, _ in on[1:]] == [p // BLOCK * BLOCK for p in prompts[:-1]]
    assert all(c == 0 for _, c, _ in off)


def test_dense_plan_with_hits_equals_stock_vllm_with_its_prefix_cache(runs):
    dense, stock = runs["dense", "on"], runs["stock"]
    for name in ("warm", "mid_ring", "short_warm", "short_hit", "boundary", "chat"):
        got = [t for t, _, _ in dense[name]] if name == "chat" else dense[name][0]
        want = [t for t, _, _ in stock[name]] if name == "chat" else stock[name][0]
        assert got == want, name
    assert dense["mid_ring"][1] == stock["mid_ring"][1] == 640  # the same hits as stock


@pytest.mark.parametrize("plan", list(PLAN_FILES))
def test_every_block_returns_to_the_pool(runs, plan):
    assert runs[plan, "free"] == runs[plan, "blocks"] - 1  # all but the null block: cached ones count as free


@pytest.fixture(scope="module")
def pressure(model_dir, tokenizer):
    """A pool that holds the rings of two requests: caching distinct prompts evicts, concurrent rings evict cache."""
    from vllm import SamplingParams

    plan = PLANS / "moa-d0.25.json"
    common = dict(max_model_len=MAX_MODEL_LEN, block_size=BLOCK, max_num_batched_tokens=CHUNK)
    distinct = [natural_prompt(tokenizer, 700, seed=100 + i) for i in range(5)]
    res = {}
    llm = make_llm(model_dir, plan, num_gpu_blocks_override=900, **common)
    kvm = engine_core(llm).scheduler.kv_cache_manager
    res["sequential"] = [_one(llm, p) for p in distinct]
    res["cached_blocks"] = len(kvm.block_pool.cached_block_hash_to_block)
    res["again"] = _one(llm, distinct[-1])  # the newest prefix survived the evictions
    outs = llm.generate([{"prompt_token_ids": p} for p in distinct], SamplingParams(max_tokens=MAX_TOKENS,
                        temperature=0, ignore_eos=True), use_tqdm=False)  # fmt: skip
    res["concurrent"] = [list(o.outputs[0].token_ids) for o in outs]
    res["salt"] = [_one(llm, distinct[0][:200], salt=s)[1] for s in ("tenant-a", "tenant-b", "tenant-a")]
    res["free"], res["blocks"] = kvm.block_pool.get_num_free_blocks(), kvm.block_pool.num_gpu_blocks
    close_llm(llm)
    off = {"moa": {"plan": str(plan), "span_grid": DEFAULT_SPAN_GRID}}
    llm = make_llm(model_dir, plan, enable_prefix_caching=False, additional_config=off, **common)
    res["reference"] = [_one(llm, p)[0] for p in distinct]
    close_llm(llm)
    return res


def test_eviction_under_memory_pressure_loses_nothing(pressure):
    ref = pressure["reference"]
    assert [t for t, _ in pressure["sequential"]] == ref
    assert pressure["again"] == (ref[-1], 672)  # 700 - 1 tokens -> 21 whole blocks
    assert pressure["concurrent"] == ref  # rings of 5 concurrent requests took the cached blocks' memory
    assert 0 < pressure["cached_blocks"] < 5 * 30 * 21  # older prefixes were evicted
    assert pressure["free"] == pressure["blocks"] - 1


def test_cache_salt_separates_tenants(pressure):
    a, b, a_again = pressure["salt"]
    assert a == 0 and b == 0 and a_again == 192  # 200 - 1 tokens -> 6 whole blocks
