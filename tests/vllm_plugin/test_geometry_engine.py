"""The engine at the attention geometry of the models people serve: a random llama with 32 query heads, 8 KV heads
(GQA 4) and head dim 128 (2 layers, a narrow residual stream: attention shapes are what matter here), through real
vLLM. A dense plan gives stock vLLM's greedy tokens; a heterogeneous plan (8 per-KV-head virtual sequences per layer
per request) gives the independent HF reference's."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from moa_vllm.data import natural_prompt
from moa_vllm.plan import dense_plan, fingerprint_from_hf_config, load_hf_config, load_plan, save_plan
from moa_vllm.plan.span import served_length
from moa_vllm.vllm_plugin.settings import DEFAULT_SPAN_GRID
from tests.planner.tiny_llama import tiny_tokenizer
from tests.vllm_plugin.conftest import close_llm, make_llm
from tests.vllm_plugin.hf_reference import ReferenceLM
from tests.vllm_plugin.matching import assert_greedy_close, greedy_top5
from tests.vllm_plugin.plans import heterogeneous_plan

pytestmark = pytest.mark.engine

HEADS, KV_HEADS, HEAD_DIM = 32, 8, 128
MAX_MODEL_LEN = 1024
PROMPT_LENGTHS = [40, 500, 900]
MAX_TOKENS = 16


@pytest.fixture(scope="module")
def gqa4_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("gqa4-d128")
    tokenizer = tiny_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=2,
        num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS,
        head_dim=HEAD_DIM,
        max_position_embeddings=MAX_MODEL_LEN,
        initializer_range=0.1,  # peaked logits: greedy ties are rare in a random model
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def plans(gqa4_dir, tmp_path_factory) -> dict[str, Path]:
    fp = fingerprint_from_hf_config(load_hf_config(gqa4_dir))
    assert (fp.num_kv_heads, fp.num_query_heads, fp.head_dim) == (KV_HEADS, HEADS, HEAD_DIM)
    folder = tmp_path_factory.mktemp("plans")
    return {
        "dense": save_plan(dense_plan(fp), folder / "dense.json"),
        "hetero": save_plan(heterogeneous_plan(fp), folder / "hetero.json"),
    }


@pytest.fixture(scope="module")
def prompts(gqa4_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gqa4_dir)
    return [natural_prompt(tokenizer, n, seed=70 + i) for i, n in enumerate(PROMPT_LENGTHS)]


@pytest.fixture(scope="module")
def runs(gqa4_dir, plans, prompts):
    """Stock, dense plan, heterogeneous plan: one engine at a time."""
    res = {}
    for name, plan in (("stock", None), ("dense", plans["dense"]), ("hetero", plans["hetero"])):
        llm = make_llm(gqa4_dir, plan, max_model_len=MAX_MODEL_LEN)
        res[name] = greedy_top5(llm, prompts, MAX_TOKENS)
        close_llm(llm)
    return res


@pytest.mark.parametrize("i", range(len(PROMPT_LENGTHS)))
def test_dense_plan_matches_stock_at_gqa4_head_dim_128(runs, i):
    (a, a5), (b, b5) = runs["stock"][i], runs["dense"][i]
    assert len(a) == len(b) == MAX_TOKENS
    assert_greedy_close(a, a5, b, b5, f"dense vs stock, prompt of {PROMPT_LENGTHS[i]} tokens")


@pytest.fixture(scope="module")
def reference(gqa4_dir):
    return ReferenceLM(gqa4_dir)


@pytest.mark.parametrize("i", range(len(PROMPT_LENGTHS)))
def test_heterogeneous_plan_matches_the_reference_at_gqa4_head_dim_128(runs, reference, plans, prompts, i):
    plan = load_plan(plans["hetero"])
    ref = reference.greedy(prompts[i], MAX_TOKENS, plan, MAX_MODEL_LEN)
    tokens, top5 = runs["hetero"][i]
    assert_greedy_close(tokens, top5, ref.tokens, ref.top5, f"hetero plan, prompt of {PROMPT_LENGTHS[i]} tokens")


def test_the_heterogeneous_plan_cuts_context_and_changes_tokens(runs, plans, prompts):
    """Guard against a backend that ignores the plan at this geometry: spans below the longest prompt, and the
    sparse tokens differ from dense somewhere."""
    n = served_length(len(prompts[-1]), MAX_TOKENS, MAX_MODEL_LEN, DEFAULT_SPAN_GRID)
    assert min(s for layer in load_plan(plans["hetero"]).spans(*n) for s in layer) < len(prompts[-1])
    assert [r[0] for r in runs["hetero"]] != [r[0] for r in runs["dense"]]
