"""`moa-plan run` on the tiny llama writes the artefacts recorded in fixtures/tiny_run.json, byte for byte: the
planner's code can be reorganised, its plans and artefacts cannot silently change. Rerecord (python -m
tests.planner.golden) only with a change that means to alter them, and say so in its commit; add a host whose CPU
computes other floats with `python -m tests.planner.golden --add-host` on unchanged code."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.planner.golden import FIXTURE, RUN_ARGS, host_signature, run_recorded


def differences(digests: dict[str, str], recorded: dict[str, str]) -> list[str]:
    return sorted(k for k in {*digests, *recorded} if digests.get(k) != recorded.get(k))


def test_run_writes_the_recorded_artefacts(tmp_path: Path):
    fixture = json.loads(FIXTURE.read_text())
    assert fixture["args"] == RUN_ARGS  # the fixture belongs to this command
    hosts: dict[str, dict[str, str]] = fixture["hosts"]
    digests = run_recorded(tmp_path / "model", tmp_path / "work")
    assert {"plan-d0.50.json", "plan-d0.25.json", "validate-d0.50.json"} <= set(digests)
    if any(not differences(digests, recorded) for recorded in hosts.values()):
        return
    host = host_signature()
    if host in hosts:
        pytest.fail(f"artefacts differ from this host's recorded run: {differences(digests, hosts[host])}")
    pytest.skip(f"no recorded run matches and none was recorded on {host!r} (recorded: {sorted(hosts)}); float "
                "kernels differ across CPUs: record this host with `python -m tests.planner.golden --add-host` on "
                "code known to match")  # fmt: skip
