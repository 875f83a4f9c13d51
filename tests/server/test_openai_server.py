"""The real OpenAI-compatible server (vLLM's) with the moa backend, driven by the openai client over loopback."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from moa_vllm.server_process import SERVER_ENV, free_port, kv_usage, moa_vllm, stop, wait_ready
from tests.conftest import PLANS

pytestmark = pytest.mark.server


@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory):
    port = free_port()
    log = tmp_path_factory.mktemp("server") / "server.log"
    with open(log, "w") as out:
        proc = moa_vllm(
            "serve",
            str(model_dir),
            "--plan",
            str(PLANS / "uniform-d0.50.json"),
            "--port",
            str(port),
            "--max-model-len",
            "2048",
            "--enforce-eager",
            "--dtype",
            "float32",
            "--served-model-name",
            "smol",
            stdout=out,
            stderr=subprocess.STDOUT,
        )
        try:
            wait_ready(proc, port)
            yield port, log
        finally:
            stop(proc)


@pytest.fixture(scope="module")
def client(server):
    from openai import OpenAI

    return OpenAI(base_url=f"http://127.0.0.1:{server[0]}/v1", api_key="none")


def test_server_uses_moa_backend(server):
    text = Path(server[1]).read_text()
    assert "moa-vllm: plan" in text and "uniform-d0.50.json" in text
    assert "--host 127.0.0.1" in text  # loopback by default


def test_completion(client):
    r = client.completions.create(model="smol", prompt="The capital of France is", max_tokens=8, temperature=0)
    assert "Paris" in r.choices[0].text
    assert r.usage.completion_tokens == 8


def test_chat(client):
    r = client.chat.completions.create(
        model="smol",
        messages=[{"role": "user", "content": "What is the capital of France?"}],
        max_tokens=16,
        temperature=0,
    )
    assert "Paris" in r.choices[0].message.content


def test_streaming(client):
    stream = client.completions.create(
        model="smol", prompt="Count: one, two, three,", max_tokens=12, temperature=0, stream=True
    )
    pieces = [c.choices[0].text for c in stream if c.choices]
    assert len(pieces) >= 2 and "".join(pieces).strip()


def _kv_usage(port: int) -> float:
    usage = kv_usage(port)
    assert usage is not None, "no vllm:kv_cache_usage_perc gauge in /metrics"
    return usage


def _wait_usage(port: int, want_zero: bool, timeout_s: float = 60) -> float:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        usage = _kv_usage(port)
        if (usage == 0.0) == want_zero:
            return usage
        time.sleep(0.2)
    return _kv_usage(port)


def test_aborted_stream_returns_every_block_and_the_metric_agrees(server, client):
    port = server[0]
    assert _wait_usage(port, want_zero=True) == 0.0
    stream = client.completions.create(
        model="smol", prompt="word " * 600, max_tokens=1200, temperature=0, stream=True, extra_body={"ignore_eos": True}
    )
    got = 0
    for chunk in stream:
        got += bool(chunk.choices)
        if got == 3:
            break
    assert _kv_usage(port) > 0.0  # the ring of the running request is allocated and counted by vLLM's gauge
    stream.close()  # the client goes away mid-generation: vLLM aborts the request
    assert _wait_usage(port, want_zero=True) == 0.0


def test_oversized_request_is_rejected_cleanly(client):
    import openai

    with pytest.raises(openai.BadRequestError, match="2048"):
        client.completions.create(model="smol", prompt="word " * 3000, max_tokens=8)
    # the server keeps serving
    assert client.completions.create(model="smol", prompt="Hi", max_tokens=2).choices[0].text is not None


def _run_to_exit(proc: subprocess.Popen, timeout: int = 180) -> tuple[int, str]:
    out, _ = proc.communicate(timeout=timeout)
    return proc.returncode, out


def test_bad_plan_fails_before_server_starts(model_dir, tmp_path):
    bad = tmp_path / "bad.json"
    data = json.loads((PLANS / "uniform-d0.50.json").read_text())
    data["rules"][3][1]["beta"] = 2.0
    bad.write_text(json.dumps(data))
    rc, out = _run_to_exit(
        moa_vllm(
            "serve", str(model_dir), "--plan", str(bad), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
    )
    assert rc == 2
    assert f"{bad}: field 'rules.3.1.beta'" in out


def test_plan_for_other_model_fails(model_dir, tmp_path):
    data = json.loads((PLANS / "dense.json").read_text())
    data["model"]["num_layers"] = 24
    data["rules"] = data["rules"][:24]
    other = tmp_path / "other.json"
    other.write_text(json.dumps(data))
    rc, out = _run_to_exit(
        moa_vllm(
            "serve", str(model_dir), "--plan", str(other), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
    )
    assert rc == 2 and "num_layers is 24 but the model has 30" in out


@pytest.mark.parametrize("case", ["missing_plan", "bad_plan"])
def test_vllm_server_rejects_bad_plan_in_config(model_dir, tmp_path, case):
    """The same checks inside vLLM itself (plain api_server, as `vllm serve` runs it): fails at config time."""
    args = [
        sys.executable,
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        str(model_dir),
        "--attention-backend",
        "moa",
        "--max-model-len",
        "512",
        "--port",
        str(free_port()),
    ]
    if case == "bad_plan":
        bad = tmp_path / "bad.json"
        bad.write_text("{not json")
        args += ["--additional-config", json.dumps({"moa": {"plan": str(bad)}})]
    env = {k: v for k, v in os.environ.items() if k != "MOA_VLLM_PLAN"}
    proc = subprocess.Popen(
        args, env={**env, **SERVER_ENV}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    rc, out = _run_to_exit(proc)
    assert rc != 0
    expected = "needs a plan file" if case == "missing_plan" else "bad.json: invalid JSON at line 1"
    assert expected in out
    assert "EngineCore" not in out  # failed before any engine process started
