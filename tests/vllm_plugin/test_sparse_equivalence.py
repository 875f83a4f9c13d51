"""Sparse plans through vLLM equal an independent HF reference with the same per-head masks; chunked prefill
equals unchunked. (Block accounting of the ring cache: test_ring_cache.py.)"""

from __future__ import annotations

import pytest

from moa_vllm.data import natural_prompt
from moa_vllm.plan import fingerprint_from_hf_config, load_hf_config, load_plan, save_plan
from moa_vllm.plan.span import served_length
from tests.conftest import PLANS
from tests.vllm_plugin.conftest import close_llm, make_llm
from tests.vllm_plugin.hf_reference import ReferenceLM
from tests.vllm_plugin.matching import assert_greedy_close, first_divergence
from tests.vllm_plugin.plans import heterogeneous_plan

pytestmark = pytest.mark.engine

MAX_MODEL_LEN = 2048
PROMPT_LENGTHS = [600, 950]
MAX_TOKENS = 40
LOGPROB_TOL = 1e-3


def _generate(llm, prompts, max_tokens=MAX_TOKENS):
    from vllm import SamplingParams

    params = SamplingParams(max_tokens=max_tokens, temperature=0, logprobs=5, ignore_eos=True)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    top5 = [[sorted(lp, key=lambda t: -lp[t].logprob)[:5] for lp in o.outputs[0].logprobs] for o in outs]
    chosen = [[lp[t].logprob for t, lp in zip(o.outputs[0].token_ids, o.outputs[0].logprobs)] for o in outs]
    return [(list(o.outputs[0].token_ids), t5, c) for o, t5, c in zip(outs, top5, chosen)]


@pytest.fixture(scope="module")
def prompts(tokenizer):
    return [natural_prompt(tokenizer, n, seed=10 + i) for i, n in enumerate(PROMPT_LENGTHS)]


@pytest.fixture(scope="module")
def hetero_plan_path(model_dir, tmp_path_factory):
    fp = fingerprint_from_hf_config(load_hf_config(model_dir))
    return save_plan(heterogeneous_plan(fp), tmp_path_factory.mktemp("plans") / "hetero.json")


def _exact(plan) -> dict:
    """Spans at each request's own N (span grid 0): the short prompts stay sparse, so the masks cut context."""
    return {"moa": {"plan": str(plan), "span_grid": 0}}


@pytest.fixture(scope="module")
def runs(model_dir, prompts, hetero_plan_path):
    """All engine work of this module, one engine at a time."""
    res = {}
    llm = make_llm(model_dir, PLANS / "uniform-d0.25.json", max_model_len=MAX_MODEL_LEN, block_size=32,
                   additional_config=_exact(PLANS / "uniform-d0.25.json"))  # fmt: skip
    res["uniform"] = _generate(llm, prompts)
    close_llm(llm)
    llm = make_llm(model_dir, hetero_plan_path, max_model_len=MAX_MODEL_LEN, additional_config=_exact(hetero_plan_path))
    res["hetero"] = _generate(llm, prompts)
    close_llm(llm)
    llm = make_llm(
        model_dir,
        hetero_plan_path,
        max_model_len=MAX_MODEL_LEN,
        max_num_batched_tokens=96,
        max_num_seqs=4,
        enable_chunked_prefill=True,
        additional_config=_exact(hetero_plan_path),
    )
    res["hetero_chunked"] = _generate(llm, prompts)
    close_llm(llm)
    return res


@pytest.fixture(scope="module")
def reference(model_dir):
    return ReferenceLM(model_dir)


@pytest.mark.parametrize("i", range(len(PROMPT_LENGTHS)))
@pytest.mark.parametrize("which", ["uniform", "hetero"])
def test_sparse_plan_matches_reference(runs, reference, prompts, hetero_plan_path, which, i):
    plan = load_plan(PLANS / "uniform-d0.25.json" if which == "uniform" else hetero_plan_path)
    n = served_length(len(prompts[i]), MAX_TOKENS, MAX_MODEL_LEN, 0)
    assert max(s for layer in plan.spans(*n) for s in layer) < len(prompts[i])  # the masks really cut context
    ref = reference.greedy(prompts[i], MAX_TOKENS, plan, MAX_MODEL_LEN, span_grid=0)
    tokens, top5, logprobs = runs[which][i]
    assert len(tokens) == MAX_TOKENS
    assert_greedy_close(tokens, top5, ref.tokens, ref.top5, f"{which} plan, prompt {i}")
    # float32 on both sides: the chosen tokens' log-probabilities agree closely up to any divergence
    same = first_divergence(tokens, ref.tokens) or MAX_TOKENS
    err = max(abs(a - b) for a, b in zip(logprobs[:same], ref.logprobs[:same]))
    print(f"{which} prompt {i}: {same} identical tokens, max |logprob diff| {err:.2e}")
    assert err < LOGPROB_TOL


@pytest.mark.parametrize("i", range(len(PROMPT_LENGTHS)))
def test_chunked_prefill_matches_unchunked(runs, i):
    (a, a5, _), (b, b5, _) = runs["hetero"][i], runs["hetero_chunked"][i]
    assert_greedy_close(a, a5, b, b5, f"chunked vs unchunked, prompt {i}")


def test_sparse_differs_from_dense_somewhere(runs):
    """Guard against a backend that silently ignores the plan: the two plans must not agree everywhere."""
    assert [r[0] for r in runs["uniform"]] != [r[0] for r in runs["hetero"]]
