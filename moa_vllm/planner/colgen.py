"""Dantzig-Wolfe lower bound for the planner MILP, by column generation over whole-layer configurations.

A column is one layer's configuration: a rule per KV head using at most K distinct rules, so the K limit lives inside
the columns and the master LP keeps only the few coupling rows (density budgets, epsilon bounds). Why bother: the
compact x/y model's LP bound is weak (x <= y lets a layer spread fractions over many rules), so HiGHS needs 4-14 s
CPU per solve on a 32 x 8 x 45 instance, and a Pareto set takes tens of solves. This bound is tight, and the
generated columns seed a small restricted integer program (see `milp`) whose solution it usually certifies.

Validity does not rest on the LP solver: for any multipliers pi the Lagrangian value
    sum_l min_c (cost_c - pi . a_c) + sum_i (pi_i * lo_i if pi_i > 0 else pi_i * hi_i)
is a lower bound on the MILP optimum, and pricing is exact (every K-subset of the grid is tried).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from ortools.linear_solver import pywraplp

MAX_SUBSETS = 5_000  # K-subsets of the grid the pricer may enumerate; above that, no decomposition
MAX_ROUNDS = 200
_REDUCED_COST_TOL = 1e-9


@dataclass(frozen=True)
class CouplingRows:
    """lo[i] <= sum coeff[i, l, h, r] * x[l, h, r] <= hi[i]; rows scaled to O(1) (densities, normalised losses)."""

    coeff: np.ndarray  # [rows, layers, kv_heads, rules]
    lo: np.ndarray  # [rows], -inf where unbounded
    hi: np.ndarray  # [rows], +inf where unbounded


@dataclass(frozen=True)
class Columns:
    bound: float  # valid lower bound on the MILP optimum (-inf when none was established)
    columns: list[np.ndarray]  # per layer: int [columns, kv_heads], the configurations generated


def pricing_possible(num_rules: int, num_heads: int, k: int) -> bool:
    return k >= min(num_rules, num_heads) or math.comb(num_rules, k) <= MAX_SUBSETS


class Pricer:
    """Cheapest configuration of every layer with at most k distinct rules, by enumerating k-subsets of the grid."""

    def __init__(self, num_rules: int, num_heads: int, k: int):
        self.subsets = None
        if k < min(num_rules, num_heads):
            self.subsets = np.array(list(itertools.combinations(range(num_rules), k)), dtype=np.int64)

    def __call__(self, cost: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """cost [layers, kv_heads, rules] -> (cheapest value per layer, its configuration [layers, kv_heads])."""
        if self.subsets is None:  # the limit cannot bind: every head takes its own cheapest rule
            return cost.min(axis=-1).sum(axis=-1), cost.argmin(axis=-1)
        per_subset = cost[:, :, self.subsets].min(axis=-1).sum(axis=1)  # [layers, subsets]
        rules = self.subsets[per_subset.argmin(axis=1)]  # [layers, k]
        inside = np.take_along_axis(cost, np.broadcast_to(rules[:, None, :], (*cost.shape[:2], rules.shape[1])), -1)
        configuration = np.take_along_axis(rules, inside.argmin(axis=-1), axis=1)  # [layers, kv_heads]
        return per_subset.min(axis=1), configuration


def lagrangian_bound(values: np.ndarray, pi: np.ndarray, rows: CouplingRows) -> float:
    """The bound in the module docstring; `values` are the priced minima for cost - pi . coeff."""
    side = np.where(pi > 0, rows.lo, np.where(pi < 0, rows.hi, 0.0))
    with np.errstate(invalid="ignore"):
        terms = np.where(pi != 0, pi * side, 0.0)  # pi towards an infinite side gives -inf: no bound from these pi
    return float(values.sum() + terms.sum())


def column_generation(cost: np.ndarray, rows: CouplingRows, k: int, starts: Sequence[np.ndarray] = ()) -> Columns:
    """Solve the master LP by column generation; returns the best bound seen and the columns per layer.

    `starts` (assignments [layers, kv_heads]) contribute their layer configurations as initial columns."""
    layers, heads, num_rules = cost.shape
    pricer = Pricer(num_rules, heads, k)
    lp = _MasterLp(cost, rows)
    for configuration in [pricer(cost)[1], *starts]:
        for layer in range(layers):
            lp.add(layer, configuration[layer])
    bound = -math.inf
    for _ in range(MAX_ROUNDS):
        sigma, pi = lp.solve()
        pi = np.where(np.isinf(rows.lo), np.minimum(pi, 0.0), pi)  # round-off can give a dual towards an
        pi = np.where(np.isinf(rows.hi), np.maximum(pi, 0.0), pi)  # infinite side, which would bound nothing
        values, best = pricer(cost - np.tensordot(pi, rows.coeff, axes=1))
        bound = max(bound, lagrangian_bound(values, pi, rows))
        entering = [layer for layer in range(layers) if values[layer] - sigma[layer] < -_REDUCED_COST_TOL]
        if not sum(lp.add(layer, best[layer]) for layer in entering):
            break
    return Columns(bound, lp.columns())


class _MasterLp:
    """GLOP LP: a convexity row per layer, the coupling rows with penalised slacks so it is always feasible."""

    def __init__(self, cost: np.ndarray, rows: CouplingRows):
        self.cost, self.rows = cost, rows
        self.lp = pywraplp.Solver.CreateSolver("GLOP")
        inf = self.lp.infinity()
        self.convexity = [self.lp.Constraint(1.0, 1.0) for _ in range(cost.shape[0])]
        self.coupling = [
            self.lp.Constraint(-inf if np.isinf(lo) else float(lo), inf if np.isinf(hi) else float(hi))
            for lo, hi in zip(rows.lo, rows.hi)
        ]
        # Slacks keep the LP feasible while columns are missing; their cost only steers the duals, since the
        # bound above is valid for any multipliers.
        penalty = 1e3 * (1.0 + float(np.abs(cost).max(axis=-1).sum()))
        objective = self.lp.Objective()
        for ct in self.coupling:
            for sign in (1.0, -1.0):
                slack = self.lp.NumVar(0.0, inf, "")
                ct.SetCoefficient(slack, sign)
                objective.SetCoefficient(slack, penalty)
        objective.SetMinimization()
        self.seen: list[dict[tuple[int, ...], None]] = [{} for _ in range(cost.shape[0])]

    def add(self, layer: int, configuration: np.ndarray) -> bool:
        key = tuple(int(r) for r in configuration)
        if key in self.seen[layer]:
            return False
        self.seen[layer][key] = None
        heads = np.arange(len(key))
        var = self.lp.NumVar(0.0, self.lp.infinity(), "")
        self.convexity[layer].SetCoefficient(var, 1.0)
        for ct, coeff in zip(self.coupling, self.rows.coeff):
            ct.SetCoefficient(var, float(coeff[layer, heads, key].sum()))
        self.lp.Objective().SetCoefficient(var, float(self.cost[layer, heads, key].sum()))
        return True

    def solve(self) -> tuple[np.ndarray, np.ndarray]:
        """(convexity duals, coupling duals)."""
        if self.lp.Solve() != pywraplp.Solver.OPTIMAL:
            raise RuntimeError("GLOP could not solve the restricted master LP")
        return (
            np.array([c.dual_value() for c in self.convexity]),
            np.array([c.dual_value() for c in self.coupling], dtype=np.float64).reshape(len(self.coupling)),
        )

    def columns(self) -> list[np.ndarray]:
        return [np.array(list(seen), dtype=np.int64) for seen in self.seen]
