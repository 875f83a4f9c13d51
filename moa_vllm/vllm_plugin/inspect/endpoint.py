"""HTTP side: routes under /moa on vLLM's own OpenAI server and Prometheus gauges next to vLLM's metrics.

Loaded through vLLM's `vllm.endpoint_plugins` entry point `moa_inspect`; vLLM loads endpoint plugins only when named
in VLLM_PLUGINS (`moa-vllm serve` sets VLLM_PLUGINS=moa,moa_inspect unless the user set it). The routes live on the
server's own socket, so they bind where the server binds (127.0.0.1 by default with `moa-vllm serve`).

- GET /moa/plan?lengths=1024,8192&spans_at=4096: where the plan came from, its fingerprint, density at the lengths,
  spans per layer and KV head at `spans_at` (default: max_model_len).
- GET /moa/requests: per request holding rings: id, state, N, blocks, KV bytes; totals and the block pool.
- Gauges moa_vllm:kv_bytes_held, moa_vllm:kv_blocks_held, moa_vllm:requests_holding_rings, refreshed from the engine
  every MOA_VLLM_METRICS_INTERVAL seconds (default 1).
"""

from __future__ import annotations

import asyncio
import os
from typing import Any

from fastapi import APIRouter, HTTPException, Query, Request
from vllm.logger import init_logger

from moa_vllm.vllm_plugin.inspect.report import UTILITY

logger = init_logger("vllm.moa_vllm")
router = APIRouter(prefix="/moa", tags=["moa"])
INTERVAL_ENV = "MOA_VLLM_METRICS_INTERVAL"
_gauges: dict[str, Any] = {}


def gauges() -> dict[str, Any]:
    """The three gauges, registered once per process in prometheus_client's default registry (vLLM's /metrics)."""
    if not _gauges:
        from prometheus_client import Gauge

        _gauges["kv_bytes"] = Gauge("moa_vllm:kv_bytes_held", "KV bytes held by moa rings (all requests)")
        _gauges["blocks"] = Gauge("moa_vllm:kv_blocks_held", "KV cache blocks held by moa rings (all requests)")
        _gauges["requests"] = Gauge("moa_vllm:requests_holding_rings", "Requests holding moa ring blocks")
    return _gauges


def _engine(request: Request):
    engine = getattr(request.app.state, "moa_engine_client", None)
    if engine is None:
        raise HTTPException(status_code=503, detail="moa-vllm: no engine attached to this server")
    return engine


def _moa_config(engine) -> Any:
    from moa_vllm.vllm_plugin.patches import moa_selected

    config = engine.vllm_config
    if not moa_selected(config):
        raise HTTPException(status_code=404, detail="moa-vllm: this server does not run --attention-backend moa")
    return config


def _lengths(text: str, max_len: int) -> list[int]:
    try:
        values = [int(x) for x in text.replace(" ", "").split(",") if x]
    except ValueError as e:
        raise HTTPException(status_code=400, detail=f"lengths: comma-separated integers expected ({e})") from e
    bad = [n for n in values if not 1 <= n <= max_len]
    if bad or not values:
        raise HTTPException(status_code=400, detail=f"lengths: each in 1..max_model_len={max_len}, got {text!r}")
    return values


@router.get("/plan")
async def plan_info(
    request: Request, lengths: str = Query("1024,4096,8192"), spans_at: int | None = Query(None)
) -> dict[str, Any]:
    from moa_vllm.plan.schema import Plan
    from moa_vllm.vllm_plugin.settings import resolve_plan

    config = _moa_config(_engine(request))
    model_config = config.model_config
    max_len = model_config.max_model_len
    resolved = resolve_plan(config.additional_config, str(model_config.model), model_config.hf_config)
    plan: Plan = resolved.plan
    at = max_len if spans_at is None else _lengths(str(spans_at), max_len)[0]
    return {
        "source": resolved.source,
        "where": resolved.where,
        "method": plan.metadata.method,
        "fingerprint": plan.model.model_dump(),
        "sink_tokens": plan.sink_tokens,
        "min_span": plan.min_span,
        "max_model_len": max_len,
        "density": {str(n): plan.density(n) for n in _lengths(lengths, max_len)},
        "spans_at": at,
        "spans": plan.spans(at),
    }


@router.get("/requests")
async def requests_info(request: Request) -> dict[str, Any]:
    engine = _engine(request)
    _moa_config(engine)
    return await engine.engine_core.call_utility_async(UTILITY)


async def poll_gauges(engine, interval_s: float) -> None:
    """Refresh the gauges from the engine until cancelled; a failed poll is logged once and retried."""
    g, warned = gauges(), False
    while True:
        try:
            totals = (await engine.engine_core.call_utility_async(UTILITY))["totals"]
            g["kv_bytes"].set(totals["kv_bytes"])
            g["blocks"].set(totals["blocks"])
            g["requests"].set(totals["requests"])
            warned = False
        except asyncio.CancelledError:
            raise
        except Exception as e:  # the engine may be starting, busy or gone; the gauges keep their last value
            if not warned:
                logger.warning("moa-vllm: metrics poll failed: %s", e)
                warned = True
        await asyncio.sleep(interval_s)


class MoAInspectPlugin:
    """The `vllm.endpoint_plugins` entry point (see vllm.plugins.endpoint_plugins.interface.EndpointPlugin)."""

    name = "moa_inspect"
    required_tasks = ("generate",)

    def attach_router(self, app) -> None:
        app.include_router(router)

    async def init_state(self, engine_client, state, args) -> None:
        state.moa_engine_client = engine_client
        if engine_client is None:
            return
        from moa_vllm.vllm_plugin.patches import moa_selected

        if moa_selected(engine_client.vllm_config):
            interval = float(os.environ.get(INTERVAL_ENV, "1"))
            state.moa_gauge_task = asyncio.get_running_loop().create_task(poll_gauges(engine_client, interval))
