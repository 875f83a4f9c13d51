"""The per-engine context of the worker side: the batch the model runner published for the step, and the ring state
every MoA metadata builder of the engine shares.

The builders see attention metadata without request ids or sampling parameters, so the runner patches
(patches.py: `request_lengths` on model runner V1, `request_lengths_v2` on V2) publish each row's request id and
N before the builders run. The context hangs on the engine's VllmConfig, the one object the runner and every
builder of an engine receive: two engines in one process (tests build several in turn) never share it, and
nothing lives in module globals. A batch is published once per step; a build that finds nothing published, a
publication already used by a forward, or more rows than were published raises instead of guessing which
request a row is (a guess would attend over another request's keys or over nothing).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from moa_vllm.plan.span import request_length, span_length
from moa_vllm.vllm_plugin.moa.published_batch import PublishedBatch

if TYPE_CHECKING:
    from moa_vllm.vllm_plugin.moa.ring_state import RingBuffers, RingState

_ATTR = "_moa_engine_context"


class EngineContext:
    """One engine's worker-side hand-off. `published` is replaced by every publish; `ring_buffers` are allocated by
    the first MoA layer's impl while the model is built (before memory profiling); `ring_state` is made by the
    first builder (backend.ring_state) on those buffers and shared by all layers."""

    def __init__(self, span_grid: int = 0, span_floor: int = 0) -> None:
        self.published: PublishedBatch | None = None
        self.ring_state: RingState | None = None
        self.ring_buffers: RingBuffers | None = None
        self.cache_region: tuple | None = None  # (allocation id, cells view, CellMap) of the MoA layers' KV cache
        self.dummy_runs = 0  # > 0 while the V1 runner is inside _dummy_run (warm-up, profiling)
        self.span_grid = span_grid  # steps per octave N is rounded up to (settings.span_grid)
        self.span_floor = span_floor  # the server's span length (settings.span_floor)
        self.span_hints: dict[str, int] = {}  # request id -> its client's moa_span_length, until it finishes
        self.fresh_ids: set[str] = set()  # requests whose block lists the runner (re)assigned, until published
        self._serial = 0

    def __reduce__(self):  # a config pickled to another process starts that process's engine afresh
        return (EngineContext, (self.span_grid, self.span_floor))

    def publish(
        self, req_ids: list[str | None], lengths, dummy: bool = False, prompts=None, max_model_len: int | None = None
    ) -> PublishedBatch:
        """The step's rows: request ids and N row by row (when max_model_len is given, N is kept as each row's cap
        and its spans are taken at its span length: span.span_length with the row's hint and the server's floor); a
        new serial marks a new step for the builders. Rows of requests in `fresh_ids` are marked fresh."""
        if len(req_ids) != len(lengths):
            raise ValueError(f"moa-vllm: {len(req_ids)} request ids but {len(lengths)} lengths published")
        caps = None
        if max_model_len is not None:
            caps = np.asarray(lengths, dtype=np.int64)
            lengths = [
                span_length(int(n), max_model_len, self.span_grid, self.span_hints.get(rid), self.span_floor)
                for rid, n in zip(req_ids, lengths, strict=True)
            ]
        fresh = tuple(rid is not None and rid in self.fresh_ids for rid in req_ids)
        self.fresh_ids.difference_update(rid for rid in req_ids if rid is not None)
        self._serial += 1
        self.published = PublishedBatch(
            self._serial,
            tuple(req_ids),
            np.asarray(lengths, dtype=np.int64),
            dummy,
            None if prompts is None else np.asarray(prompts, dtype=np.int64),
            fresh,
            caps,
        )
        return self.published

    def publish_requests(
        self, req_ids: list[str | None], prompt_tokens: list[int], max_tokens: list[int | None], max_model_len: int
    ) -> PublishedBatch:
        """Model runner V1: N from each row's prompt length and max_tokens."""
        lengths = [request_length(p, m, max_model_len) for p, m in zip(prompt_tokens, max_tokens, strict=True)]
        return self.publish(req_ids, lengths, prompts=prompt_tokens, max_model_len=max_model_len)

    def publish_dummy(self, rows: int, max_model_len: int) -> PublishedBatch:
        """Warm-up / profiling / capture batches: rows that are no request (their rings point at the null block)."""
        return self.publish([None] * rows, [max_model_len] * rows, dummy=True)


def engine_context(vllm_config: Any) -> EngineContext:
    """The engine's context, made on first use and kept on its VllmConfig."""
    context = vllm_config.__dict__.get(_ATTR)
    if context is None:
        from moa_vllm.vllm_plugin.settings import span_floor, span_grid

        context = EngineContext(span_grid(vllm_config), span_floor(vllm_config))
        object.__setattr__(vllm_config, _ATTR, context)  # not a config field: outside validation and hashing
    return context
