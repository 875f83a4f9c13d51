"""Which Pareto plans the validation step measures (steps/validate.py): the best few by predicted loss."""

from __future__ import annotations

import numpy as np
import pytest

from moa_vllm.planner.optimize import ParetoSolution
from moa_vllm.planner.steps.optimize import ParetoSet
from moa_vllm.planner.steps.validate import kept_solutions


def _set(objectives: list[dict[int, float]]) -> ParetoSet:
    solutions = [
        ParetoSolution(np.zeros((1, 1), dtype=np.int64), o, {n: 0.5 for n in o}, True, 0.0) for o in objectives
    ]
    return ParetoSet(0.5, 0.0, None, solutions, "digest")  # type: ignore[arg-type]  # the problem is not read


def test_every_plan_is_kept_without_a_limit_or_under_it():
    pareto = _set([{1024: 1.0, 4096: 9.0}, {1024: 2.0, 4096: 8.0}, {1024: 3.0, 4096: 7.0}])
    assert kept_solutions(pareto, 0) == kept_solutions(pareto, 3) == kept_solutions(pareto, 5) == [0, 1, 2]


def test_the_kept_plans_are_those_of_lowest_loss_scaled_per_length():
    # unscaled, the 4096 objective (10x larger) would decide alone and keep plans 3 and 4
    pareto = _set(
        [
            {1024: 1.0, 4096: 100.0},  # scaled 0 + 1.0
            {1024: 1.5, 4096: 95.0},  # 0.25 + 0.5: second
            {1024: 2.0, 4096: 92.0},  # 0.5 + 0.2: best
            {1024: 2.6, 4096: 91.0},  # 0.8 + 0.1
            {1024: 3.0, 4096: 90.0},  # 1.0 + 0
        ]
    )
    assert kept_solutions(pareto, 2) == [1, 2]
    assert kept_solutions(pareto, 1) == [2]


def test_ties_keep_the_lower_index_and_equal_objectives_do_not_divide_by_zero():
    pareto = _set([{1024: 2.0}, {1024: 2.0}, {1024: 2.0}])
    assert kept_solutions(pareto, 2) == [0, 1]


def test_a_negative_limit_is_refused(tmp_path):
    from moa_vllm.planner.config import PlannerConfig

    with pytest.raises(ValueError, match="max_candidates"):
        PlannerConfig(model=tmp_path, work_dir=tmp_path, max_candidates=-1)
