"""Engine side: per request, its N and the ring blocks and bytes it holds, read from the scheduler's KV cache
manager. Installed on vLLM's EngineCore as the utility method `moa_inspect` (patch `engine_inspect`), which the API
server reaches through the engine client's utility call, as vLLM's own utilities (reset_prefix_cache, ...) are."""

from __future__ import annotations

from typing import Any

UTILITY = "moa_inspect"


def request_report(kv_cache_manager, request_ids: list[str], states: dict[str, str]) -> dict[str, Any]:
    """{"requests": [{id, state, n, blocks, kv_bytes}], "totals": {...}} over the MoA layers' ring managers."""
    from moa_vllm.vllm_plugin.moa import request_lengths
    from moa_vllm.vllm_plugin.moa.kv_spec import ring_held, ring_managers

    managers = ring_managers(kv_cache_manager)
    rows = []
    for rid in request_ids:
        held_by = [(ring_held(m, rid), m.kv_cache_spec.block_bytes) for m in managers]
        blocks = sum(b for b, _ in held_by)
        if blocks == 0:
            continue  # waiting, or finished and freed: holds nothing
        rows.append(
            {
                "id": rid,
                "state": states.get(rid, "unknown"),
                "n": request_lengths.admitted(rid) if request_lengths.is_admitted(rid) else None,
                "blocks": blocks,
                "kv_bytes": sum(b * size for b, size in held_by),
            }
        )
    pool = kv_cache_manager.block_pool
    return {
        "requests": rows,
        "totals": {
            "requests": len(rows),
            "blocks": sum(r["blocks"] for r in rows),
            "kv_bytes": sum(r["kv_bytes"] for r in rows),
            "moa_layers": sum(m.kv_cache_spec.num_layers for m in managers),  # one ring manager for all of them
            "block_size": managers[0].kv_cache_spec.block_size if managers else None,
            "pool_blocks": pool.num_gpu_blocks,
            "pool_free_blocks": pool.get_num_free_blocks(),
        },
    }


COUNTER = "_moa_inspect_calls"


def engine_report(engine_core) -> dict[str, Any]:
    """The report of one EngineCore: every request its scheduler knows, running or waiting. `serial` counts the
    reports this engine has made (the API server asks once per poll interval, whatever its GET rate)."""
    serial = getattr(engine_core, COUNTER, 0) + 1
    setattr(engine_core, COUNTER, serial)
    scheduler = engine_core.scheduler
    states = {rid: str(getattr(req.status, "name", req.status)).lower() for rid, req in scheduler.requests.items()}
    return {"serial": serial, **request_report(scheduler.kv_cache_manager, list(scheduler.requests), states)}
