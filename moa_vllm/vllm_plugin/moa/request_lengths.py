"""Request lengths N on the scheduler side: KV cache managers see only request ids, the ring size needs N.

The admission patch records each request's N (prompt + max_tokens, capped by max_model_len) before vLLM asks the
managers for blocks and forgets it when the request's blocks are freed. Scheduler process only, one engine per
process. The worker side (N per batch row for the metadata builder) is moa_vllm/vllm_plugin/moa/ring_state.py.
"""

from __future__ import annotations

# ---- scheduler side -------------------------------------------------------------------------------------------------
# KV cache managers see only request ids; the admission patch records each request's N before vLLM asks them for
# blocks and forgets it when the request's blocks are freed. Scheduler process only, one engine per process.
_admitted: dict[str, int] = {}


def admit(request_id: str, n: int) -> None:
    _admitted[request_id] = n


def is_admitted(request_id: str) -> bool:
    return request_id in _admitted


def forget(request_id: str) -> None:
    _admitted.pop(request_id, None)


def admitted(request_id: str) -> int:
    try:
        return _admitted[request_id]
    except KeyError:
        raise RuntimeError(
            f"moa-vllm: no request length recorded for request {request_id!r}; the admission_lengths patch of "
            "KVCacheManager.allocate_slots did not run (unsupported vLLM code path?)"
        ) from None
