"""A model folder that carries its plan, served by vLLM's own entry point with `--attention-backend moa` and no
plan flag (the plugin resolves moa_plan.json beside config.json); the inspection routes and gauges of that server,
under load."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from moa_vllm.plan import load_plan
from moa_vllm.plan.io import plan_digest
from moa_vllm.plan.ring import group_blocks, layer_blocks
from moa_vllm.plan.span import served_length
from moa_vllm.server_process import SERVER_ENV, free_port, stop, wait_ready
from moa_vllm.vllm_plugin.settings import DEFAULT_SPAN_GRID
from tests.conftest import PLANS

pytestmark = pytest.mark.server


@pytest.fixture(scope="module")
def folder(model_dir, tmp_path_factory) -> Path:
    """A fresh model folder: the embedded model's files (linked, not copied) plus an attached plan."""
    out = tmp_path_factory.mktemp("attached") / "SmolLM2-135M-Instruct"
    out.mkdir()
    for f in Path(model_dir).iterdir():
        if f.is_file():
            (out / f.name).symlink_to(f.resolve())
    cmd = [sys.executable, "-m", "moa_vllm.cli", "plan", "attach", str(PLANS / "moa-d0.25.json"), str(out)]
    subprocess.run(cmd, check=True)
    return out


@pytest.fixture(scope="module")
def server(folder, tmp_path_factory):
    port = free_port()
    log = tmp_path_factory.mktemp("server") / "server.log"
    cmd = [
        sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(folder),
        "--attention-backend", "moa", "--host", "127.0.0.1", "--port", str(port),
        "--max-model-len", "2048", "--enforce-eager", "--dtype", "float32", "--served-model-name", "smol",
    ]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k != "MOA_VLLM_PLAN"} | SERVER_ENV
    env |= {"VLLM_PLUGINS": "moa,moa_inspect", "MOA_VLLM_METRICS_INTERVAL": "0.2"}  # endpoint plugins are opt-in
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT)
        try:
            wait_ready(proc, port)
            yield port, log
        finally:
            stop(proc)


def test_plain_vllm_entry_serves_the_attached_plan(server, folder):
    from openai import OpenAI

    port, log = server
    text = Path(log).read_text()
    assert f"moa-vllm: plan from model folder: {folder / 'moa_plan.json'} (moa-plan)" in text
    client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none")
    r = client.completions.create(model="smol", prompt="The capital of France is", max_tokens=8, temperature=0)
    assert "Paris" in r.choices[0].text


def _get(port: int, path: str) -> dict:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=30) as r:
        return json.loads(r.read())


def _gauge(port: int, name: str) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30) as r:
        text = r.read().decode()
    found = re.search(rf"^{re.escape(name)} ([\d.eE+-]+)$", text, re.M)
    assert found, f"{name} not in /metrics"
    return float(found.group(1))


def test_plan_route_reports_source_fingerprint_density_and_spans(server, folder):
    port, _ = server
    plan = load_plan(folder / "moa_plan.json")
    info = _get(port, "/moa/plan?lengths=1024,2048&spans_at=1500")  # no key configured: open on loopback
    assert info["source"] == "model folder" and info["plan_digest"] == plan_digest(plan)
    assert str(folder) not in json.dumps(info)  # no server paths
    assert info["fingerprint"] == plan.model.model_dump()
    assert info["density"] == {"1024": plan.density(1024), "2048": plan.density(2048)}
    assert info["spans_at"] == 1500 and info["spans"] == plan.spans(1500)
    with pytest.raises(urllib.error.HTTPError) as e:
        _get(port, "/moa/plan?lengths=99999")
    assert e.value.code == 400 and "max_model_len=2048" in e.value.read().decode()


def test_requests_route_and_gauges_follow_the_load(server, folder, tokenizer):
    from openai import OpenAI

    port, _ = server
    plan = load_plan(folder / "moa_plan.json")
    client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none")
    prompt = "The history of the city is long. " * 60
    prompt_tokens = len(tokenizer.encode(prompt))
    seen: list[dict] = []
    gauge_peak = 0.0
    done = threading.Event()

    def load() -> None:
        def one(_):
            client.completions.create(model="smol", prompt=prompt, max_tokens=200, temperature=0)

        with ThreadPoolExecutor(4) as pool:
            list(pool.map(one, range(4)))
        done.set()

    worker = threading.Thread(target=load)
    worker.start()
    while not done.is_set():
        report = _get(port, "/moa/requests")
        if report["requests"]:
            seen.append(report)
        gauge_peak = max(gauge_peak, _gauge(port, "moa_vllm:kv_bytes_held"))
        time.sleep(0.1)
    worker.join()
    assert seen, "no request was ever seen holding rings"
    report = max(seen, key=lambda r: r["totals"]["requests"])
    block = report["totals"]["block_size"]
    n, cap = served_length(prompt_tokens, 200, 2048, DEFAULT_SPAN_GRID)  # the server caches prefixes
    expected_blocks = group_blocks(  # one KV cache group: every layer's layer pages in the request's blocks
        [
            layer_blocks([r.alpha for r in rules], [r.beta for r in rules], n, plan.min_span, block, len(rules), cap)
            for rules in plan.rules
        ],
        len(plan.rules),
    )
    for row in report["requests"]:
        assert row["n"] == n and row["blocks"] == expected_blocks and row["state"] == "running"
        assert row["kv_bytes"] == report["requests"][0]["kv_bytes"] > 0
    assert report["totals"]["kv_bytes"] == sum(r["kv_bytes"] for r in report["requests"])
    assert gauge_peak > 0
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if not _get(port, "/moa/requests")["requests"] and _gauge(port, "moa_vllm:kv_bytes_held") == 0:
            break
        time.sleep(0.2)
    assert _get(port, "/moa/requests")["totals"]["kv_bytes"] == 0
    assert _gauge(port, "moa_vllm:kv_bytes_held") == 0
