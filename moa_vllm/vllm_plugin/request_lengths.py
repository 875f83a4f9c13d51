"""Per-step request lengths N, handed from the model runner (patched) to the MoA metadata builder.

vLLM's CommonAttentionMetadata carries no sampling parameters, but a request's spans depend on its max_tokens.
The runner patch publishes N for the rows of the batch it is about to build metadata for; the builder reads it.
Both run in the same worker process and thread, one step at a time.
"""

from __future__ import annotations

import numpy as np

from moa_vllm.plan.span import request_length

_current: np.ndarray = np.zeros(0, dtype=np.int64)


def publish(prompt_tokens: list[int], max_tokens: list[int | None], max_model_len: int) -> None:
    global _current
    _current = np.array(
        [request_length(p, m, max_model_len) for p, m in zip(prompt_tokens, max_tokens)], dtype=np.int64
    )


def current(num_reqs: int, max_model_len: int) -> np.ndarray:
    """N for the first num_reqs rows; rows the runner did not describe (dummy/profile runs) get max_model_len."""
    out = np.full(num_reqs, max_model_len, dtype=np.int64)
    k = min(num_reqs, len(_current))
    out[:k] = _current[:k]
    return out


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
