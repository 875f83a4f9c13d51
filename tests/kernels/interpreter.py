"""Running a kernel case script in Triton's interpreter: TRITON_INTERPRET must be set before Triton is first
imported, which a pytest process that also starts vLLM engines cannot guarantee, so each script runs in its own
process and prints one JSON object {case: max abs error} as its last line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
TOL = {"float32": 2e-5, "float16": 3e-3, "bfloat16": 3e-2}  # max abs error against the float64 references


def run_cases(script: str) -> dict[str, float]:
    """tests/kernels/<script> in a fresh process; its {case: error} object."""
    run = subprocess.run(
        [sys.executable, str(REPO / "tests" / "kernels" / script)],
        capture_output=True,
        text=True,
        timeout=900,
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert run.returncode == 0, run.stderr[-4000:]
    return json.loads(run.stdout.strip().splitlines()[-1])
