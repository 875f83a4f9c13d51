"""measure_kv_amax reads each layer's cached keys (after RoPE) and values; `moa-vllm plan kv-range` writes them into
a plan, and fp8 scales follow from them."""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from moa_vllm import cli
from moa_vllm.plan import dense_plan, fingerprint_from_hf_config, load_hf_config, load_plan, save_plan
from moa_vllm.planner.kv_range import calibration_windows, measure_kv_amax


def test_amax_follows_the_layers_projections(tiny_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32).eval()
    windows = calibration_windows(AutoTokenizer.from_pretrained(tiny_dir), 2, 64)
    before = measure_kv_amax(model, windows)
    assert len(before) == model.config.num_hidden_layers and all(k > 0 and v > 0 for k, v in before)
    attn = model.model.layers[0].self_attn
    with torch.no_grad():
        attn.k_proj.weight *= 2  # RoPE is linear: layer 0's keys double, so does their largest magnitude
        attn.v_proj.weight *= 3
    after = measure_kv_amax(model, windows)
    assert abs(after[0][0] / before[0][0] - 2) < 1e-4 and abs(after[0][1] / before[0][1] - 3) < 1e-4


def test_plan_kv_range_writes_amax_and_scales(tiny_dir, tmp_path, capsys):
    plan = dense_plan(fingerprint_from_hf_config(load_hf_config(tiny_dir)))
    src, out = save_plan(plan, tmp_path / "p.json"), tmp_path / "q.json"
    assert "kv_amax" not in src.read_text()  # a plan without calibration keeps its old text
    cli.main(["plan", "kv-range", str(src), "--model", str(tiny_dir), "--texts", "2", "--tokens", "64", "-o", str(out)])
    got = load_plan(out)
    assert got.rules == plan.rules and got.metadata.extra["kv_range"]["texts"] == 2
    model = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32).eval()
    expect = measure_kv_amax(model, calibration_windows(AutoTokenizer.from_pretrained(tiny_dir), 2, 64))
    assert got.kv_amax == [tuple(pair) for pair in expect]
    assert got.fp8_scales(1, 448.0) == (expect[1][0] / 448.0, expect[1][1] / 448.0)
    assert plan.fp8_scales(1, 448.0) is None
    assert "layer   1: max |K|" in capsys.readouterr().out
