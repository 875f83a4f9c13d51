"""The planner report: CSV rows mirror the solutions, the PNGs are real images."""

from __future__ import annotations

import csv

import matplotlib.image
import numpy as np
import pytest

from moa_vllm.plan.schema import ModelFingerprint
from moa_vllm.planner.optimize import (
    ParetoSolution,
    PlanningProblem,
    assignment_densities,
    assignment_loss,
    solution_to_plan,
)
from moa_vllm.planner.report import write_report
from moa_vllm.planner.rules import RuleGrid

LAYERS, HEADS = 3, 2
GRID = RuleGrid(alphas=(0.0, 256.0), betas=(0.25, 0.5, 1.0))
MODEL = ModelFingerprint(architecture="llama", num_layers=LAYERS, num_query_heads=4, num_kv_heads=HEADS, head_dim=8)


@pytest.fixture()
def problem() -> PlanningProblem:
    rng = np.random.default_rng(0)
    return PlanningProblem(
        loss=rng.random((2, LAYERS, HEADS, len(GRID))),
        lengths=(512, 1024),
        density_targets={512: 0.6, 1024: 0.6, 2048: 0.6},
        grid=GRID,
        min_span=128,
    )


def _solution(problem: PlanningProblem, assignment: np.ndarray) -> ParetoSolution:
    return ParetoSolution(
        assignment=assignment,
        objectives={n: assignment_loss(problem.loss[p], assignment) for p, n in enumerate(problem.lengths)},
        densities=assignment_densities(problem, assignment),
        optimal=True,
        gap=0.0,
    )


def test_report_files(problem: PlanningProblem, tmp_path) -> None:
    rng = np.random.default_rng(1)
    solutions = [_solution(problem, rng.integers(0, len(GRID), size=(LAYERS, HEADS))) for _ in range(4)]
    validation = rng.random(len(solutions)).tolist()
    plan = solution_to_plan(solutions[2], problem, MODEL)
    files = write_report(
        tmp_path / "out", solutions, 2, problem, plan, validation, validation_length=1536, uniform_loss=0.75
    )

    with files.csv.open() as f:
        rows = list(csv.DictReader(f))
    assert rows[-1]["index"] == "uniform" and float(rows[-1]["validation_loss"]) == 0.75
    rows = rows[:-1]
    assert len(rows) == len(solutions)
    assert [int(r["chosen"]) for r in rows] == [0, 0, 1, 0]
    for row, s in zip(rows, solutions):
        for n in problem.lengths:
            assert float(row[f"loss_{n}"]) == pytest.approx(s.objectives[n])
        for n in problem.constraint_lengths:
            assert float(row[f"density_{n}"]) == pytest.approx(s.densities[n])
    for row, v in zip(rows, validation):
        assert float(row["validation_loss"]) == v
    for png in (files.heatmap, files.front):
        image = matplotlib.image.imread(png)
        assert image.ndim == 3 and min(image.shape[:2]) > 100


def test_report_without_validation_and_one_length(tmp_path) -> None:
    rng = np.random.default_rng(2)
    problem = PlanningProblem(
        loss=rng.random((1, LAYERS, HEADS, len(GRID))), lengths=(512,), density_targets={512: 0.7}, grid=GRID
    )
    solutions = [_solution(problem, np.zeros((LAYERS, HEADS), dtype=np.int64))]
    plan = solution_to_plan(solutions[0], problem, MODEL)
    files = write_report(tmp_path, solutions, 0, problem, plan)
    with files.csv.open() as f:
        (row,) = list(csv.DictReader(f))
    assert row["validation_loss"] == "" and row["chosen"] == "1"
    assert files.heatmap.stat().st_size > 0 and files.front.stat().st_size > 0


def test_report_rejects_bad_index(problem: PlanningProblem, tmp_path) -> None:
    solution = _solution(problem, np.zeros((LAYERS, HEADS), dtype=np.int64))
    plan = solution_to_plan(solution, problem, MODEL)
    with pytest.raises(ValueError, match="chosen_index"):
        write_report(tmp_path, [solution], 1, problem, plan)


def test_plans_that_were_not_validated_have_a_blank_validation_loss(problem: PlanningProblem, tmp_path) -> None:
    rng = np.random.default_rng(3)
    solutions = [_solution(problem, rng.integers(0, len(GRID), size=(LAYERS, HEADS))) for _ in range(3)]
    plan = solution_to_plan(solutions[1], problem, MODEL)
    files = write_report(tmp_path, solutions, 1, problem, plan, [float("nan"), 0.5, float("nan")], 1536)
    with files.csv.open() as f:
        rows = list(csv.DictReader(f))
    assert [r["validation_loss"] for r in rows] == ["", "0.5", ""]
    assert matplotlib.image.imread(files.front).ndim == 3
