"""benchmarks/prefill_speed.py's ceiling arithmetic: attention-work fraction from a plan's spans, the FLOP model
from a config, the fit of stock's seconds per token."""

from __future__ import annotations

import json

import pytest

from benchmarks.prefill_speed import PLANS, attention_fraction, fit_stock, ideal_flop, model_flops
from moa_vllm.plan import fingerprint_from_hf_config, save_plan, uniform_plan, window_plan

CONFIG = {
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "intermediate_size": 128,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 100,
    "max_position_embeddings": 4096,
    "model_type": "llama",
    "architectures": ["LlamaForCausalLM"],
}


def _brute_fraction(spans: list[int], prompt: int) -> float:
    kept = sum(min(p + 1, s) for s in spans for p in range(prompt))
    return kept / (len(spans) * prompt * (prompt + 1) / 2)


def test_fraction_is_the_keys_each_query_attends(tmp_path):
    model = fingerprint_from_hf_config(CONFIG)
    path = save_plan(window_plan(model, 100), tmp_path / "w.json")
    assert attention_fraction(str(path), 1000) == pytest.approx(_brute_fraction([100] * 4, 1000))
    dense = save_plan(uniform_plan(model, 1.0), tmp_path / "d.json")
    assert attention_fraction(str(dense), 777) == pytest.approx(1.0)


def test_shipped_plan_fractions_fall_with_density():
    f25 = attention_fraction(str(PLANS / "moa-d0.25.json"), 8000)
    f50 = attention_fraction(str(PLANS / "moa-d0.50.json"), 8000)
    assert 0.2 < f25 < f50 < 0.8


def test_flop_model_and_ideal_ratio(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(CONFIG))
    lin, att = model_flops(tmp_path)
    per_layer = 64 * 16 * (4 + 4) + 4 * 16 * 64 + 3 * 64 * 128
    assert lin == 2 * 2 * per_layer and att == 2 * 4 * 4 * 16
    assert ideal_flop(lin, att, 1000, 1.0) == pytest.approx(1.0)
    assert ideal_flop(lin, att, 1000, 0.0) == pytest.approx((lin + att * 500.5) / lin)


def test_stock_fit_recovers_a_linear_model():
    a, b = 0.002, 3e-6
    times = {p: p * (a + b * (p + 1) / 2) for p in (2048, 4096, 8000)}
    fa, fb = fit_stock(times)
    assert fa == pytest.approx(a) and fb == pytest.approx(b)
