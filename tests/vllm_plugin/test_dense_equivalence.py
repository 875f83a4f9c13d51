"""A dense plan through the moa backend gives the same greedy tokens as stock vLLM (CPU_ATTN)."""

from __future__ import annotations

import pytest

from moa_vllm.data import natural_prompt
from moa_vllm.plan import dense_plan, fingerprint_from_hf_config, load_hf_config, save_plan
from tests.vllm_plugin.conftest import close_llm, make_llm
from tests.vllm_plugin.matching import assert_greedy_close, greedy_top5

pytestmark = pytest.mark.engine

LENGTHS = [12, 150, 700, 1300, 2300]  # one batch of mixed lengths, one over 2k tokens
MAX_TOKENS = 24


@pytest.fixture(scope="module")
def dense_plan_path(model_dir, tmp_path_factory):
    plan = dense_plan(fingerprint_from_hf_config(load_hf_config(model_dir)))
    return save_plan(plan, tmp_path_factory.mktemp("plans") / "dense.json")


def _stock_vs_moa(model_dir, plan, prompts, **engine_kwargs) -> dict:
    """The same batch through stock vLLM and through the moa backend with the dense plan, one engine at a time."""
    results = {}
    for name, plan_path in (("stock", None), ("moa", plan)):
        llm = make_llm(model_dir, plan_path, **engine_kwargs)
        results[name] = greedy_top5(llm, prompts, MAX_TOKENS)
        close_llm(llm)
    return results


@pytest.fixture(scope="module")
def outputs(model_dir, tokenizer, dense_plan_path):
    prompts = [natural_prompt(tokenizer, n, seed=i) for i, n in enumerate(LENGTHS)]
    return _stock_vs_moa(model_dir, dense_plan_path, prompts)


@pytest.mark.parametrize("i", range(len(LENGTHS)))
def test_dense_plan_matches_stock(outputs, i):
    (a, a5), (b, b5) = outputs["stock"][i], outputs["moa"][i]
    assert len(a) == len(b) == MAX_TOKENS
    assert_greedy_close(a, a5, b, b5, f"prompt of {LENGTHS[i]} tokens")


def test_dense_plan_matches_stock_exactly_on_most_prompts(outputs):
    """float32 on both sides: rounding-level divergence is allowed by convention, but must stay rare."""
    exact = sum(outputs["stock"][i][0] == outputs["moa"][i][0] for i in range(len(LENGTHS)))
    assert exact >= len(LENGTHS) - 1


BF16_LENGTHS = [20, 300, 900]


@pytest.fixture(scope="module")
def bf16_outputs(model_dir, tokenizer, dense_plan_path):
    prompts = [natural_prompt(tokenizer, n, seed=50 + i) for i, n in enumerate(BF16_LENGTHS)]
    return _stock_vs_moa(model_dir, dense_plan_path, prompts, dtype="bfloat16", max_model_len=1024)


@pytest.mark.parametrize("i", range(len(BF16_LENGTHS)))
def test_dense_plan_matches_stock_bf16(bf16_outputs, i):
    (a, a5), (b, b5) = bf16_outputs["stock"][i], bf16_outputs["moa"][i]
    assert_greedy_close(a, a5, b, b5, f"bf16 prompt of {BF16_LENGTHS[i]} tokens")
