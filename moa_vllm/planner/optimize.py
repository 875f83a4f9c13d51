"""The MoA planner's optimisation step: one rule per (layer, KV head) under density budgets, and its Pareto set.

Formulation (solved by `milp`: HiGHS through OR-Tools, with a column-generation bound): binary x[l, h, r], exactly
one rule per head; for every constraint length L: lower_ratio * density_L * L * heads <= sum kv_tokens(r, L) * x
<= density_L * L * heads (heads = layers * kv_heads); at most K distinct rules per layer (y[l, r] >= x[l, h, r],
sum_r y[l, r] <= K). One objective per profiled length: sum loss[p, l, h, r] * x.

Pareto set by the epsilon-constraint method: each objective alone gives its range, then the primary objective is
minimised under a grid of upper bounds on the others. Every solve minimises the primary plus tie_weight times the
sum of the others (the augmented epsilon-constraint method), so an exactly solved point is Pareto optimal, not just
weakly so. With relative_gap g > 0 the lowest bound on each other objective is set within g of its optimum rather
than at it: that optimum is only certified within g, and rows that tight leave the fast path in `milp` little to
choose from (it then falls back to the compact model, seconds instead of a tenth of one).
Losses are divided by their maximum inside the solver (MILP tolerances are absolute); reported values are in the
caller's units.
"""

from __future__ import annotations

import itertools
import logging
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from functools import cached_property
from typing import Any

import numpy as np

from moa_vllm.plan.generate import DEFAULT_MIN_SPAN, DEFAULT_SINKS
from moa_vllm.plan.schema import ModelFingerprint, Plan, PlanMetadata
from moa_vllm.planner import milp
from moa_vllm.planner.rules import RuleGrid, token_matrix
from moa_vllm.version import __version__

log = logging.getLogger(__name__)

LOWER_RATIO = 0.9  # a plan may undershoot its density target by 10% (as in MoA), never exceed it
_SAME = 1e-9  # normalised objective values closer than this are equal (dedup, dominance)


class InfeasibleBudgetError(ValueError):
    """No assignment meets the density targets. `length`/`density` name the culprit when a single one is."""

    def __init__(self, message: str, length: int | None = None, density: float | None = None):
        super().__init__(message)
        self.length = length
        self.density = density


class SolverTimeoutError(RuntimeError):
    """The time limit ran out before any feasible assignment was found."""


def density_targets(density: float, lengths: Iterable[int]) -> dict[int, float]:
    """The same density target at every length (profiled and extension lengths alike)."""
    return {int(n): float(density) for n in lengths}


@dataclass(frozen=True)
class SolverOptions:
    time_limit_s: float = 60.0  # wall clock, per MILP solve (a Pareto run makes several)
    # Certified optimality gap per solve. 1% of the summed loss is below the noise of profiled losses, and the
    # fast path in `milp` certifies it nearly always; tighter gaps more often need the compact model (seconds).
    relative_gap: float = 1e-2
    seed: int = 0  # HiGHS's random seed; it runs single-threaded, so runs repeat exactly (unless a time limit hits)
    epsilon_points: int = 5  # grid points per non-primary objective
    tie_weight: float = 1e-4  # weight of the other objectives in every solve (normalised losses); > 0 for Pareto optima
    decomposition: bool = True  # the fast path in `milp` (column generation); off = HiGHS on the compact model only

    def __post_init__(self) -> None:
        if self.time_limit_s <= 0 or self.epsilon_points < 1 or self.seed < 0 or not 0.0 < self.tie_weight < 1.0:
            raise ValueError(f"invalid solver options: {self}")
        if not 0.0 <= self.relative_gap < 1.0:
            raise ValueError(f"relative_gap must be in [0, 1), got {self.relative_gap}")

    def settings(self) -> milp.SolveSettings:
        return milp.SolveSettings(self.time_limit_s, self.relative_gap, self.seed, self.decomposition)


@dataclass(frozen=True, eq=False)
class PlanningProblem:
    """Profiled losses plus budgets. loss[p, l, h, r]: loss of rule r for (layer l, KV head h) at lengths[p]."""

    loss: np.ndarray
    lengths: tuple[int, ...]
    density_targets: Mapping[int, float]  # every profiled length, plus optional extension lengths
    grid: RuleGrid = field(default_factory=RuleGrid)
    min_span: int = DEFAULT_MIN_SPAN
    max_rules_per_layer: int = 2
    lower_ratio: float = LOWER_RATIO

    def __post_init__(self) -> None:
        object.__setattr__(self, "loss", np.asarray(self.loss, dtype=np.float64))
        object.__setattr__(self, "lengths", tuple(int(n) for n in self.lengths))
        targets = {int(n): float(d) for n, d in sorted(self.density_targets.items())}
        object.__setattr__(self, "density_targets", targets)
        self._validate()

    def _validate(self) -> None:
        loss = self.loss
        if loss.ndim != 4 or loss.shape[0] != len(self.lengths) or loss.shape[3] != len(self.grid):
            raise ValueError(
                f"loss must be [profiled_lengths={len(self.lengths)}, layers, kv_heads, rules={len(self.grid)}], "
                f"got shape {loss.shape}"
            )
        if loss.size == 0 or not np.all(np.isfinite(loss)) or np.any(loss < 0):
            raise ValueError("loss must be non-empty, finite and >= 0")
        if len(set(self.lengths)) != len(self.lengths) or min(self.lengths) < 1:
            raise ValueError(f"profiled lengths must be distinct and positive, got {self.lengths}")
        missing = [n for n in self.lengths if n not in self.density_targets]
        if missing:
            raise ValueError(f"no density target for profiled length(s) {missing}")
        for n, d in self.density_targets.items():
            if n < 1 or not 0.0 < d <= 1.0:
                raise ValueError(f"density target {d} at length {n}: need length >= 1 and density in (0, 1]")
        if self.min_span < 1 or self.max_rules_per_layer < 1 or not 0.0 <= self.lower_ratio <= 1.0:
            raise ValueError("need min_span >= 1, max_rules_per_layer >= 1 and lower_ratio in [0, 1]")

    @property
    def num_layers(self) -> int:
        return self.loss.shape[1]

    @property
    def num_kv_heads(self) -> int:
        return self.loss.shape[2]

    @property
    def num_heads(self) -> int:
        return self.num_layers * self.num_kv_heads

    @property
    def constraint_lengths(self) -> tuple[int, ...]:
        return tuple(self.density_targets)

    @cached_property
    def tokens(self) -> np.ndarray:
        """int64 [constraint_lengths, rules]."""
        return token_matrix(self.grid, self.constraint_lengths, self.min_span)

    def budget(self, length: int) -> tuple[int, int]:
        """Integer bounds on the total KV tokens at `length` (totals are integers, so rounding inward is exact)."""
        full = self.density_targets[length] * length * self.num_heads
        return math.ceil(self.lower_ratio * full - 1e-9), math.floor(full + 1e-9)

    @cached_property
    def loss_scale(self) -> float:
        """Divisor that brings the largest loss to 1 inside the solver."""
        peak = float(self.loss.max())
        return peak if peak > 0 else 1.0

    @cached_property
    def milp_data(self) -> milp.MilpData:
        n = self.constraint_lengths
        return milp.MilpData(
            loss=self.loss / self.loss_scale,
            tokens=self.tokens,
            budgets=np.array([self.budget(length) for length in n], dtype=np.int64).reshape(len(n), 2),
            density_scale=np.array([length * self.num_heads for length in n], dtype=np.float64),
            max_rules_per_layer=self.max_rules_per_layer,
        )


@dataclass(frozen=True, eq=False)
class ParetoSolution:
    assignment: np.ndarray  # int [layers, kv_heads]: rule index into the grid
    objectives: dict[int, float]  # profiled length -> summed loss
    densities: dict[int, float]  # constraint length -> KV density
    optimal: bool  # every solve behind it was certified within SolverOptions.relative_gap
    gap: float  # largest certified relative gap of those solves
    bounds: dict[int, float] = field(default_factory=dict)  # epsilon bounds (loss units) that produced it


# ---- evaluation ------------------------------------------------------------------------------------------------


def assignment_loss(loss: np.ndarray, assignment: np.ndarray) -> float:
    """Sum over heads of loss[l, h, assignment[l, h]] for one loss table [layers, kv_heads, rules]."""
    return float(np.take_along_axis(loss, assignment[..., None], axis=-1).sum())


def assignment_densities(problem: PlanningProblem, assignment: np.ndarray) -> dict[int, float]:
    totals = problem.tokens[:, assignment].sum(axis=(1, 2))
    return {n: int(t) / (n * problem.num_heads) for n, t in zip(problem.constraint_lengths, totals)}


def distinct_rules_per_layer(assignment: np.ndarray) -> list[int]:
    return [len(set(row.tolist())) for row in assignment]


# ---- single solves -----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Point:
    """A solved point in normalised loss units."""

    result: milp.SolveResult
    values: np.ndarray  # [objectives]
    bounds: dict[int, float]


def _solve_point(
    problem: PlanningProblem,
    options: SolverOptions,
    primary: int,
    bounds: Mapping[int, float],
    known: Sequence[np.ndarray],
) -> milp.SolveResult:
    """Minimise f_primary + tie_weight * (sum of the others): one solve instead of a lexicographic pair, and a second
    stage that holds f_primary at its optimum is the hardest kind of solve for the fast path in `milp`."""
    weights = [1.0 if p == primary else options.tie_weight for p in range(len(problem.lengths))]
    return milp.solve(problem.milp_data, weights, bounds, options.settings(), known)


def _anchor(problem: PlanningProblem, options: SolverOptions, objective: int, known: Sequence[np.ndarray]) -> _Point:
    result = _solve_point(problem, options, objective, {}, known)
    if result.status == "infeasible":
        raise _diagnose(problem, options)
    if not result.solved:
        raise SolverTimeoutError(
            f"no feasible plan found within {options.time_limit_s}s for the objective at length "
            f"{problem.lengths[objective]}; raise time_limit_s"
        )
    return _Point(result, milp.objective_values(problem.milp_data, result.assignment), {})


def solve_single(problem: PlanningProblem, objective: int = 0, options: SolverOptions | None = None) -> ParetoSolution:
    """Minimum of one objective (an index into problem.lengths); ties go to the smallest sum of the others."""
    options = options or SolverOptions()
    check_budget_ranges(problem)
    return _to_solution(problem, _anchor(problem, options, objective, ()))


# ---- infeasibility -----------------------------------------------------------------------------------------------


def check_budget_ranges(problem: PlanningProblem) -> None:
    """Cheap check, per length, that the budget window overlaps what the grid can reach at all."""
    for n, tok in zip(problem.constraint_lengths, problem.tokens):
        d, (lo, hi) = problem.density_targets[n], problem.budget(n)
        reach_lo, reach_hi = int(tok.min()) * problem.num_heads, int(tok.max()) * problem.num_heads
        if lo > hi or hi < reach_lo or lo > reach_hi:
            scale = n * problem.num_heads
            raise InfeasibleBudgetError(
                f"density target {d} at length {n} is infeasible: it needs {lo}..{hi} KV tokens "
                f"(density {lo / scale:.4f}..{hi / scale:.4f}), but the rule grid with min_span {problem.min_span} "
                f"reaches only {reach_lo}..{reach_hi} (density {reach_lo / scale:.4f}..{reach_hi / scale:.4f})",
                length=n,
                density=d,
            )


def _diagnose(problem: PlanningProblem, options: SolverOptions) -> InfeasibleBudgetError:
    """Name the first length whose budget is infeasible on its own, else report the targets as jointly infeasible."""
    k, zero = problem.max_rules_per_layer, [0.0] * len(problem.lengths)
    for i, n in enumerate(problem.constraint_lengths):
        if milp.solve(problem.milp_data, zero, {}, options.settings(), budget_rows=[i]).status == "infeasible":
            d, (lo, hi) = problem.density_targets[n], problem.budget(n)
            return InfeasibleBudgetError(
                f"density target {d} at length {n} is infeasible: no assignment with at most {k} distinct rules "
                f"per layer keeps between {lo} and {hi} KV tokens",
                length=n,
                density=d,
            )
    return InfeasibleBudgetError(
        f"density targets {problem.density_targets} (length: density) are each feasible but not all together "
        f"with at most {k} distinct rules per layer"
    )


# ---- the Pareto set ----------------------------------------------------------------------------------------------


def pareto_front(
    problem: PlanningProblem, options: SolverOptions | None = None, primary: int = 0
) -> list[ParetoSolution]:
    """Pareto solutions over the profiled lengths' losses, sorted by the primary objective."""
    options = options or SolverOptions()
    if not 0 <= primary < len(problem.lengths):
        raise ValueError(f"primary must index problem.lengths, got {primary}")
    check_budget_ranges(problem)
    anchors: list[_Point] = []
    for p in range(len(problem.lengths)):
        anchors.append(_anchor(problem, options, p, [a.result.assignment for a in anchors]))
    points = _nondominated([*anchors, *_epsilon_sweep(problem, options, primary, anchors)])
    points.sort(key=lambda point: point.values[primary])
    return [_to_solution(problem, point) for point in points]


def _epsilon_grid(anchors: list[_Point], q: int, count: int, relative_gap: float) -> list[float]:
    """Bounds on objective q from its own minimum (within the gap) up to its worst value among the anchors, loosest
    first."""
    hi = max(a.values[q] for a in anchors)
    lo = min(anchors[q].values[q] * (1.0 + relative_gap), hi)
    grid = sorted({float(v) for v in np.linspace(lo, hi, count)}, reverse=True)
    return [g + _SAME * max(1.0, abs(g)) for g in grid]  # solver tolerances must not cut off the anchor itself


def _epsilon_sweep(
    problem: PlanningProblem, options: SolverOptions, primary: int, anchors: list[_Point]
) -> list[_Point]:
    others = [q for q in range(len(anchors)) if q != primary]
    if not others:
        return []
    known = [anchors[primary]]  # optima under some bounds; the primary's anchor is the optimum under none
    found: list[_Point] = []
    infeasible: list[dict[int, float]] = []
    # Loosest combinations come first, so every combination looser than the current one has been handled.
    grids = [_epsilon_grid(anchors, q, options.epsilon_points, options.relative_gap) for q in others]
    for combo in itertools.product(*grids):
        bounds = dict(zip(others, combo))
        if any(all(bounds[q] <= bad[q] for q in others) for bad in infeasible):
            continue  # tighter than a proven-infeasible combination
        if any(_reusable(point, bounds) for point in known):
            continue  # an optimum under looser bounds that meets these bounds is also the optimum here
        seeds = [point.result.assignment for point in [*anchors, *found]]  # see `milp.solve`
        result = _solve_point(problem, options, primary, bounds, seeds)
        if result.status == "infeasible":
            infeasible.append(bounds)
        elif result.solved:
            point = _Point(result, milp.objective_values(problem.milp_data, result.assignment), bounds)
            found.append(point)
            known.append(point)
        else:
            log.warning("no solution within the time limit for epsilon bounds %s; skipped", bounds)
    return found


def _reusable(point: _Point, bounds: Mapping[int, float]) -> bool:
    looser = all(point.bounds.get(q, math.inf) >= eps for q, eps in bounds.items())
    meets = all(point.values[q] <= eps for q, eps in bounds.items())
    return point.result.status == "optimal" and looser and meets


def _nondominated(points: list[_Point]) -> list[_Point]:
    """Drop repeated objective vectors (first kept) and any vector another one dominates."""
    unique: list[_Point] = []
    for point in points:
        if not any(np.all(np.abs(point.values - u.values) <= _SAME) for u in unique):
            unique.append(point)
    return [p for p in unique if not any(_dominates(q.values, p.values) for q in unique if q is not p)]


def _dominates(a: np.ndarray, b: np.ndarray) -> bool:
    return bool(np.all(a <= b + _SAME) and np.any(a < b - _SAME))


def _to_solution(problem: PlanningProblem, point: _Point) -> ParetoSolution:
    assignment = point.result.assignment
    return ParetoSolution(
        assignment=assignment,
        objectives={n: assignment_loss(problem.loss[p], assignment) for p, n in enumerate(problem.lengths)},
        densities=assignment_densities(problem, assignment),
        optimal=point.result.status == "optimal",
        gap=point.result.gap,
        bounds={problem.lengths[q]: eps * problem.loss_scale for q, eps in point.bounds.items()},
    )


# ---- choosing and exporting ------------------------------------------------------------------------------------


def solution_to_plan(
    solution: ParetoSolution,
    problem: PlanningProblem,
    model: ModelFingerprint,
    sink_tokens: int = DEFAULT_SINKS,
    notes: str = "",
) -> Plan:
    """Plan v1 with the solution's rule for every (layer, KV head)."""
    if solution.assignment.shape != (model.num_layers, model.num_kv_heads):
        raise ValueError(
            f"solution is for {solution.assignment.shape} (layers, kv_heads), model has "
            f"({model.num_layers}, {model.num_kv_heads})"
        )
    rules = [[problem.grid.rule(int(r)) for r in row] for row in solution.assignment]
    return Plan(
        model=model,
        sink_tokens=sink_tokens,
        min_span=problem.min_span,
        rules=rules,
        metadata=_metadata(solution, problem, notes),
    )


def _metadata(solution: ParetoSolution, problem: PlanningProblem, notes: str) -> PlanMetadata:
    # JSON object keys are strings, so lengths are written as strings to survive a save/load round trip.
    extra = {
        "constraint_lengths": list(problem.constraint_lengths),
        "densities": {str(n): d for n, d in solution.densities.items()},
        "objectives": {str(n): v for n, v in solution.objectives.items()},
        "optimal": solution.optimal,
        "gap": solution.gap,
        "max_rules_per_layer": problem.max_rules_per_layer,
        "lower_ratio": problem.lower_ratio,
        "rule_grid": problem.grid.model_dump(mode="json"),
    }
    return PlanMetadata(
        method="moa-plan",
        tool_version=__version__,
        density_targets=[problem.density_targets[n] for n in problem.constraint_lengths],
        lengths_profiled=list(problem.lengths),
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        notes=notes,
        extra=extra,
    )


def solution_to_json(s: ParetoSolution) -> dict[str, Any]:
    return {
        "assignment": s.assignment.tolist(),
        "objectives": {str(k): v for k, v in s.objectives.items()},
        "densities": {str(k): v for k, v in s.densities.items()},
        "optimal": s.optimal,
        "gap": s.gap,
        "bounds": {str(k): v for k, v in s.bounds.items()},
    }


def solution_from_json(d: dict[str, Any]) -> ParetoSolution:
    ints = lambda m: {int(k): float(v) for k, v in m.items()}  # noqa: E731
    return ParetoSolution(
        assignment=np.array(d["assignment"], dtype=np.int64),
        objectives=ints(d["objectives"]),
        densities=ints(d["densities"]),
        optimal=bool(d["optimal"]),
        gap=float(d["gap"]),
        bounds=ints(d["bounds"]),
    )
