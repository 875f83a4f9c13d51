"""Request lengths on the scheduler side: KV cache managers see only request ids, the ring size needs N.

The admission patch records each request's span length L (plan/span.span_length), its own length N (the cap of
every span) and its prompt length before vLLM asks the managers for blocks, and forgets both when the request's
blocks are freed. It also records a request whose chunk found no room for its prefix blocks: that request stops
caching (kv_spec.py). Scheduler process only, one engine per process. The worker side (N per batch row for the
metadata builder) is moa_vllm/vllm_plugin/moa/ring_state.py.
"""

from __future__ import annotations

# ---- scheduler side -------------------------------------------------------------------------------------------------
# KV cache managers see only request ids; the admission patch records each request's N before vLLM asks them for
# blocks and forgets it when the request's blocks are freed. Scheduler process only, one engine per process.
_admitted: dict[str, tuple[int, int, int]] = {}  # request id -> (L, prompt tokens, N)
_not_caching: set[str] = set()


def admit(request_id: str, n: int, prompt_tokens: int = 0, cap: int | None = None) -> None:
    _admitted[request_id] = (n, prompt_tokens, n if cap is None else cap)


def is_admitted(request_id: str) -> bool:
    return request_id in _admitted


def forget(request_id: str) -> None:
    _admitted.pop(request_id, None)
    _not_caching.discard(request_id)


def _entry(request_id: str) -> tuple[int, int, int]:
    try:
        return _admitted[request_id]
    except KeyError:
        raise RuntimeError(
            f"moa-vllm: no request length recorded for request {request_id!r}; the admission_lengths patch of "
            "KVCacheManager.allocate_slots did not run (unsupported vLLM code path?)"
        ) from None


def admitted(request_id: str) -> int:
    """The span length L its spans are taken at."""
    return _entry(request_id)[0]


def own_length(request_id: str) -> int:
    """Its own N (prompt + max_tokens, capped): no span exceeds it."""
    return _entry(request_id)[2]


def prompt_tokens(request_id: str) -> int:
    return _entry(request_id)[1]


def caching_allowed(request_id: str) -> bool:
    """False once one of the request's chunks had no room for its prefix blocks (until the request is freed)."""
    return request_id not in _not_caching


def set_caching(request_id: str, allowed: bool) -> None:
    if allowed:
        _not_caching.discard(request_id)
    else:
        _not_caching.add(request_id)
