"""Column generation for the planner MILP: a certified lower bound and a short list of candidate rules per layer.

Dantzig-Wolfe view of the MILP in `optimize`: a column is one layer's whole configuration (a rule per KV head, at
most K distinct rules), so "at most K rules per layer" lives inside the columns and the master LP keeps only the
coupling rows (density budgets, epsilon bounds). Pricing is exact (it enumerates every K-subset of the grid), hence
for any duals the Lagrangian value below is a valid lower bound on the MILP optimum, whatever LP tolerances did.
The master LP is tiny and GLOP solves it in milliseconds; the bound is at least as tight as the LP relaxation of the
x/y formulation, which is what makes large instances fast: a MILP restricted to the rules the columns use, plus this
bound, usually certifies a solution without branching on the full model.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import numpy as np
from ortools.linear_solver import pywraplp

MAX_SUBSETS = 20_000  # K-subsets enumerated per layer by the pricer; above that column generation is skipped
MAX_ROUNDS = 500
_RC_TOL = 1e-9  # a column enters when its reduced cost is below -_RC_TOL
_INFEASIBLE_TOL = 1e-7  # violation bound (in normalised row units) that proves the LP, hence the MILP, infeasible


@dataclass(frozen=True)
class CouplingRows:
    """lo <= sum coeff[i, l, h, r] * x[l, h, r] <= hi, for each row i. Rows should be normalised to O(1)."""

    coeff: np.ndarray  # [rows, layers, kv_heads, rules]
    lo: np.ndarray  # [rows], -inf where unbounded
    hi: np.ndarray  # [rows], +inf where unbounded


@dataclass(frozen=True)
class ColGenResult:
    infeasible: bool  # proven: no fractional (hence no integer) configuration mix meets the rows
    bound: float  # valid lower bound on the MILP objective; -inf when none was established
    candidates: list[np.ndarray]  # per layer, the rule indices used by any generated column


def subset_pricing_possible(num_rules: int, num_heads: int, k: int) -> bool:
    return k >= min(num_heads, num_rules) or math.comb(num_rules, k) <= MAX_SUBSETS


class SubsetPricer:
    """Cheapest layer configuration with at most k distinct rules, by enumerating k-subsets of the grid."""

    def __init__(self, num_rules: int, num_heads: int, k: int):
        self.unlimited = k >= min(num_heads, num_rules)
        self.subsets = None if self.unlimited else np.array(list(itertools.combinations(range(num_rules), k)))

    def __call__(self, a: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """a [layers, kv_heads, rules] -> (min value per layer, assignment [layers, kv_heads])."""
        if self.unlimited:
            return a.min(axis=-1).sum(axis=-1), a.argmin(axis=-1)
        values, assignment = np.empty(a.shape[0]), np.empty(a.shape[:2], dtype=np.int64)
        for layer, al in enumerate(a):
            per_subset = al[:, self.subsets]  # [heads, subsets, k]
            best = int(per_subset.min(axis=-1).sum(axis=0).argmin())
            rules = self.subsets[best]
            values[layer] = al[:, rules].min(axis=-1).sum()
            assignment[layer] = rules[al[:, rules].argmin(axis=-1)]
        return values, assignment


def lagrangian_bound(values: np.ndarray, duals: np.ndarray, rows: CouplingRows) -> float:
    """sum_l min_c (cost - duals . rows)(c) + sum_i duals_i * (lo_i if duals_i > 0 else hi_i): valid for any duals."""
    duals = np.where((duals > 0) & np.isinf(rows.lo), 0.0, duals)  # a dual towards an infinite side bounds nothing
    duals = np.where((duals < 0) & np.isinf(rows.hi), 0.0, duals)
    side = np.where(duals > 0, rows.lo, np.where(duals < 0, rows.hi, 0.0))
    return float(values.sum() + np.dot(duals, np.where(duals != 0, side, 0.0)))


class _Master:
    """Restricted master LP in GLOP: convexity row per layer, the coupling rows, and a slack pair per coupling row."""

    def __init__(self, rows: CouplingRows):
        self.rows = rows
        self.lp = pywraplp.Solver.CreateSolver("GLOP")
        layers = rows.coeff.shape[1]
        inf = self.lp.infinity()
        self.convexity = [self.lp.Constraint(1.0, 1.0) for _ in range(layers)]
        self.coupling = [
            self.lp.Constraint(-inf if np.isinf(lo) else float(lo), inf if np.isinf(hi) else float(hi))
            for lo, hi in zip(rows.lo, rows.hi)
        ]
        self.slacks = []
        for ct in self.coupling:
            for sign in (1.0, -1.0):
                s = self.lp.NumVar(0.0, inf, "")
                ct.SetCoefficient(s, sign)
                self.slacks.append(s)
        self.columns: list[tuple[int, tuple[int, ...], pywraplp.Variable]] = []
        self.seen: set[tuple[int, tuple[int, ...]]] = set()

    def add(self, layer: int, assignment: np.ndarray) -> bool:
        key = (layer, tuple(int(r) for r in assignment))
        if key in self.seen:
            return False
        self.seen.add(key)
        var = self.lp.NumVar(0.0, self.lp.infinity(), "")
        self.convexity[layer].SetCoefficient(var, 1.0)
        heads = np.arange(len(assignment))
        for ct, coeff in zip(self.coupling, self.rows.coeff):
            ct.SetCoefficient(var, float(coeff[layer, heads, assignment].sum()))
        self.columns.append((layer, key[1], var))
        return True

    def set_costs(self, cost: np.ndarray | None, slack_cost: float) -> None:
        """Column costs from cost [layers, kv_heads, rules] (None: all zero), and one cost for every slack."""
        objective = self.lp.Objective()
        for layer, rules, var in self.columns:
            value = 0.0 if cost is None else float(cost[layer, np.arange(len(rules)), list(rules)].sum())
            objective.SetCoefficient(var, value)
        for s in self.slacks:
            objective.SetCoefficient(s, slack_cost)
        objective.SetMinimization()

    def solve(self) -> tuple[float, np.ndarray, np.ndarray]:
        """(objective, convexity duals, coupling duals)."""
        if self.lp.Solve() != pywraplp.Solver.OPTIMAL:
            raise RuntimeError("GLOP could not solve the restricted master LP")
        return (
            self.lp.Objective().Value(),
            np.array([c.dual_value() for c in self.convexity]),
            np.array([c.dual_value() for c in self.coupling]),
        )

    def candidates(self, layers: int) -> list[np.ndarray]:
        used: list[set[int]] = [set() for _ in range(layers)]
        for layer, rules, _ in self.columns:
            used[layer].update(rules)
        return [np.array(sorted(u), dtype=np.int64) for u in used]


def _generate(master: _Master, pricer: SubsetPricer, cost: np.ndarray | None) -> tuple[float, float]:
    """Add columns until none prices out; returns (LP value, best Lagrangian bound) for the costs in use."""
    base = np.zeros(master.rows.coeff.shape[1:]) if cost is None else cost
    best = -math.inf
    for _ in range(MAX_ROUNDS):
        value, sigma, pi = master.solve()
        if cost is None:
            pi = np.clip(pi, -1.0, 1.0)  # with unit slack costs, duals beyond +-1 are round-off
        values, assignment = pricer(base - np.tensordot(pi, master.rows.coeff, axes=1))
        best = max(best, lagrangian_bound(values, pi, master.rows))
        entering = [layer for layer in range(len(values)) if values[layer] - sigma[layer] < -_RC_TOL]
        if not sum(master.add(layer, assignment[layer]) for layer in entering):
            break
    return value, best


def column_generation(cost: np.ndarray, rows: CouplingRows, k: int) -> ColGenResult:
    """Phase 1 finds a fractional mix meeting the rows (or proves there is none), phase 2 minimises cost."""
    layers, heads, rules = cost.shape
    pricer, master = SubsetPricer(rules, heads, k), _Master(rows)
    _, start = pricer(cost)
    for layer in range(layers):
        master.add(layer, start[layer])
    master.set_costs(None, 1.0)
    violation, violation_bound = _generate(master, pricer, None)
    if violation_bound > _INFEASIBLE_TOL:
        return ColGenResult(True, math.inf, master.candidates(layers))
    if violation > _INFEASIBLE_TOL:  # not proven either way (round-off): leave it to the MILP
        return ColGenResult(False, -math.inf, master.candidates(layers))
    # Slacks stay in the LP at a prohibitive cost so it remains feasible; the bound does not depend on that cost.
    master.set_costs(cost, 1e3 * (1.0 + float(cost.max(axis=-1).sum())))
    _, bound = _generate(master, pricer, cost)
    return ColGenResult(False, bound, master.candidates(layers))
