"""fp8 rings in the real engine (CPU wheel): a dense plan with --kv-cache-dtype fp8 gives stock vLLM fp8's greedy
tokens (both quantize K/V with CPU_ATTN's own rounding; prefill chunks of 256 tokens read earlier chunks back from
the fp8 rings), and a ring block holds a quarter of a float32 one's bytes."""

from __future__ import annotations

import pytest
import torch

from moa_vllm.data import natural_prompt
from moa_vllm.plan import dense_plan, fingerprint_from_hf_config, load_hf_config, save_plan
from tests.vllm_plugin.conftest import close_llm, engine_core, make_llm
from tests.vllm_plugin.matching import assert_greedy_close, greedy_top5

pytestmark = [
    pytest.mark.engine,
    pytest.mark.skipif(
        not (torch.cpu._is_avx512_supported() or torch.cpu._is_amx_tile_supported()),
        reason="vLLM's CPU fp8 KV cache needs AVX-512 or AMX",
    ),
]

LENGTHS = [20, 400, 1500]
MAX_TOKENS = 24


@pytest.fixture(scope="module")
def runs(model_dir, tokenizer, tmp_path_factory):
    plan = save_plan(
        dense_plan(fingerprint_from_hf_config(load_hf_config(model_dir))),
        tmp_path_factory.mktemp("plans") / "dense.json",
    )
    prompts = [natural_prompt(tokenizer, n, seed=70 + i) for i, n in enumerate(LENGTHS)]
    out = {}
    for name, plan_path in (("stock", None), ("moa", plan)):
        llm = make_llm(model_dir, plan_path, kv_cache_dtype="fp8", max_model_len=2048, max_num_batched_tokens=256)
        spec = engine_core(llm).scheduler.kv_cache_config.kv_cache_groups[0].kv_cache_spec
        out[name] = (greedy_top5(llm, prompts, MAX_TOKENS), spec)
        close_llm(llm)
    return out


@pytest.mark.parametrize("i", range(len(LENGTHS)))
def test_dense_fp8_rings_match_stock_fp8(runs, i):
    (a, a5), (b, b5) = runs["stock"][0][i], runs["moa"][0][i]
    assert len(a) == len(b) == MAX_TOKENS
    assert_greedy_close(a, a5, b, b5, f"fp8 prompt of {LENGTHS[i]} tokens")


def test_an_fp8_ring_block_holds_one_byte_per_value(runs, model_dir):
    config = load_hf_config(model_dir)
    heads = config["num_key_value_heads"]
    head_dim = config["hidden_size"] // config["num_attention_heads"]
    spec = runs["moa"][1]
    assert spec.dtype == torch.uint8
    assert spec.page_size_bytes == heads * spec.block_size * 2 * head_dim  # fp32 rings: 4x this
