"""`moa-plan run` on the tiny llama writes the artefacts recorded in fixtures/tiny_run.json, byte for byte: the
planner's code can be reorganised, its plans and artefacts cannot silently change. Rerecord (python -m
tests.planner.golden) only with a change that means to alter them, and say so in its commit."""

from __future__ import annotations

import json
from pathlib import Path

from tests.planner.golden import FIXTURE, RUN_ARGS, run_recorded


def test_run_writes_the_recorded_artefacts(tmp_path: Path):
    recorded = json.loads(FIXTURE.read_text())
    assert recorded["args"] == RUN_ARGS  # the fixture belongs to this command
    digests = run_recorded(tmp_path / "model", tmp_path / "work")
    assert {"plan-d0.50.json", "plan-d0.25.json", "validate-d0.50.json"} <= set(digests)
    changed = sorted(k for k in {*digests, *recorded["artefacts"]} if digests.get(k) != recorded["artefacts"].get(k))
    assert not changed, f"artefacts differ from the recorded run: {changed}"
