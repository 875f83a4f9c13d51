"""Wall time of full Pareto runs of the planner MILP on synthetic instances (CPU only, one solver thread).

Usage: python benchmarks/milp_synthetic.py [--sizes 32x8 30x3] [--lengths 2048 4096 8192] [--extension 16384]
       [--density 0.5] [--seed 0] [--relative-gap 0.01] [--out FILE]
Sizes are layers x KV heads: 32x8 is a Llama-3-8B-like model, 30x3 the embedded SmolLM2-135M. Losses are synthetic:
half the heads are "local" (their loss depends on the span in tokens), half "global" (on the span as a fraction of
N); each head gets its own sensitivity. The result JSON records the command, wall times, objectives and gaps.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

from moa_vllm.planner.optimize import PlanningProblem, SolverOptions, density_targets, pareto_front, solve_single
from moa_vllm.planner.rules import RuleGrid, token_matrix

REPO = Path(__file__).resolve().parents[1]
MIN_SPAN = 128


def synthetic_loss(grid: RuleGrid, lengths: list[int], layers: int, kv_heads: int, seed: int) -> np.ndarray:
    """float [lengths, layers, kv_heads, rules], decreasing in the span of every head."""
    rng = np.random.default_rng(seed)
    spans = token_matrix(grid, lengths, MIN_SPAN).astype(np.float64)  # [lengths, rules]
    frac = spans / np.asarray(lengths, dtype=np.float64)[:, None]
    sensitivity = rng.lognormal(0.0, 1.0, size=(layers, kv_heads))
    sharpness = rng.uniform(1.0, 4.0, size=(layers, kv_heads))
    local = rng.random((layers, kv_heads)) < 0.5
    reach = rng.uniform(256, 4096, size=(layers, kv_heads))  # tokens a local head needs
    missing_global = (1.0 - frac)[:, None, None, :] ** sharpness[None, :, :, None]
    missing_local = np.clip(1.0 - spans[:, None, None, :] / reach[None, :, :, None], 0.0, 1.0)
    missing = np.where(local[None, :, :, None], missing_local, missing_global)
    noise = rng.uniform(0.95, 1.05, size=missing.shape)
    return sensitivity[None, :, :, None] * missing * noise


FAST_AND_COMPACT = (("fast_path", True), ("compact_model_only", False))


def single_solve(problem: PlanningProblem, options: SolverOptions, decomposition: bool) -> dict:
    """CPU time, objective and gap of one solve of the first objective."""
    start = time.process_time()
    solution = solve_single(problem, 0, dataclasses.replace(options, decomposition=decomposition))
    return {
        "cpu_time_s": round(time.process_time() - start, 2),
        "objective": round(solution.objectives[problem.lengths[0]], 6),
        "gap": solution.gap,
    }


def run_size(layers: int, kv_heads: int, args: argparse.Namespace) -> dict:
    grid = RuleGrid()
    problem = PlanningProblem(
        loss=synthetic_loss(grid, args.lengths, layers, kv_heads, args.seed),
        lengths=tuple(args.lengths),
        density_targets=density_targets(args.density, [*args.lengths, *args.extension]),
        grid=grid,
        min_span=MIN_SPAN,
    )
    options = SolverOptions(time_limit_s=args.time_limit, relative_gap=args.relative_gap)
    start, cpu_start, load_before = time.perf_counter(), time.process_time(), os.getloadavg()[0]
    front = pareto_front(problem, options)
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    print(f"{layers}x{kv_heads}: {len(front)} Pareto points in {wall:.1f}s wall, {cpu:.1f}s CPU", flush=True)
    return {
        "single_solve_first_length": {  # why `milp` has a fast path: the same solve with and without it
            path: single_solve(problem, options, decomposition) for path, decomposition in FAST_AND_COMPACT
        },
        "instance": {
            "layers": layers,
            "kv_heads": kv_heads,
            "rules": len(grid),
            "profiled_lengths": args.lengths,
            "density_targets": {str(n): d for n, d in problem.density_targets.items()},
            "max_rules_per_layer": problem.max_rules_per_layer,
            "seed": args.seed,
        },
        "wall_time_s": round(wall, 2),
        "cpu_time_s": round(cpu, 2),  # this process only: the machine is shared, so wall time depends on the load
        "load_average_1min": {"before": round(load_before, 2), "after": round(os.getloadavg()[0], 2)},
        "min_objectives": {str(n): round(min(s.objectives[n] for s in front), 6) for n in problem.lengths},
        "pareto_points": len(front),
        "all_certified": all(s.optimal for s in front),
        "max_gap": max(s.gap for s in front),
        "front": [
            {
                "objectives": {str(n): round(v, 6) for n, v in s.objectives.items()},
                "densities": {str(n): round(d, 6) for n, d in s.densities.items()},
                "gap": s.gap,
            }
            for s in front
        ],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", nargs="+", default=["32x8", "30x3"], help="layers x KV heads")
    ap.add_argument("--lengths", type=int, nargs="+", default=[2048, 4096, 8192])
    ap.add_argument("--extension", type=int, nargs="*", default=[16384])
    ap.add_argument("--density", type=float, default=0.5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--time-limit", type=float, default=60.0, help="per MILP solve, seconds")
    ap.add_argument("--relative-gap", type=float, default=SolverOptions.relative_gap)
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "milp_synthetic.json")
    ap.add_argument("--verbose", action="store_true", help="log every fallback to the compact model")
    args = ap.parse_args()
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING, format="%(asctime)s %(message)s")

    runs = [run_size(*(int(v) for v in size.split("x")), args) for size in args.sizes]
    out = {
        "command": "python " + " ".join([os.path.relpath(sys.argv[0], REPO), *sys.argv[1:]]),
        "device": "CPU",
        "cpu": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores (shared), 1 solver thread",
        "solver": {
            "name": "HiGHS via OR-Tools pywraplp, column-generation bound (GLOP) + restricted integer program",
            "threads": 1,
            "time_limit_s_per_solve": args.time_limit,
            "relative_gap": args.relative_gap,
            "rule_grid": "5 alphas x 9 betas",
        },
        "runs": runs,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
