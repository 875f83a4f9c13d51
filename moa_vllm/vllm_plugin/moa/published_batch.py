"""One step's batch as the model runner publishes it for the metadata builders (engine_context.py publishes it,
ring_state.py lays rings out from it)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class PublishedBatch:
    """What the runner knows and the builders do not: which request each row is (None: a padding or dummy row of
    no request), and its N. `dummy` marks warm-up, profiling and CUDA-graph capture batches."""

    serial: int
    req_ids: tuple[str | None, ...]
    lengths: np.ndarray  # [rows] span length L per row (plan/span.span_length)
    dummy: bool = False
    prompts: np.ndarray | None = None  # [rows] prompt tokens (which positions have prefix blocks)
    fresh: tuple[bool, ...] = ()  # rows whose block list the runner (re)assigned since their last publication
    caps: np.ndarray | None = None  # [rows] each row's own N, the cap of its spans (None: lengths)

    def own_lengths(self) -> np.ndarray:
        return self.lengths if self.caps is None else self.caps

    @property
    def rows(self) -> int:
        return len(self.req_ids)
