"""HTTP side: routes under /moa on vLLM's own OpenAI server and Prometheus gauges next to vLLM's metrics.

Loaded through vLLM's `vllm.endpoint_plugins` entry point `moa_inspect`; vLLM loads endpoint plugins only when named
in VLLM_PLUGINS (`moa-vllm serve` sets VLLM_PLUGINS=moa,moa_inspect unless the user set it). The routes live on the
server's own socket, so they bind where the server binds (127.0.0.1 by default with `moa-vllm serve`).

- GET /moa/plan?lengths=1024,8192&spans_at=4096: the plan's source kind, its digest (what decides the masks) and the
  model fingerprint, density at the lengths, spans per layer and KV head at `spans_at` (default: max_model_len).
  No server paths.
- GET /moa/requests: per request holding rings: an opaque handle (not the client's request id), state, N, blocks,
  KV bytes; totals and the block pool; the snapshot's age.
- Gauges moa_vllm:kv_bytes_held, moa_vllm:kv_blocks_held, moa_vllm:requests_holding_rings on vLLM's /metrics.

Security. vLLM's key check guards only /v1, /v2, /inference and /cohere, so `MoAAuthMiddleware` guards /moa with
the same keys (`--api-key`, else VLLM_API_KEY), the same header and the same 401 body, using vLLM's own token check.
Request ids are chosen by clients (X-Request-Id, and the Responses API's id that GET/cancel accept), so the
report shows a keyed hash of each id instead; MOA_VLLM_INSPECT_REQUEST_IDS=1 adds the ids (operators only).
The engine is asked once per MOA_VLLM_METRICS_INTERVAL seconds (default 1) by one poller; GETs read its last
snapshot, so no client can add work to the engine's busy loop.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import os
import time
from dataclasses import dataclass, field
from typing import Any

from fastapi import APIRouter, HTTPException, Query, Request
from vllm.logger import init_logger

from moa_vllm.vllm_plugin.inspect.report import UTILITY

logger = init_logger("vllm.moa_vllm")
router = APIRouter(prefix="/moa", tags=["moa"])
PREFIX = "/moa"
INTERVAL_ENV = "MOA_VLLM_METRICS_INTERVAL"
SHOW_IDS_ENV = "MOA_VLLM_INSPECT_REQUEST_IDS"
DEFAULT_LENGTHS = (1024, 4096, 8192)
MAX_LENGTHS = 64  # per /moa/plan request: each is a density computed on the API server's event loop
MIN_INTERVAL_S = 0.05  # the poller never asks the engine more often than this, whatever the environment says
UNAUTHORIZED = {"error": "Unauthorized"}  # vLLM's own 401 body (AuthenticationMiddleware)
_gauges: dict[str, Any] = {}


def gauges() -> dict[str, Any]:
    """The three gauges, registered once per process in prometheus_client's default registry (vLLM's /metrics)."""
    if not _gauges:
        from prometheus_client import Gauge

        _gauges["kv_bytes"] = Gauge("moa_vllm:kv_bytes_held", "KV bytes held by moa rings (all requests)")
        _gauges["blocks"] = Gauge("moa_vllm:kv_blocks_held", "KV cache blocks held by moa rings (all requests)")
        _gauges["requests"] = Gauge("moa_vllm:requests_holding_rings", "Requests holding moa ring blocks")
    return _gauges


# ---- authentication ---------------------------------------------------------------------------------------------
def api_tokens(args: Any) -> list[str]:
    """The server's keys as vLLM resolves them: --api-key (one or more) wins over VLLM_API_KEY; empty: none."""
    from vllm import envs

    keys = getattr(args, "api_key", None)
    if isinstance(keys, str):
        keys = [keys]
    return [k for k in (keys or [envs.VLLM_API_KEY]) if k]


def token_checker(tokens: list[str]):
    """vLLM's own bearer-token check over these keys, or None when no key is configured (routes stay open)."""
    if not tokens:
        return None
    from vllm.entrypoints.serve.middleware.authenticate import AuthenticationMiddleware

    return AuthenticationMiddleware(app=None, tokens=tokens)


class MoAAuthMiddleware:
    """ASGI middleware: a /moa request needs the server's key when one is configured. The checker is set on
    app.state by init_state (after vLLM parsed its arguments); until then /moa answers 503."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] not in ("http", "websocket") or scope.get("method") == "OPTIONS":
            return await self.app(scope, receive, send)
        path = scope["path"].removeprefix(scope.get("root_path", ""))
        if path == PREFIX or path.startswith(PREFIX + "/"):
            from starlette.datastructures import Headers
            from starlette.responses import JSONResponse

            state = scope["app"].state
            if not hasattr(state, "moa_auth"):
                return await JSONResponse({"error": "moa-vllm: starting"}, status_code=503)(scope, receive, send)
            checker = state.moa_auth
            if checker is not None and not checker.verify_token(Headers(scope=scope)):
                return await JSONResponse(UNAUTHORIZED, status_code=401)(scope, receive, send)
        return await self.app(scope, receive, send)


# ---- the engine snapshot -----------------------------------------------------------------------------------------
@dataclass
class Snapshot:
    """The poller's last engine report, with client-chosen ids replaced by handles."""

    taken: float | None = None  # time.monotonic()
    body: dict[str, Any] = field(default_factory=dict)


def request_handle(secret: bytes, request_id: str) -> str:
    """An opaque, stable per-request handle: HMAC of the id under a key that never leaves the server process."""
    return hmac.new(secret, request_id.encode(), hashlib.sha256).hexdigest()[:16]


def redact(report: dict[str, Any], secret: bytes, show_ids: bool) -> dict[str, Any]:
    """The engine report as clients see it: each row's id becomes its handle (the id stays only if show_ids)."""
    rows = []
    for row in report["requests"]:
        shown = {"handle": request_handle(secret, row["id"]), **{k: v for k, v in row.items() if k != "id"}}
        if show_ids:
            shown["id"] = row["id"]
        rows.append(shown)
    return {"engine_reports": report["serial"], "requests": rows, "totals": report["totals"]}


async def poll_engine(engine, state, interval_s: float) -> None:
    """Ask the engine for its report once per interval, keep it as the snapshot and set the gauges, until
    cancelled; a failed poll is logged once and retried (snapshot and gauges keep their last value)."""
    g, warned = gauges(), False
    show_ids = os.environ.get(SHOW_IDS_ENV, "0") == "1"
    while True:
        try:
            report = await engine.engine_core.call_utility_async(UTILITY)
            state.moa_snapshot = Snapshot(time.monotonic(), redact(report, state.moa_handle_secret, show_ids))
            totals = report["totals"]
            g["kv_bytes"].set(totals["kv_bytes"])
            g["blocks"].set(totals["blocks"])
            g["requests"].set(totals["requests"])
            warned = False
        except asyncio.CancelledError:
            raise
        except Exception as e:  # the engine may be starting, busy or gone
            if not warned:
                logger.warning("moa-vllm: engine report poll failed: %s", e)
                warned = True
        await asyncio.sleep(interval_s)


# ---- routes ------------------------------------------------------------------------------------------------------
def _moa_state(request: Request):
    state = request.app.state
    if getattr(state, "moa_engine_client", None) is None:
        raise HTTPException(status_code=503, detail="moa-vllm: no engine attached to this server")
    if getattr(state, "moa_plan", None) is None:
        raise HTTPException(status_code=404, detail="moa-vllm: this server does not run --attention-backend moa")
    return state


def _lengths(text: str, max_len: int) -> list[int]:
    try:
        values = [int(x) for x in text.replace(" ", "").split(",") if x]
    except ValueError as e:
        raise HTTPException(status_code=400, detail=f"lengths: comma-separated integers expected ({e})") from e
    if len(values) > MAX_LENGTHS:
        raise HTTPException(status_code=400, detail=f"lengths: at most {MAX_LENGTHS} values, got {len(values)}")
    bad = [n for n in values if not 1 <= n <= max_len]
    if bad or not values:
        raise HTTPException(status_code=400, detail=f"lengths: each in 1..max_model_len={max_len}, got {text!r}")
    return values


@router.get("/plan")
async def plan_info(
    request: Request, lengths: str | None = Query(None), spans_at: int | None = Query(None)
) -> dict[str, Any]:
    from moa_vllm.plan.io import plan_digest

    state = _moa_state(request)
    plan, source, max_len = state.moa_plan, state.moa_plan_source, state.moa_max_model_len
    at = max_len if spans_at is None else _lengths(str(spans_at), max_len)[0]
    default = [n for n in DEFAULT_LENGTHS if n <= max_len] or [max_len]  # the ones this server admits
    ns = default if lengths is None else _lengths(lengths, max_len)
    return {
        "source": source,
        "plan_digest": plan_digest(plan),
        "method": plan.metadata.method,
        "fingerprint": plan.model.model_dump(),
        "sink_tokens": plan.sink_tokens,
        "min_span": plan.min_span,
        "max_model_len": max_len,
        "density": {str(n): plan.density(n) for n in ns},
        "spans_at": at,
        "spans": plan.spans(at),
    }


@router.get("/requests")
async def requests_info(request: Request) -> dict[str, Any]:
    state = _moa_state(request)
    snapshot: Snapshot = state.moa_snapshot
    if snapshot.taken is None:
        raise HTTPException(status_code=503, detail="moa-vllm: no engine report yet (the poller has not run)")
    age = time.monotonic() - snapshot.taken
    return {"snapshot_age_s": round(age, 3), "poll_interval_s": state.moa_poll_interval_s, **snapshot.body}


class MoAInspectPlugin:
    """The `vllm.endpoint_plugins` entry point (see vllm.plugins.endpoint_plugins.interface.EndpointPlugin)."""

    name = "moa_inspect"
    required_tasks = ("generate",)

    def attach_router(self, app) -> None:
        app.include_router(router)
        app.add_middleware(MoAAuthMiddleware)

    async def init_state(self, engine_client, state, args) -> None:
        state.moa_auth = token_checker(api_tokens(args))
        state.moa_engine_client = engine_client
        state.moa_plan = None
        if engine_client is None:
            return
        from moa_vllm.vllm_plugin.settings import moa_selected, resolve_plan

        config = engine_client.vllm_config
        if not moa_selected(config):
            return
        model_config = config.model_config
        resolved = resolve_plan(config.additional_config, str(model_config.model), model_config.hf_config)
        state.moa_plan, state.moa_plan_source = resolved.plan, resolved.source
        state.moa_max_model_len = model_config.max_model_len
        state.moa_handle_secret = os.urandom(32)
        state.moa_snapshot = Snapshot()
        state.moa_poll_interval_s = max(MIN_INTERVAL_S, float(os.environ.get(INTERVAL_ENV, "1")))
        state.moa_poll_task = asyncio.get_running_loop().create_task(
            poll_engine(engine_client, state, state.moa_poll_interval_s)
        )
