"""What a request holds in vLLM's KV/state cache, read from the engine core's own cache manager (in-process engine,
``VLLM_ENABLE_V1_MULTIPROCESSING=0``). Shared by the BST engine tests and the recall benchmark."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class GroupHolding:
    """One KV cache group's share of a request: live blocks and the bytes they pin across the group's layers."""

    kind: str  # the spec class name, e.g. MambaSpec, MoARingSpec
    layers: int
    blocks: int
    bytes_allocated: int  # pages as vLLM allocates them (state pages padded to the attention page size)
    bytes_content: int  # bytes the model actually stores in those pages


def request_holdings(core: Any, req_id: str) -> list[GroupHolding]:
    """Per KV cache group, what request ``req_id`` (vLLM's internal id) holds right now."""
    config = core.scheduler.kv_cache_config
    managers = core.scheduler.kv_cache_manager.coordinator.single_type_managers
    out = []
    for group, manager in zip(config.kv_cache_groups, managers):
        spec = group.kv_cache_spec
        live = sum(not b.is_null for b in manager.req_to_blocks.get(req_id, []))
        layers = len(group.layer_names)
        out.append(
            GroupHolding(
                kind=type(spec).__name__,
                layers=layers,
                blocks=live,
                bytes_allocated=live * spec.page_size_bytes * layers,
                bytes_content=live * _content_bytes(spec) * layers,
            )
        )
    return out


def _content_bytes(spec: Any) -> int:
    """Bytes per block that hold data: a state page's real size (before padding), else the page size."""
    real = getattr(spec, "real_page_size_bytes", None)
    if isinstance(real, int):
        return real
    return spec.page_size_bytes
