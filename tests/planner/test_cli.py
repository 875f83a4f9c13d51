"""`moa-plan run` end to end on a tiny random GQA llama in a temp dir: a valid plan that fits the model."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from moa_vllm.plan.fingerprint import check_plan_fits, fingerprint_from_hf_config, load_hf_config
from moa_vllm.plan.io import load_plan
from moa_vllm.planner.cli import main, parser

TINY_ARGS = [
    "--lengths", "192 256", "--validation-length", "224", "--extension-lengths", "512",
    "--samples-per-length", "2", "--max-new-tokens", "6", "--sinks", "8", "--min-span", "16",
    "--alphas", "-32 0 64", "--num-betas", "5", "--time-limit", "20", "--epsilon-points", "3", "--no-progress",
    "--validation-samples", "2", "--keep-wrong-answers",  # a random model never answers right
    "--fidelity-texts", "1", "--fidelity-length", "224",
]  # fmt: skip


def test_parser_reads_lists_and_requires_a_work_dir():
    args = parser().parse_args(["optimize", "--work-dir", "w", "--density", "0.5 0.25", "--lengths", "1024,2048"])
    assert args.density == (0.5, 0.25) and args.lengths == (1024, 2048) and args.seed == 0
    assert args.profile_samples == {}
    args = parser().parse_args(["profile", "--work-dir", "w", "--profile-samples", "3072=2 4096=1"])
    assert args.profile_samples == {3072: 2, 4096: 1}
    with pytest.raises(SystemExit):
        parser().parse_args(["run"])


def test_run_writes_valid_plans_for_two_densities(tiny_dir: Path, tmp_path: Path):
    work, out = tmp_path / "work", tmp_path / "plans"
    argv = ["run", "--model", str(tiny_dir), "--work-dir", str(work), "--density", "0.5 0.25", "--out-dir", str(out)]
    assert main([*argv, *TINY_ARGS, "--no-ship-gate"]) == 0
    fingerprint = fingerprint_from_hf_config(load_hf_config(tiny_dir))
    for density in (0.5, 0.25):
        plan = load_plan(out / f"moa-d{density:.2f}.json")
        check_plan_fits(plan, fingerprint)
        assert plan.metadata.method == "moa-plan" and plan.metadata.lengths_profiled == [192, 256]
        assert plan.sink_tokens == 8 and plan.min_span == 16
        for n in (192, 256, 512):  # density budget: 0.9 x target <= density <= target
            assert 0.9 * density - 1e-9 <= plan.density(n) <= density + 1e-9
        report = out / f"moa-d{density:.2f}-report"
        rows = list(csv.DictReader((report / "pareto.csv").open()))
        assert rows and sum(int(r["chosen"]) for r in rows) == 1
        assert (report / "spans.png").stat().st_size > 0 and (report / "pareto_front.png").stat().st_size > 0
    timings = json.loads((work / "timings.json").read_text())
    steps = {"calibrate", "profile-L192", "profile-L256", "optimize-d0.50", "truth-d0.50", "validate-d0.25"}
    assert steps <= set(timings) and "profile-L224" not in timings  # the validation length stays held out
    assert all(t["seconds"] >= 0 and t["cpu_seconds"] >= 0 for t in timings.values())


def test_model_folder_without_config_is_refused(tmp_path: Path):
    with pytest.raises(SystemExit, match="not a HF model folder"):
        main(["calibrate", "--model", str(tmp_path), "--work-dir", str(tmp_path / "w"), *TINY_ARGS])


def test_diagnose_reports_correlation_ratios_reliability_and_plan_losses(tiny_dir: Path, tmp_path: Path):
    work = tmp_path / "work"
    argv = ["diagnose", "--model", str(tiny_dir), "--work-dir", str(work), "--density", "0.5", "--probe-layers", "2"]
    assert main([*argv, *TINY_ARGS]) == 0
    doc = json.loads((work / "diagnose.json").read_text())
    for level in ("192", "256"):
        entry = doc["levels"][level]
        assert entry["samples"] == 2 and len(entry["probes"]) == 4  # 2 layers x 2 spans
        assert set(entry["layer_ratio"]) == {"0", "1"}
        assert entry["reliability"]["samples"] == 2
        # masking a head changes the loss of a random model: the measured change is real, not a placeholder
        assert any(p["true"] != 0.0 for p in entry["probes"])
    assert {"dense", "uniform", "pareto-0"} <= set(doc["plans"]["d0.50"])
    assert (work / "diagnose.png").stat().st_size > 0


def test_run_refuses_a_plan_that_loses_to_uniform(tiny_dir: Path, tmp_path: Path, monkeypatch, capsys):
    from moa_vllm.planner.steps import validate as validate_step

    real = validate_step.true_losses

    def uniform_wins(*args, **kwargs):
        doc = real(*args, **kwargs)
        if "uniform" in doc["plans"]:
            doc["plans"]["uniform"]["mean"]["total"] = 1e-9  # below every candidate of every retrieval weight
        return doc

    monkeypatch.setattr(validate_step, "true_losses", uniform_wins)
    work, out = tmp_path / "work", tmp_path / "plans"
    argv = ["run", "--model", str(tiny_dir), "--work-dir", str(work), "--density", "0.5", "--out-dir", str(out)]
    assert main([*argv, *TINY_ARGS]) == 3
    err = capsys.readouterr().err
    assert "no MoA plan at density 0.5 beats the uniform plan on every held-out measure" in err
    assert "true loss" in err and "vs 0.00000" in err  # names the measure and by how much
    assert not (out / "moa-d0.50.json").exists() and not (work / "plan-d0.50.json").exists()


def test_diagnose_group_ablation_alone_measures_each_group(tiny_dir: Path, tmp_path: Path):
    work = tmp_path / "work"
    argv = ["diagnose", "--model", str(tiny_dir), "--work-dir", str(work), "--probe-layers", "0"]
    assert main([*argv, "--ablation-heads", "1", *TINY_ARGS]) == 0
    doc = json.loads((work / "diagnose.json").read_text())
    assert doc["levels"] == {} and not (work / "diagnose.png").exists()  # no probes asked for
    ablation = doc["group_ablation"]
    assert set(ablation["groups"]) == {"most_retrieval", "most_influence", "least_retrieval"}
    for group in ablation["groups"].values():
        assert len(group["heads"]) == 1 and group["predicted_change"] >= 0
    # cutting a head of a random model moves its loss: the measurement is real
    assert any(g["true_change"]["total"] != 0.0 for g in ablation["groups"].values())


def test_every_config_field_is_a_flag_with_the_configs_default():
    from moa_vllm.planner.cli import config_from_args
    from moa_vllm.planner.config import PlannerConfig

    args = parser().parse_args(["run", "--work-dir", "w"])
    assert config_from_args(args, Path("m")) == PlannerConfig(model=Path("m"), work_dir=Path("w"))
    args = parser().parse_args(
        ["run", "--work-dir", "w", "--keep-wrong-answers", "--no-ship-gate", "--time-limit", "5"]
    )
    config = config_from_args(args, Path("m"))
    assert not config.check_answers and not config.ship_gate and config.time_limit_s == 5.0 and config.progress
