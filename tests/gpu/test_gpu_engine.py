"""On a CUDA GPU with the vLLM GPU wheel (skipped elsewhere; benchmarks/gpu/run.sh runs them): a dense plan gives
stock FLASH_ATTN's greedy tokens, sparse plans (one-shot and chunked prefill, i.e. the Triton ring prefill kernel
and vLLM's Triton decode over rings) equal the independent HF reference with the same masks, and CUDA graphs
change nothing."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from moa_vllm.data import natural_prompt
from moa_vllm.plan import dense_plan, fingerprint_from_hf_config, load_hf_config, load_plan, save_plan
from tests.conftest import PLANS
from tests.vllm_plugin.conftest import close_llm, make_llm
from tests.vllm_plugin.matching import assert_greedy_close
from tests.vllm_plugin.plans import heterogeneous_plan

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        not torch.cuda.is_available() or importlib.util.find_spec("vllm") is None,
        reason="needs a CUDA GPU and the vLLM GPU wheel (benchmarks/gpu/run.sh)",
    ),
]

MAX_MODEL_LEN = 4096
MAX_TOKENS = 32


def _run(llm, prompts):
    from vllm import SamplingParams

    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0, logprobs=5, ignore_eos=True)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    top5 = [[sorted(lp, key=lambda t: -lp[t].logprob)[:5] for lp in o.outputs[0].logprobs] for o in outs]
    return [(list(o.outputs[0].token_ids), t5) for o, t5 in zip(outs, top5)]


def _engine(model_dir, plan=None, **kwargs):
    base = dict(max_model_len=MAX_MODEL_LEN, dtype="bfloat16", enforce_eager=False, gpu_memory_utilization=0.3)
    if plan is None:
        base["attention_backend"] = "FLASH_ATTN"
    return make_llm(model_dir, plan, **{**base, **kwargs})


@pytest.fixture(scope="module")
def prompts(tokenizer):
    return [natural_prompt(tokenizer, n, seed=40 + i) for i, n in enumerate([12, 700, 1900, 3500])]


@pytest.fixture(scope="module")
def plan_paths(model_dir, tmp_path_factory):
    fp = fingerprint_from_hf_config(load_hf_config(model_dir))
    folder = tmp_path_factory.mktemp("plans")
    return {
        "dense": save_plan(dense_plan(fp), folder / "dense.json"),
        "hetero": save_plan(heterogeneous_plan(fp), folder / "hetero.json"),
        "uniform": PLANS / "uniform-d0.25.json",
    }


def _both(model_dir, prompts, first: dict, second: dict):
    out = []
    for kwargs in (first, second):
        llm = _engine(model_dir, **kwargs)
        out.append(_run(llm, prompts))
        close_llm(llm)
    return out


@pytest.mark.engine
def test_dense_plan_equals_stock_flash_attn(model_dir, prompts, plan_paths):
    stock, moa = _both(model_dir, prompts, {}, {"plan": plan_paths["dense"]})
    for i, ((a, a5), (b, b5)) in enumerate(zip(stock, moa)):
        assert_greedy_close(a, a5, b, b5, f"prompt {i}")


@pytest.mark.engine
@pytest.mark.parametrize("which", ["uniform", "hetero"])
def test_sparse_plan_equals_the_reference(model_dir, prompts, plan_paths, which):
    from tests.vllm_plugin.hf_reference import ReferenceLM

    plan = load_plan(plan_paths[which])
    one_shot, chunked = _both(
        model_dir,
        prompts,
        {"plan": plan_paths[which], "dtype": "float32"},
        {"plan": plan_paths[which], "dtype": "float32", "max_num_batched_tokens": 256, "enable_chunked_prefill": True},
    )
    reference = ReferenceLM(model_dir)
    for i, prompt in enumerate(prompts):
        ref = reference.greedy(prompt, MAX_TOKENS, plan, MAX_MODEL_LEN)
        for label, (tokens, top5) in (("one-shot", one_shot[i]), ("chunked", chunked[i])):
            assert_greedy_close(tokens, top5, ref.tokens, ref.top5, f"{which} {label} prompt {i}")


@pytest.mark.engine
def test_cuda_graphs_change_nothing(model_dir, prompts, plan_paths):
    graphs, eager = _both(
        model_dir,
        prompts,
        {"plan": plan_paths["uniform"]},
        {"plan": plan_paths["uniform"], "enforce_eager": True},
    )
    for i, ((a, a5), (b, b5)) in enumerate(zip(graphs, eager)):
        assert_greedy_close(a, a5, b, b5, f"prompt {i}")
