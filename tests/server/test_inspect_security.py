"""The /moa routes on a real server with a key: closed as vLLM's own /v1 routes are (same header, same 401 body),
with the key from --api-key or from VLLM_API_KEY; no client-chosen request id and no server path in any /moa
answer by default (the ids only with the operator's opt-in); GETs served from the poller's snapshot."""

from __future__ import annotations

import json
import threading
import time
import urllib.error
import urllib.request

import pytest

from moa_vllm.server_process import serving
from tests.conftest import PLANS

pytestmark = pytest.mark.server

KEY = "moa-test-key-8c1f"
SECRET_ID = "secret-trace-123"
ARGS = ["--plan", str(PLANS / "uniform-d0.25.json"), "--max-model-len", "2048", "--enforce-eager", "--dtype", "float32"]


def _get(port: int, path: str, key: str | None = None) -> tuple[int, str]:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=30) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def _stream_with_request_id(port: int, key: str, done: threading.Event) -> None:
    """A long streaming completion whose X-Request-Id is SECRET_ID (vLLM builds the request id from it)."""
    body = json.dumps({"prompt": "Once upon a time " * 40, "max_tokens": 120, "temperature": 0, "stream": True})
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/v1/completions",
        data=body.encode(),
        headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json", "X-Request-Id": SECRET_ID},
    )
    try:
        with urllib.request.urlopen(request, timeout=300) as r:
            for _ in r:
                pass
    finally:
        done.set()


def _reports_during_a_request(port: int, key: str) -> list[str]:
    """Every /moa/requests body seen while a request with X-Request-Id SECRET_ID runs (rows present)."""
    done, bodies = threading.Event(), []
    worker = threading.Thread(target=_stream_with_request_id, args=(port, key, done))
    worker.start()
    while not done.is_set():
        status, text = _get(port, "/moa/requests", key)
        assert status == 200, text
        if json.loads(text)["requests"]:
            bodies.append(text)
        time.sleep(0.05)
    worker.join()
    return bodies


@pytest.fixture(scope="module")
def keyed(model_dir, tmp_path_factory):
    log = tmp_path_factory.mktemp("keyed") / "server.log"
    with serving(["serve", str(model_dir), *ARGS, "--api-key", KEY], log, {"MOA_VLLM_METRICS_INTERVAL": "0.2"}) as port:
        yield port


def test_moa_routes_need_the_key_like_v1(keyed):
    v1_status, v1_body = _get(keyed, "/v1/models")
    assert v1_status == 401
    for path in ("/moa/plan", "/moa/requests", "/moa/plan?lengths=1024"):
        assert _get(keyed, path) == (401, v1_body), path  # same status, same body as vLLM's own check
        assert _get(keyed, path, "wrong-key")[0] == 401
        status, text = _get(keyed, path, KEY)
        assert status == 200, text
    assert _get(keyed, "/health")[0] == 200  # vLLM leaves /health open; so do we


def test_no_request_id_or_server_path_is_shown(keyed, model_dir):
    bodies = _reports_during_a_request(keyed, KEY)
    assert bodies, "no request was ever seen holding rings"
    for text in bodies:
        assert SECRET_ID not in text
        row = json.loads(text)["requests"][0]
        assert "id" not in row and len(row["handle"]) == 16 and row["n"] > 0
    report = json.loads(bodies[-1])
    assert report["snapshot_age_s"] >= 0 and report["poll_interval_s"] == 0.2 and report["engine_reports"] >= 1
    _, plan = _get(keyed, "/moa/plan", KEY)
    info = json.loads(plan)
    assert info["source"] == "additional_config" and len(info["plan_digest"]) == 16
    assert str(PLANS) not in plan and str(model_dir) not in plan and "uniform-d0.25" not in plan


def test_vllm_api_key_env_closes_the_routes_and_ids_need_the_opt_in(model_dir, tmp_path):
    """The key from VLLM_API_KEY (no flag); with MOA_VLLM_INSPECT_REQUEST_IDS=1 the operator sees the ids: the
    same client id that is absent by default is then present (so the default's absence is no accident)."""
    env = {"VLLM_API_KEY": KEY, "MOA_VLLM_METRICS_INTERVAL": "0.2", "MOA_VLLM_INSPECT_REQUEST_IDS": "1"}
    with serving(["serve", str(model_dir), *ARGS], tmp_path / "server.log", env) as port:
        assert _get(port, "/moa/requests")[0] == 401 and _get(port, "/v1/models")[0] == 401
        bodies = _reports_during_a_request(port, KEY)
        assert bodies and all(SECRET_ID in text for text in bodies)
        row = json.loads(bodies[0])["requests"][0]
        assert SECRET_ID in row["id"] and len(row["handle"]) == 16
