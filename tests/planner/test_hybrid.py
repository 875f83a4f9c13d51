"""Hybrid candidates: which heads go full, the rest's share, and the density budget."""

from __future__ import annotations

import numpy as np
import pytest

from moa_vllm.plan.schema import ModelFingerprint
from moa_vllm.planner.hybrid import hybrid_plan, hybrid_plans, rest_beta, top_heads

FP = ModelFingerprint(architecture="llama", num_layers=4, num_query_heads=4, num_kv_heads=2, head_dim=8)
MASS = np.array([[0.1, 0.9], [0.0, 0.3], [0.5, 0.2], [0.05, 0.0]])


def test_top_heads_orders_by_mass():
    assert top_heads(MASS, 3) == [(0, 1), (2, 0), (1, 1)]


@pytest.mark.parametrize("density", [0.5, 0.375])
def test_full_heads_get_n_and_the_rest_meet_the_density(density: float):
    plan = hybrid_plan(FP, MASS, 2, density, sink_tokens=8, min_span=16, lengths=(1024, 4096))
    assert plan is not None
    spans = np.array(plan.spans(4096))
    assert spans[0, 1] == spans[2, 0] == 4096  # the two heads of most mass
    rest = np.delete(spans.ravel(), [1, 4])
    assert len(set(rest.tolist())) == 1  # one window for every other head
    for n in (1024, 4096):
        assert plan.density(n) == pytest.approx(density, abs=0.5 / n + 1e-9)
    assert plan.metadata.extra["full_heads"] == [[0, 1], [2, 0]]
    assert (2 + 6 * rest_beta(density, 8, 2)) / 8 == pytest.approx(density)


def test_budgets_that_leave_the_rest_nothing_or_hit_min_span_give_no_plan():
    assert hybrid_plan(FP, MASS, 2, 0.375, 8, 16, (1024,)) is not None
    assert hybrid_plan(FP, MASS, 2, 0.25, 8, 16, (1024,)) is None  # 2 full heads of 8 use the whole 0.25
    assert hybrid_plan(FP, MASS, 1, 0.15, 8, 200, (1024,)) is None  # the rest's span would be below min_span
    assert hybrid_plan(FP, MASS, 8, 0.5, 8, 16, (1024,)) is None  # every head full is dense, not a candidate
    assert set(hybrid_plans(FP, MASS, (1, 2, 3), 0.25, 8, 16, (1024,))) == {"hybrid-1"}
