"""Hostile input and a dying engine against the real OpenAI server (moa backend): request bodies generated with
hypothesis (bad types, negative or huge max_tokens, prompts longer than max_model_len, empty and non-UTF-8 text,
huge n, out-of-vocabulary token ids) are each answered with a 4xx and a message, and the server stays healthy;
the engine process killed under load makes the API server report it and exit non-zero instead of hanging."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
import urllib.error
import urllib.request

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from moa_vllm.server_process import free_port, moa_vllm, process_tree, stop, wait_ready
from tests.conftest import PLANS

pytestmark = pytest.mark.server

MAX_MODEL_LEN = 1024
VOCAB = 49152


def _serve(model_dir, log):
    port = free_port()
    proc = moa_vllm(
        "serve", str(model_dir), "--plan", str(PLANS / "moa-d0.25.json"), "--port", str(port),
        "--max-model-len", str(MAX_MODEL_LEN), "--dtype", "float32", "--served-model-name", "smol",
        "--kv-cache-memory-bytes", str(2**29), "--max-num-seqs", "8",
        stdout=open(log, "w"), stderr=subprocess.STDOUT,
    )  # fmt: skip
    wait_ready(proc, port)
    return proc, port


@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory):
    proc, port = _serve(model_dir, tmp_path_factory.mktemp("faults") / "server.log")
    yield port
    stop(proc)


def post(port: int, body: bytes, timeout: float = 120) -> tuple[int, str]:
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/v1/completions", data=body, headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as r:
            return r.status, r.read().decode(errors="replace")
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode(errors="replace")


def body(**fields) -> bytes:
    return json.dumps({"model": "smol", "prompt": "Hello", "max_tokens": 4, **fields}).encode()


NOT_A_PROMPT = st.one_of(  # a prompt is str | list[str] | list[int] | list[list[int]]
    st.dictionaries(st.text(max_size=3), st.integers(), min_size=1, max_size=2),
    st.lists(st.dictionaries(st.text(max_size=3), st.integers(), max_size=1), min_size=1, max_size=2),
)
BAD_TYPE = st.one_of(
    st.dictionaries(st.text(max_size=3), st.integers(), min_size=1, max_size=2),
    st.lists(st.text(), min_size=1, max_size=2),
)
HOSTILE = st.one_of(
    st.builds(lambda v: body(max_tokens=v), st.integers(max_value=-1)),
    st.builds(lambda v: body(max_tokens=v), st.integers(min_value=MAX_MODEL_LEN + 1, max_value=2**62)),
    st.builds(lambda v: body(max_tokens=v), st.one_of(st.text(min_size=1, max_size=5), BAD_TYPE)),
    st.builds(lambda n: body(prompt=[7] * n), st.integers(min_value=MAX_MODEL_LEN + 1, max_value=4 * MAX_MODEL_LEN)),
    st.builds(lambda v: body(prompt=v), st.one_of(st.integers(), st.booleans(), st.floats(), NOT_A_PROMPT)),
    st.builds(lambda ids: body(prompt=ids), st.lists(st.integers(VOCAB, 2**40), min_size=1, max_size=4)),
    st.builds(lambda ids: body(prompt=ids), st.lists(st.integers(max_value=-1), min_size=1, max_size=4)),
    st.builds(lambda n: body(n=n), st.integers(min_value=10**4, max_value=2**62)),
    st.builds(lambda n: body(n=n), st.integers(max_value=0)),
    st.builds(lambda t: body(temperature=t), st.floats(max_value=-0.01, allow_nan=False)),
    st.just(body(prompt="")),
    st.builds(lambda raw: b'{"model": "smol", "prompt": "\xff' + raw + b'", "max_tokens": 4}', st.binary(max_size=8)),
    st.just(b"{not json"),
)  # fmt: skip


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(payload=HOSTILE)
def test_hostile_bodies_get_a_4xx_with_a_message(server, payload):
    status, text = post(server, payload)
    assert 400 <= status < 500, (status, payload[:200], text[:300])
    assert len(text.strip()) > 0


def test_server_is_healthy_after_the_fuzz(server):
    with urllib.request.urlopen(f"http://127.0.0.1:{server}/health", timeout=10) as r:
        assert r.status == 200
    status, text = post(server, body(prompt="The capital of France is", temperature=0))
    assert status == 200 and json.loads(text)["choices"][0]["text"]


def test_a_killed_engine_makes_the_server_exit_nonzero(model_dir, tmp_path):
    log = tmp_path / "server.log"
    proc, port = _serve(model_dir, log)
    try:
        engines = [p for p in process_tree(proc.pid)[1:] if "EngineCore" in _cmdline(p)]
        assert engines, "no engine core process found"
        load = [threading.Thread(target=post, args=(port, body(max_tokens=200, prompt="x " * 300), 60), daemon=True)
                for _ in range(4)]  # fmt: skip
        for t in load:
            t.start()
        time.sleep(2)
        os.kill(engines[0], signal.SIGKILL)
        rc = proc.wait(timeout=120)  # a hang fails here
        assert rc == 1
        text = log.read_text(errors="replace")
        assert "EngineDeadError" in text and "moa-vllm: the engine process died" in text
    finally:
        if proc.poll() is None:
            stop(proc)


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmd = f.read().replace(b"\0", b" ").decode(errors="replace")
        with open(f"/proc/{pid}/comm") as f:
            return cmd + " " + f.read()
    except OSError:
        return ""
