"""`moa-plan run` and its steps as one chain: each step receives the artefacts it needs and returns its own,
resuming from the work dir when its inputs are unchanged (moa_vllm/planner/steps/ has the steps, in order).

    calibrate -> profile [-> retrieval] -> optimize (per density x retrieval weight) -> validate (per density)
                                                                                     \\-> diagnose
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from moa_vllm.planner.artefacts import WorkDir
from moa_vllm.planner.config import STEPS, PlannerConfig
from moa_vllm.planner.gate import ShipGateError
from moa_vllm.planner.model_inputs import ModelInputs
from moa_vllm.planner.steps.calibrate import calibrate
from moa_vllm.planner.steps.diagnose import DiagnoseOptions, diagnose
from moa_vllm.planner.steps.fidelity import HeldOutText
from moa_vllm.planner.steps.optimize import candidate_weights, optimize
from moa_vllm.planner.steps.profile import profile
from moa_vllm.planner.steps.retrieval import retrieval
from moa_vllm.planner.steps.validate import candidate_plans, export_plan, true_losses, validate


@dataclass
class ChainResult:
    timings: Path
    plans: dict[float, Path] = field(default_factory=dict)  # density -> plan written in the work dir
    exported: dict[float, Path] = field(default_factory=dict)  # density -> copy in out_dir
    refused: dict[float, str] = field(default_factory=dict)  # density -> the ship gate's verdict
    diagnosis: Path | None = None


def needs_retrieval(config: PlannerConfig, until: str, diagnosis: DiagnoseOptions | None) -> bool:
    """The retrieval step runs when a later step of this chain reads it: a retrieval-weighted candidate set, the
    hybrid candidates (validation), or the diagnosis's group ablation."""
    if until == "diagnose":
        return bool(diagnosis and diagnosis.ablation_heads)
    return bool(config.retrieval_weights) or (until in ("validate", "run") and bool(config.hybrid_heads))


def run(
    config: PlannerConfig,
    until: str = "run",
    densities: tuple[float, ...] = (0.5,),
    out_dir: Path | None = None,
    diagnosis: DiagnoseOptions | None = None,
    model: ModelInputs | None = None,
) -> ChainResult:
    """Run the chain up to and including `until` (one of STEPS; "run" = "validate" plus the export to out_dir)."""
    if until not in STEPS:
        raise ValueError(f"unknown step {until!r}; one of {', '.join(STEPS)}")
    work = WorkDir(config.work_dir, config.progress)
    model = model or ModelInputs(config.model, config.device)
    result = ChainResult(work.timings.path)
    cal = calibrate(model, config, work)
    if until == "calibrate":
        return result
    profiles = profile(cal, model, config, work)
    retr = retrieval(cal, model, config, work) if needs_retrieval(config, until, diagnosis) else None
    if until == "profile":
        return result
    layers = model.fingerprint.num_layers
    weights = (0.0,) if until == "diagnose" else candidate_weights(config)
    sets = {d: {w: optimize(profiles, retr, d, w, config, work, layers) for w in weights} for d in densities}
    if until == "optimize":
        return result
    if until == "diagnose":
        fp = model.fingerprint
        truths = {
            d: true_losses(s[0.0], candidate_plans(s[0.0], fp, config), cal, model, config, work)
            for d, s in sets.items()
        }
        result.diagnosis = diagnose(cal, profiles, retr, truths, model, diagnosis or DiagnoseOptions(), config, work)
        return result
    held_out = HeldOutText(model, cal, config)
    for d in densities:
        try:
            result.plans[d] = validate(d, sets[d], retr, cal, model, held_out, config, work)
        except ShipGateError as err:  # reported; the other densities still run
            result.refused[d] = str(err)
            continue
        if out_dir is not None:
            result.exported[d] = export_plan(work, d, out_dir)
    return result
