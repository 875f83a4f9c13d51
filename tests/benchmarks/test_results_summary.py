import json
from pathlib import Path

import pytest

from benchmarks.accuracy.cli import STOCK, jobs, parse_args, result_name, run_order, seeds_per_length
from benchmarks.accuracy.plots import cell_matrix
from benchmarks.accuracy.results import cells, passkey_summary
from benchmarks.accuracy.summary import RESULT_KIND, load_results, relative_accuracy, render


def record(length, depth, seed, correct, outside_50, outside_25, seeing=1.0):
    return {
        "length": length,
        "depth": depth,
        "seed": seed,
        "correct": correct,
        "heads_seeing_key": seeing,
        "key_outside": {"uniform-d0.50": outside_50, "uniform-d0.25": outside_25},
    }


# depth 0.1 lies outside both uniform windows, 0.6 only outside the 0.25 window, 0.9 inside both
def grid(correct_by_depth: dict[float, bool]) -> list[dict]:
    return [
        record(n, d, s, correct_by_depth[d], d < 0.5, d < 0.75)
        for n in (1024, 2048)
        for d in (0.1, 0.6, 0.9)
        for s in range(2)
    ]


def result(name: str, records: list[dict]) -> dict:
    fid = {"top1_agreement": 0.9, "kl_mean": 0.01, "tail_top1_agreement": 0.8, "tail_kl_mean": 0.02, "tail_from": 8}
    return {
        "kind": RESULT_KIND,
        "command": f"python -m benchmarks.accuracy --plans {name}.json",
        "device": "CPU (test)",
        "vllm_version": "0.32.0",
        "model": "m",
        "plan": {"name": name, "density_at": {"1024": 0.5, "2048": 0.5}},
        "settings": {"prompt_format": "chat", "fidelity_tokens": 16, "topk": 20},
        "wall_s": {"total": 12.0},
        "grid": {"lengths": [1024, 2048], "depths": [0.1, 0.6, 0.9], "seeds": {"1024": 2, "2048": 2}},
        "passkey": passkey_summary(records),
        "cells": cells(records),
        "fidelity": {"texts": [{}], "mean": fid},
        "cases": records,
    }


def test_passkey_summary_splits_by_uniform_window():
    out = passkey_summary(grid({0.1: False, 0.6: True, 0.9: True}))
    assert out["prompts"] == 12 and out["accuracy"] == pytest.approx(8 / 12)
    assert out["by_length"] == {"1024": pytest.approx(2 / 3), "2048": pytest.approx(2 / 3)}
    u50, u25 = out["by_uniform_window"]["uniform-d0.50"], out["by_uniform_window"]["uniform-d0.25"]
    assert (u50["prompts_outside"], u50["accuracy_outside"], u50["accuracy_inside"]) == (4, 0.0, 1.0)
    assert (u25["prompts_outside"], u25["accuracy_outside"]) == (8, 0.5)


def test_cells_average_seeds_and_fill_the_heatmap_matrix():
    records = grid({0.1: False, 0.6: True, 0.9: True})
    records[0]["correct"] = True  # (1024, 0.1, seed 0)
    table = cells(records)
    assert len(table) == 6 and table[0] == {
        "length": 1024,
        "depth": 0.1,
        "prompts": 2,
        "accuracy": 0.5,
        "heads_seeing_key": 1.0,
    }
    m = cell_matrix(table, [1024, 2048, 4096], [0.1, 0.6, 0.9], "accuracy")
    assert m[0].tolist() == [0.5, 1.0, 1.0] and m[1, 0] == 0.0
    assert all(v != v for v in m[2])  # NaN where the grid has no cell


def test_relative_accuracy_uses_the_same_prompts():
    dense = grid({0.1: True, 0.6: True, 0.9: False})
    plan = grid({0.1: False, 0.6: True, 0.9: True})
    assert relative_accuracy(plan, dense) == pytest.approx((8 / 12) / (8 / 12))
    outside = [r for r in plan if r["key_outside"]["uniform-d0.50"]]
    assert relative_accuracy(outside, dense) == 0.0
    assert relative_accuracy([r for r in plan if r["depth"] == 0.9], dense) is None  # dense scored 0 there


def test_render_has_one_row_per_plan_and_ratios(tmp_path: Path):
    dense = result("dense", grid({0.1: True, 0.6: True, 0.9: True}))
    uniform = result("uniform-d0.50", grid({0.1: False, 0.6: True, 0.9: True}))
    for r in (dense, uniform):
        (tmp_path / f"{r['plan']['name']}.json").write_text(json.dumps(r))
    (tmp_path / "other.json").write_text(json.dumps({"kind": "something else"}))
    results = load_results(tmp_path)
    assert [r["plan"]["name"] for r in results] == ["dense", "uniform-d0.50"]
    text = render(results, "dense")
    rows = [line for line in text.splitlines() if line.startswith("| uniform-d0.50 |")]
    assert len(rows) == 2  # main table and by-length table
    assert "| 0.67 | 0.67 |" in rows[0]  # accuracy and x dense
    assert "0.00 (0.00x, n=4)" in rows[0]  # key outside the 0.50 window: every such prompt lost
    assert "- dense: `python -m benchmarks.accuracy --plans dense.json`" in text


def test_cli_seeds_and_run_order(tmp_path: Path):
    args = parse_args(["--plans", "a.json", "--lengths", "1024", "8192", "--seeds", "3", "--seeds-at", "8192=1"])
    assert seeds_per_length(args) == {1024: 3, 8192: 1}
    ref, a, b = (tmp_path / n for n in ("dense.json", "a.json", "b.json"))
    assert run_order([a, b], ref, cached=False) == [ref.resolve(), a.resolve(), b.resolve()]
    assert run_order([a, b], ref, cached=True) == [a.resolve(), b.resolve()]
    assert run_order([a, ref, a], ref, cached=True) == [ref.resolve(), a.resolve()]


def test_quantized_runs_keep_an_unquantized_reference(tmp_path: Path):
    ref, a = tmp_path / "dense.json", tmp_path / "a.json"
    assert jobs([a], ref, cached=False) == [(ref.resolve(), "auto"), (a.resolve(), "auto")]
    assert jobs([ref, a], ref, cached=False, kv_cache_dtype="fp8", stock=True) == [
        (ref.resolve(), "auto"), (STOCK, "fp8"), (ref.resolve(), "fp8"), (a.resolve(), "fp8")
    ]  # fmt: skip
    assert jobs([a], ref, cached=True, kv_cache_dtype="fp8") == [(a.resolve(), "fp8")]
    assert [result_name(p, kv) for p, kv in jobs([a], ref, True, "fp8", True)] == ["stock-vllm-fp8", "a-fp8"]
