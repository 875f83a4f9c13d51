"""One solve of the planner MILP with SCIP (OR-Tools pywraplp), accelerated by column generation.

Model: binary x[l, h, r] (exactly one rule per KV head), binary y[l, r] with x[l, h, r] <= y[l, r] and
sum_r y[l, r] <= K; integer token budgets lo_L <= sum kv_tokens(r, L) * x <= hi_L per constraint length; optional
epsilon rows sum loss_q * x <= eps_q; objective sum_p w_p * loss_p * x.

Why the detour through column generation: on a 32 x 8 x 45 instance SCIP spends seconds on the root LP alone and far
longer closing the last 0.01%. Column generation gives an equally tight bound in well under a second and the few rules
per layer an optimum is likely to use; SCIP then solves the MILP restricted to those rules. When that solution is
within `relative_gap` of the bound it is returned as certified; otherwise SCIP runs on the full model, warm-started.
SCIP runs single-threaded with a fixed seed, so results are deterministic unless a time limit cuts a solve short.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from ortools.linear_solver import pywraplp

from moa_vllm.planner.colgen import CouplingRows, column_generation, subset_pricing_possible

_ABS_TOL = 1e-9  # objective differences below this (normalised units) count as zero


@dataclass(frozen=True)
class MilpData:
    loss: np.ndarray  # [objectives, layers, kv_heads, rules], normalised so the largest entry is <= 1
    tokens: np.ndarray  # int [constraint_lengths, rules]
    budgets: np.ndarray  # int [constraint_lengths, 2]: (lo, hi) on the total KV tokens
    density_scale: np.ndarray  # [constraint_lengths]: length * heads, tokens per unit of density
    max_rules_per_layer: int

    @property
    def shape(self) -> tuple[int, int, int]:
        return self.loss.shape[1:]  # type: ignore[return-value]


@dataclass(frozen=True)
class SolveResult:
    status: str  # "optimal" (within relative_gap), "feasible", "infeasible" or "unknown" (nothing found in time)
    assignment: np.ndarray | None = None  # int [layers, kv_heads]
    gap: float = math.inf  # certified relative gap of this solve's objective

    @property
    def solved(self) -> bool:
        return self.assignment is not None


@dataclass(frozen=True)
class SolveSettings:
    time_limit_s: float
    relative_gap: float
    seed: int
    column_generation: bool


def objective_values(data: MilpData, assignment: np.ndarray) -> np.ndarray:
    """[objectives]: summed (normalised) loss of the assignment for each objective."""
    picked = np.take_along_axis(data.loss, assignment[None, ..., None], axis=-1)
    return picked.sum(axis=(1, 2, 3))


def relative_gap(upper: float, lower: float) -> float:
    if upper - lower <= _ABS_TOL:
        return 0.0
    return (upper - lower) / max(abs(upper), _ABS_TOL)


def solve(
    data: MilpData,
    weights: Sequence[float],
    bounds: Mapping[int, float],
    settings: SolveSettings,
    hint: np.ndarray | None = None,
    budget_rows: Sequence[int] | None = None,
) -> SolveResult:
    """Minimise sum_p weights[p] * f_p subject to f_q <= bounds[q] and the budgets (all, or only `budget_rows`)."""
    deadline = time.monotonic() + settings.time_limit_s
    rows = list(range(len(data.budgets))) if budget_rows is None else list(budget_rows)
    cost = np.tensordot(np.asarray(weights, dtype=np.float64), data.loss, axes=1)
    lower, best = -math.inf, hint if hint is not None and _feasible(data, hint, bounds, rows) else None
    layers, heads, rules = data.shape
    if settings.column_generation and subset_pricing_possible(rules, heads, data.max_rules_per_layer):
        cg = column_generation(cost, _coupling_rows(data, bounds, rows), data.max_rules_per_layer)
        if cg.infeasible:
            return SolveResult("infeasible")
        lower = cg.bound
        restricted = _scip(data, cost, bounds, rows, settings, deadline, best, cg.candidates)
        best = _better(cost, best, restricted.assignment)
        if best is not None and relative_gap(_value(cost, best), lower) <= settings.relative_gap:
            return SolveResult("optimal", best, relative_gap(_value(cost, best), lower))
    full = _scip(data, cost, bounds, rows, settings, deadline, best, None)
    if full.status == "infeasible":
        return SolveResult("infeasible")
    best = _better(cost, best, full.assignment)
    if best is None:
        return SolveResult("unknown")
    gap = relative_gap(_value(cost, best), max(lower, full.bound))
    proven = full.status == "optimal" or gap <= settings.relative_gap
    return SolveResult("optimal" if proven else "feasible", best, gap)


def _value(cost: np.ndarray, assignment: np.ndarray) -> float:
    return float(np.take_along_axis(cost, assignment[..., None], axis=-1).sum())


def _better(cost: np.ndarray, a: np.ndarray | None, b: np.ndarray | None) -> np.ndarray | None:
    if a is None or b is None:
        return b if a is None else a
    return b if _value(cost, b) < _value(cost, a) else a


def _feasible(data: MilpData, assignment: np.ndarray, bounds: Mapping[int, float], rows: Sequence[int]) -> bool:
    totals = data.tokens[:, assignment].sum(axis=(1, 2))
    if any(not data.budgets[i, 0] <= totals[i] <= data.budgets[i, 1] for i in rows):
        return False
    if any(len(set(row.tolist())) > data.max_rules_per_layer for row in assignment):
        return False
    values = objective_values(data, assignment)
    return all(values[q] <= eps for q, eps in bounds.items())


def _coupling_rows(data: MilpData, bounds: Mapping[int, float], rows: Sequence[int]) -> CouplingRows:
    """Budget rows in density units and epsilon rows in loss units, so every row is O(1) for the LP."""
    shape = data.loss.shape[1:]
    coeff = [np.broadcast_to(data.tokens[i] / data.density_scale[i], shape) for i in rows]
    lo = [data.budgets[i, 0] / data.density_scale[i] for i in rows]
    hi = [data.budgets[i, 1] / data.density_scale[i] for i in rows]
    for q, eps in bounds.items():
        coeff.append(data.loss[q])
        lo.append(-math.inf)
        hi.append(eps)
    return CouplingRows(np.stack(coeff), np.array(lo, dtype=np.float64), np.array(hi, dtype=np.float64))


# ---- SCIP --------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _ScipResult:
    status: str
    assignment: np.ndarray | None = None
    bound: float = -math.inf


def _scip(
    data: MilpData,
    cost: np.ndarray,
    bounds: Mapping[int, float],
    rows: Sequence[int],
    settings: SolveSettings,
    deadline: float,
    hint: np.ndarray | None,
    candidates: list[np.ndarray] | None,
) -> _ScipResult:
    """SCIP on the x/y model, over every rule or only each layer's `candidates`."""
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        return _ScipResult("unknown")
    layers, heads, rules = data.shape
    allowed = candidates or [np.arange(rules)] * layers
    if hint is not None and any(not np.isin(hint[layer], allowed[layer]).all() for layer in range(layers)):
        hint = None  # a hint outside the restricted rules cannot be expressed
    solver = pywraplp.Solver.CreateSolver("SCIP")
    solver.SetSolverSpecificParametersAsString(f"randomization/randomseedshift = {settings.seed}\n")
    solver.SetTimeLimit(max(1, int(remaining * 1000)))
    x = _assignment_vars(solver, allowed, heads, data.max_rules_per_layer)
    _linear_rows(solver, x, allowed, data, cost, bounds, rows)
    if hint is not None:
        _set_hint(solver, x, allowed, hint)
    params = pywraplp.MPSolverParameters()
    params.SetDoubleParam(params.RELATIVE_MIP_GAP, settings.relative_gap)
    status = solver.Solve(params)
    if status == pywraplp.Solver.INFEASIBLE:
        return _ScipResult("infeasible")
    if status not in (pywraplp.Solver.OPTIMAL, pywraplp.Solver.FEASIBLE):
        return _ScipResult("unknown")
    assignment = np.array(
        [
            [allowed[layer][int(np.argmax([v.solution_value() for v in head]))] for head in x[layer]]
            for layer in range(layers)
        ],
        dtype=np.int64,
    )
    bound = solver.Objective().BestBound() if cost.any() else 0.0
    return _ScipResult("optimal" if status == pywraplp.Solver.OPTIMAL else "feasible", assignment, bound)


def _assignment_vars(
    solver: pywraplp.Solver, allowed: list[np.ndarray], heads: int, k: int
) -> list[list[list[pywraplp.Variable]]]:
    """x[layer][head][i] for rule allowed[layer][i]: one rule per head, at most k distinct rules per layer."""
    x = []
    for rules in allowed:
        layer = [[solver.BoolVar("") for _ in rules] for _ in range(heads)]
        for head in layer:
            solver.Add(solver.Sum(head) == 1)
        if k < min(heads, len(rules)):  # otherwise the limit cannot bind
            used = [solver.BoolVar("") for _ in rules]
            for head in layer:
                for xv, yv in zip(head, used):
                    solver.Add(xv <= yv)
            solver.Add(solver.Sum(used) <= k)
        x.append(layer)
    return x


def _linear_rows(
    solver: pywraplp.Solver,
    x: list[list[list[pywraplp.Variable]]],
    allowed: list[np.ndarray],
    data: MilpData,
    cost: np.ndarray,
    bounds: Mapping[int, float],
    rows: Sequence[int],
) -> None:
    """Token budgets (exact integers), epsilon rows and the objective."""
    budgets = [solver.Constraint(float(data.budgets[i, 0]), float(data.budgets[i, 1])) for i in rows]
    epsilons = [(solver.Constraint(-solver.infinity(), float(eps)), q) for q, eps in bounds.items()]
    objective = solver.Objective()
    for layer, rules in enumerate(allowed):
        tokens = [data.tokens[i, rules].tolist() for i in rows]
        for head, xs in enumerate(x[layer]):
            costs = cost[layer, head, rules].tolist()
            eps_coeffs = [data.loss[q, layer, head, rules].tolist() for _, q in epsilons]
            for j, var in enumerate(xs):
                for ct, tok in zip(budgets, tokens):
                    ct.SetCoefficient(var, tok[j])
                for (ct, _), coeffs in zip(epsilons, eps_coeffs):
                    ct.SetCoefficient(var, coeffs[j])
                objective.SetCoefficient(var, costs[j])
    objective.SetMinimization()


def _set_hint(
    solver: pywraplp.Solver, x: list[list[list[pywraplp.Variable]]], allowed: list[np.ndarray], hint: np.ndarray
) -> None:
    variables, values = [], []
    for layer, rules in enumerate(allowed):
        for head, xs in enumerate(x[layer]):
            variables += xs
            values += (rules == hint[layer, head]).astype(float).tolist()
    solver.SetHint(variables, values)
