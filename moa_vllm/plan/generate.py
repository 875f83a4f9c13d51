"""Plans that need no profiling: dense (the equivalence baseline), uniform (the StreamingLLM equivalent) and window
(a fixed sliding window, for models trained with one, e.g. the BST)."""

from __future__ import annotations

from datetime import datetime, timezone

from moa_vllm.plan.schema import ModelFingerprint, Plan, PlanMetadata, Rule
from moa_vllm.version import __version__

DEFAULT_SINKS = 64  # as in the MoA reference
DEFAULT_MIN_SPAN = 128


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def constant_plan(
    model: ModelFingerprint,
    rule: Rule,
    metadata: PlanMetadata,
    sink_tokens: int = DEFAULT_SINKS,
    min_span: int = DEFAULT_MIN_SPAN,
) -> Plan:
    """The same rule for every (layer, KV head)."""
    rules = [[rule] * model.num_kv_heads for _ in range(model.num_layers)]
    return Plan(model=model, sink_tokens=sink_tokens, min_span=min_span, rules=rules, metadata=metadata)


def dense_plan(model: ModelFingerprint, sink_tokens: int = DEFAULT_SINKS, min_span: int = DEFAULT_MIN_SPAN) -> Plan:
    """span(N) = N for every head: attention identical to full causal attention."""
    meta = PlanMetadata(method="dense", tool_version=__version__, density_targets=[1.0], created=_now())
    return constant_plan(model, Rule(alpha=0.0, beta=1.0), meta, sink_tokens, min_span)


def uniform_plan(
    model: ModelFingerprint,
    density: float,
    sink_tokens: int = DEFAULT_SINKS,
    min_span: int = DEFAULT_MIN_SPAN,
) -> Plan:
    """span(N) = density * N for every head (sinks included), i.e. StreamingLLM with an elastic window."""
    if not 0.0 < density <= 1.0:
        raise ValueError(f"density must be in (0, 1], got {density}")
    meta = PlanMetadata(
        method="uniform",
        tool_version=__version__,
        density_targets=[density],
        created=_now(),
        notes="StreamingLLM-equivalent baseline: sinks plus a recent window, the same rule for every head",
    )
    return constant_plan(model, Rule(alpha=0.0, beta=density), meta, sink_tokens, min_span)


def window_plan(model: ModelFingerprint, window: int, notes: str = "") -> Plan:
    """span(N) = min(window, N) for every head, no sinks: the mask ``q - k < window`` of a sliding-window model."""
    if window <= 0:
        raise ValueError(f"window must be positive, got {window}")
    meta = PlanMetadata(method="window", tool_version=__version__, created=_now(), notes=notes)
    return constant_plan(model, Rule(alpha=float(window), beta=0.0), meta, sink_tokens=0, min_span=window)
