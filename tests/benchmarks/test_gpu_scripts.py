"""The GPU device script's pieces still work before they meet a GPU: kernel_check in Triton's interpreter at tiny
shapes (errors against the reference, JSON written, exit 0), run.sh parses and refuses to run without a GPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.compute
def test_kernel_check_smoke_in_the_interpreter(tmp_path):
    out = tmp_path / "kc.json"
    run = subprocess.run(
        [sys.executable, "-m", "benchmarks.gpu.kernel_check", "--smoke", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=REPO,
        env={**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(REPO)},
    )
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["interpreter"] is True
    assert {r["dtype"] for r in result["rows"]} == {"float32", "float16", "bfloat16"}
    assert all(r["max_abs_err"] < 4e-2 for r in result["rows"])


def test_run_sh_parses_and_needs_a_gpu(tmp_path):
    script = REPO / "benchmarks" / "gpu" / "run.sh"
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    run = subprocess.run(
        ["bash", str(script)],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHON": sys.executable, "RESULTS": str(tmp_path), "CUDA_VISIBLE_DEVICES": ""},
    )
    assert run.returncode == 2 and "no CUDA GPU" in run.stdout
