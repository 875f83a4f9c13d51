"""The moa-vllm command line: argument handling of `serve` and the plan commands (no server started)."""

from __future__ import annotations

import json
import sys

import pytest

from moa_vllm import cli, serve
from moa_vllm.plan import load_plan
from tests.conftest import SMALL_LLAMA

CONFIG = SMALL_LLAMA


@pytest.fixture
def model(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(CONFIG))
    return tmp_path


@pytest.fixture
def captured(monkeypatch):
    """Record what `serve` would exec instead of replacing the test process."""
    calls = {}
    monkeypatch.setattr(serve.os, "execve", lambda path, argv, env: calls.update(argv=argv, env=env))
    return calls


@pytest.mark.parametrize("model_first", [True, False])
def test_serve_forwards_flags_and_keeps_model(model, tmp_path, captured, model_first):
    plan = tmp_path / "p.json"
    cli.main(["plan", "uniform", "--model", str(model), "--density", "0.5", "-o", str(plan)])
    args = [str(model), "--plan", str(plan)] if model_first else ["--plan", str(plan), "--model", str(model)]
    cli.main(["serve", *args, "--port", "8123", "--dtype", "float32"])
    argv = captured["argv"]
    assert argv[:3] == [sys.executable, "-m", serve.SERVER_MODULE]
    assert argv[argv.index("--model") + 1] == str(model)
    assert argv[argv.index("--port") + 1] == "8123"
    assert argv[argv.index("--host") + 1] == "127.0.0.1"
    assert argv[argv.index("--attention-backend") + 1] == "moa"
    assert json.loads(argv[argv.index("--additional-config") + 1]) == {"moa": {"plan": str(plan.resolve())}}


def test_serve_keeps_user_host(model, tmp_path, captured):
    plan = tmp_path / "p.json"
    cli.main(["plan", "dense", "--model", str(model), "-o", str(plan)])
    cli.main(["serve", str(model), "--plan", str(plan), "--host", "0.0.0.0"])
    assert captured["argv"].count("--host") == 1


def test_serve_rejects_bad_plan_with_exit_2(model, tmp_path, captured, capsys):
    plan = tmp_path / "p.json"
    plan.write_text("[]")
    with pytest.raises(SystemExit) as e:
        cli.main(["serve", str(model), "--plan", str(plan)])
    assert e.value.code == 2
    assert f"{plan}: a plan must be a JSON object" in capsys.readouterr().err
    assert not captured


def test_plan_commands(model, tmp_path, capsys):
    out = tmp_path / "u.json"
    cli.main(
        [
            "plan",
            "uniform",
            "--model",
            str(model),
            "--density",
            "0.25",
            "--sinks",
            "16",
            "--min-span",
            "32",
            "-o",
            str(out),
        ]
    )
    plan = load_plan(out)
    assert (plan.sink_tokens, plan.min_span, plan.rules[1][1].beta) == (16, 32, 0.25)
    cli.main(["plan", "show", str(out), "--length", "4096"])
    assert "| 4096 | 0.250 |" in capsys.readouterr().out  # the density table
    ref = tmp_path / "ref.json"
    ref.write_text(json.dumps({"alphas": [[0, 64, 0, 0]] * 2, "betas": [[0.5, 0.25, 0.1, 0.2]] * 2}))
    cli.main(["plan", "import-reference", str(ref), "--model", str(model), "-o", str(tmp_path / "imp.json")])
    assert load_plan(tmp_path / "imp.json").rules[0][0].alpha == 64
    assert '"widening"' in capsys.readouterr().out


def test_serve_caps_parallel_samples_at_max_num_seqs(monkeypatch):
    from moa_vllm.serve import server_env

    monkeypatch.delenv("VLLM_MAX_N_SEQUENCES", raising=False)
    assert server_env([])["VLLM_MAX_N_SEQUENCES"] == "256"
    assert server_env(["--max-num-seqs", "8"])["VLLM_MAX_N_SEQUENCES"] == "8"
    assert server_env(["--max-num-seqs=12"])["VLLM_MAX_N_SEQUENCES"] == "12"
    monkeypatch.setenv("VLLM_MAX_N_SEQUENCES", "3")
    assert server_env(["--max-num-seqs", "8"])["VLLM_MAX_N_SEQUENCES"] == "3"  # the user's choice wins


def test_serve_without_arguments_serves_the_embedded_model_with_its_best_shipped_plan(captured, monkeypatch):
    monkeypatch.setattr(serve, "resolve_model", lambda model: str(serve.shipped_plans_dir("x").parents[1]))
    monkeypatch.setattr(serve, "validate", lambda model, plan: plan)
    cli.main(["serve"])
    argv = captured["argv"]
    plan = json.loads(argv[argv.index("--additional-config") + 1])["moa"]["plan"]
    assert plan.endswith("plans/SmolLM2-135M-Instruct/moa-d0.50.json")
    assert argv[argv.index("--served-model-name") + 1] == "SmolLM2-135M-Instruct"
    load_plan(plan)  # the default is a real shipped plan


def test_serve_a_folder_with_an_attached_plan_needs_no_plan_flag(model, tmp_path, captured, capsys):
    plan = tmp_path / "p.json"
    cli.main(["plan", "uniform", "--model", str(model), "--density", "0.25", "-o", str(plan)])
    cli.main(["plan", "attach", str(plan), str(model)])
    assert load_plan(model / "moa_plan.json") == load_plan(plan)
    cli.main(["serve", str(model)])
    argv = captured["argv"]
    assert "--additional-config" not in argv  # the plugin finds moa_plan.json itself
    assert argv[argv.index("--attention-backend") + 1] == "moa"
    assert f"moa-vllm: plan {model / 'moa_plan.json'}" in capsys.readouterr().err


def test_serve_a_folder_without_a_plan_says_how_to_attach_one(model, captured, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["serve", str(model)])
    assert e.value.code == 2
    assert f"moa-vllm plan attach PLAN {model}" in capsys.readouterr().err
    assert not captured


def test_plan_attach_refuses_a_plan_for_another_model(model, tmp_path, capsys):
    other = tmp_path / "other"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({**CONFIG, "num_hidden_layers": 3}))
    plan = tmp_path / "p.json"
    cli.main(["plan", "dense", "--model", str(other), "-o", str(plan)])
    with pytest.raises(SystemExit) as e:
        cli.main(["plan", "attach", str(plan), str(model)])
    assert e.value.code == 2
    assert "model.num_layers is 3 but the model has 2" in capsys.readouterr().err
    assert not (model / "moa_plan.json").exists()


def test_the_exec_log_line_hides_secret_flag_values():
    from moa_vllm.serve import redacted

    argv = ["python", "-m", "x", "--api-key", "k1", "--api-key=k2", "--hf-token", "t", "--port", "8000"]
    assert redacted(argv) == [
        "python", "-m", "x", "--api-key", "***", "--api-key=***", "--hf-token", "***", "--port", "8000",
    ]  # fmt: skip
