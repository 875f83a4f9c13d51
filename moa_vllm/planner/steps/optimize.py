"""Step 3: the Pareto set of rule assignments of one density target and one retrieval weight (OR-Tools MILP,
moa_vllm/planner/optimize.py), from the profiles (and the retrieval profiles when the weight is not 0)."""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from moa_vllm.planner import artefacts as art
from moa_vllm.planner.artefacts import density_tag
from moa_vllm.planner.config import PlannerConfig
from moa_vllm.planner.optimize import (
    ParetoSolution,
    PlanningProblem,
    SolverOptions,
    density_targets,
    pareto_front,
    solution_from_json,
    solution_to_json,
)
from moa_vllm.planner.rule_losses import layer_scale, level_loss
from moa_vllm.planner.steps.profile import LevelProfile
from moa_vllm.planner.steps.retrieval import LevelRetrieval

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ParetoSet:
    density: float
    retrieval_weight: float
    problem: PlanningProblem
    solutions: list[ParetoSolution]
    digest: str  # of the optimize artefact: what the true-loss key names

    @property
    def name(self) -> str:
        return set_name(self.density, self.retrieval_weight)


def set_name(density: float, retrieval_weight: float) -> str:
    """The optimize artefact's name (and its timings entry) for one density and retrieval weight."""
    return f"optimize-{density_tag(density)}{weight_suffix(retrieval_weight)}"


def candidate_weights(config: PlannerConfig) -> tuple[float, ...]:
    """Retrieval weights of the candidate sets: 0 (influence only) first."""
    return (0.0, *config.retrieval_weights)


def weight_suffix(weight: float) -> str:
    return "" if weight == 0 else f"-r{weight:g}"


def planning_problem(
    profiles: dict[int, LevelProfile],
    retrieval: dict[int, LevelRetrieval] | None,
    density: float,
    retrieval_weight: float,
    config: PlannerConfig,
    num_layers: int,
) -> PlanningProblem:
    c = config

    def mass(n: int) -> np.ndarray | None:
        return retrieval[n].mass if retrieval_weight and retrieval is not None else None

    loss = np.stack([level_loss(profiles[n].offsets, mass(n), retrieval_weight, c, n, num_layers) for n in c.lengths])
    return PlanningProblem(
        loss=loss,
        lengths=c.lengths,
        density_targets=density_targets(density, [*c.lengths, *c.extension_lengths]),
        grid=c.grid,
        min_span=c.min_span,
        max_rules_per_layer=c.max_rules_per_layer,
    )


def solver_options(config: PlannerConfig) -> SolverOptions:
    return SolverOptions(time_limit_s=config.time_limit_s, seed=config.seed, epsilon_points=config.epsilon_points)


def optimize_key(
    profiles: dict[int, LevelProfile],
    retrieval: dict[int, LevelRetrieval] | None,
    density: float,
    retrieval_weight: float,
    config: PlannerConfig,
    num_layers: int,
) -> dict[str, Any]:
    c = config
    key = {
        "profiles": {str(n): profiles[n].digest for n in c.lengths},
        "density": density,
        "lengths": list(c.lengths),
        "extension_lengths": list(c.extension_lengths),
        "grid": c.grid.model_dump(mode="json"),
        "min_span": c.min_span,
        "max_rules_per_layer": c.max_rules_per_layer,
        "solver": asdict(solver_options(c)),
    }
    if c.layer_correction is not None:  # only then: uncorrected runs keep their artefacts
        key["layer_scale"] = {
            str(n): layer_scale(c.layer_correction, n, num_layers).round(12).tolist() for n in c.lengths
        }
    if retrieval_weight:  # only then: influence-only sets keep their artefacts
        if retrieval is None:
            raise ValueError(f"retrieval weight {retrieval_weight} needs the retrieval step's profiles")
        key["retrieval"] = {str(n): retrieval[n].digest for n in c.lengths}
        key["retrieval_weight"] = retrieval_weight
    return key


def optimize(
    profiles: dict[int, LevelProfile],
    retrieval: dict[int, LevelRetrieval] | None,
    density: float,
    retrieval_weight: float,
    config: PlannerConfig,
    work: art.WorkDir,
    num_layers: int,
) -> ParetoSet:
    problem = planning_problem(profiles, retrieval, density, retrieval_weight, config, num_layers)
    name = set_name(density, retrieval_weight)
    path, key = (
        work.path(f"{name}.json"),
        optimize_key(profiles, retrieval, density, retrieval_weight, config, num_layers),
    )
    if art.json_matches(path, key):
        log.info("optimize: %s is up to date, skipped", path)
        solutions = [solution_from_json(s) for s in art.read_json(path)["solutions"]]
    else:
        with work.timings.step(name):
            solutions = pareto_front(problem, solver_options(config))
        art.write_json_atomic(path, {"key": key, "solutions": [solution_to_json(s) for s in solutions]})
    return ParetoSet(density, retrieval_weight, problem, solutions, art.digest(art.read_json(path)))
