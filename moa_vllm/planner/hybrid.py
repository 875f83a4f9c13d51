"""Hybrid candidate plans: the K KV heads with the most retrieval mass at full span, every other head at one
elastic window sized so the plan meets its density.

Why a separate family beside the MILP's Pareto sets: the group ablation (`moa-plan diagnose --ablation-heads`)
showed retrieval heads are redundant one by one and essential together, which a per-head additive loss cannot
express, and the MILP's plans pay for them with N/8-floor heads that cost local fidelity. This family spends the
budget the other way (a few full heads, the rest as even as uniform's); the held-out validation decides between
the families, it is not assumed.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from datetime import datetime, timezone

import numpy as np

from moa_vllm.plan.schema import ModelFingerprint, Plan, PlanMetadata, Rule
from moa_vllm.version import __version__


def rest_beta(density: float, heads: int, full: int) -> float:
    """The elastic share of every non-full head so that (full + (heads - full) * beta) / heads = density."""
    if not 0 <= full < heads:
        raise ValueError(f"full heads must be in [0, {heads}), got {full}")
    return (density * heads - full) / (heads - full)


def top_heads(mass: np.ndarray, k: int) -> list[tuple[int, int]]:
    """(layer, kv_head) of the k largest entries of mass[layers, kv_heads], largest first (ties: lower index)."""
    order = np.argsort(-mass.ravel(), kind="stable")[:k]
    return [divmod(int(i), mass.shape[1]) for i in order]


def hybrid_plan(
    model: ModelFingerprint,
    mass: np.ndarray,
    full: int,
    density: float,
    sink_tokens: int,
    min_span: int,
    lengths: Sequence[int],
    notes: str = "",
    lengths_profiled: Sequence[int] = (),
) -> Plan | None:
    """The plan with the `full` heads of most retrieval mass at span N and the rest at span beta N; None when the
    budget leaves the rest no positive share or the plan exceeds the density at any of `lengths` (min_span)."""
    heads = model.num_layers * model.num_kv_heads
    if mass.shape != (model.num_layers, model.num_kv_heads):
        shape = (model.num_layers, model.num_kv_heads)
        raise ValueError(f"mass must be [layers, kv_heads] = {shape}, got {mass.shape}")
    if full >= heads:
        return None
    beta = rest_beta(density, heads, full)
    if beta <= 0:
        return None
    chosen = set(top_heads(mass, full))
    rest = Rule(alpha=0.0, beta=math.floor(beta * 1e6) / 1e6)
    rules = [
        [Rule(alpha=0.0, beta=1.0) if (layer, h) in chosen else rest for h in range(model.num_kv_heads)]
        for layer in range(model.num_layers)
    ]
    meta = PlanMetadata(
        method="moa-plan",
        tool_version=__version__,
        density_targets=[density],
        lengths_profiled=list(lengths_profiled),
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        notes=notes,
        extra={"candidate": f"hybrid-{full}", "full_heads": sorted([list(h) for h in chosen])},
    )
    plan = Plan(model=model, sink_tokens=sink_tokens, min_span=min_span, rules=rules, metadata=meta)
    # spans round half up (as uniform's do): half a token per head over the budget is rounding, not a larger plan
    if any(plan.density(n) > density + 0.5 / n + 1e-12 for n in lengths):
        return None
    return plan


def hybrid_plans(
    model: ModelFingerprint,
    mass: np.ndarray,
    counts: Iterable[int],
    density: float,
    sink_tokens: int,
    min_span: int,
    lengths: Sequence[int],
    notes: str = "",
    lengths_profiled: Sequence[int] = (),
) -> dict[str, Plan]:
    """hybrid-K for every K in counts that the budget allows."""
    plans = {}
    for k in counts:
        plan = hybrid_plan(model, mass, k, density, sink_tokens, min_span, lengths, notes, lengths_profiled)
        if plan is not None:
            plans[f"hybrid-{k}"] = plan
    return plans
