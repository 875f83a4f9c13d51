"""docker/entrypoint.sh itself (images cannot be built here): the command it runs for each setting, its refusals,
and a real exec into `moa-vllm serve`. The Dockerfiles and compose file are linted by `make lint`."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from moa_vllm.plan import ModelFingerprint, dense_plan, save_plan
from tests.conftest import SMALL_LLAMA

ROOT = Path(__file__).resolve().parents[2]
ENTRYPOINT = ROOT / "docker" / "entrypoint.sh"
CONFIG = SMALL_LLAMA


def _run(env: dict[str, str], *args: str, dry: bool = True) -> subprocess.CompletedProcess:
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"  # moa-vllm of this environment
    full = {"PATH": path, "HOME": os.environ.get("HOME", "/tmp"), **env} | ({"MOA_DRY_RUN": "1"} if dry else {})
    return subprocess.run(["bash", str(ENTRYPOINT), *args], env=full, capture_output=True, text=True, timeout=120)


@pytest.fixture
def folder(tmp_path) -> Path:
    (tmp_path / "config.json").write_text(json.dumps(CONFIG))
    return tmp_path


def test_a_folder_with_an_attached_plan_is_served_without_a_plan_flag(folder):
    (folder / "moa_plan.json").write_text("{}")
    r = _run({"MOA_MODEL": str(folder)}, "--max-model-len", "4096")
    assert r.returncode == 0, r.stderr
    assert shlex.split(r.stdout) == [
        "moa-vllm", "serve", str(folder), "--host", "0.0.0.0", "--port", "8000", "--max-model-len", "4096",
    ]  # fmt: skip


def test_a_plan_file_and_port_are_passed_on(folder, tmp_path):
    plan = tmp_path / "p.json"
    plan.write_text("{}")
    r = _run({"MOA_MODEL": str(folder), "MOA_PLAN": str(plan), "MOA_PORT": "9000", "MOA_HOST": "127.0.0.1"})
    assert shlex.split(r.stdout) == [
        "moa-vllm", "serve", str(folder), "--plan", str(plan), "--host", "127.0.0.1", "--port", "9000",
    ]  # fmt: skip


def test_embedded_serves_the_default_model_and_plan():
    r = _run({"MOA_MODEL": "embedded"})
    assert shlex.split(r.stdout) == ["moa-vllm", "serve", "--host", "0.0.0.0", "--port", "8000"]


def test_a_config_section_counts_as_a_plan(folder):
    (folder / "config.json").write_text(json.dumps({**CONFIG, "sparse_attention_config": {"algorithm": "moa"}}))
    assert _run({"MOA_MODEL": str(folder)}).returncode == 0


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("no_folder", "is not a model folder (no config.json)"),
        ("no_plan", "no plan for"),
        ("missing_plan_file", "MOA_PLAN=/nonexistent/plan.json: no such file"),
    ],
)
def test_refusals_exit_2_with_one_message(folder, tmp_path, case, message):
    env = {
        "no_folder": {"MOA_MODEL": str(tmp_path / "nothing")},
        "no_plan": {"MOA_MODEL": str(folder)},
        "missing_plan_file": {"MOA_MODEL": str(folder), "MOA_PLAN": "/nonexistent/plan.json"},
    }[case]
    r = _run(env)
    assert r.returncode == 2 and message in r.stderr and not r.stdout
    if case == "no_plan":
        assert f"moa-vllm plan attach PLAN {folder}" in r.stderr


def test_real_exec_reaches_moa_vllm_which_checks_the_plan(folder, tmp_path):
    other = ModelFingerprint(architecture="X", num_layers=5, num_query_heads=4, num_kv_heads=2, head_dim=16)
    plan = save_plan(dense_plan(other), tmp_path / "wrong.json")
    r = _run({"MOA_MODEL": str(folder), "MOA_PLAN": str(plan)}, dry=False)
    assert r.returncode == 2, r.stderr
    assert "plan does not fit the model: model.num_layers is 5 but the model has 2" in r.stderr


def test_dockerfiles_copy_only_what_exists():
    for dockerfile in (ROOT / "docker").glob("Dockerfile.*"):
        for line in dockerfile.read_text().splitlines():
            if line.startswith("COPY "):
                for src in re.split(r"\s+", line)[1:-1]:
                    assert (ROOT / src).exists(), f"{dockerfile.name}: COPY {src}: not in the repository"


@pytest.fixture
def fake_moa_vllm(tmp_path) -> Path:
    """A `moa-vllm` first on PATH that prints the key it was given and its arguments (what the real exec sees)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    script = bin_dir / "moa-vllm"
    script.write_text('#!/usr/bin/env bash\necho "key=${VLLM_API_KEY:-}"\necho "args=$*"\n')
    script.chmod(0o755)
    return bin_dir


@pytest.mark.parametrize("variable", ["MOA_API_KEY", "VLLM_API_KEY"])
def test_the_key_reaches_vllm_as_vllm_api_key_and_never_the_command_line(fake_moa_vllm, variable):
    path = f"{fake_moa_vllm}{os.pathsep}{os.environ['PATH']}"
    r = _run({"MOA_MODEL": "embedded", variable: "k-123", "PATH": path}, dry=False)
    assert r.returncode == 0, r.stderr
    assert "key=k-123" in r.stdout and "k-123" not in r.stdout.split("args=")[1]
    assert f"API key required on /v1 and /moa (from {variable})" in r.stderr and "k-123" not in r.stderr
    assert "k-123" not in _run({"MOA_MODEL": "embedded", variable: "k-123"}).stdout  # nor in the dry run's command


def test_no_key_is_a_warning():
    r = _run({"MOA_MODEL": "embedded"})
    assert r.returncode == 0 and "WARNING: no API key (set MOA_API_KEY)" in r.stderr


def test_images_run_as_a_non_root_user_and_compose_requires_a_key():
    for dockerfile in (ROOT / "docker").glob("Dockerfile.*"):
        users = [line.split()[1] for line in dockerfile.read_text().splitlines() if line.startswith("USER ")]
        assert users and users[-1] not in ("root", "0"), dockerfile.name
    compose = (ROOT / "docker" / "compose.yaml").read_text()
    assert compose.count("MOA_API_KEY: ${MOA_API_KEY:?") == 2
