"""Step 4: every candidate plan (each Pareto plan of each retrieval weight, plus the hybrid plans) and the uniform
plan of the same density through a real masked forward on held-out samples and through held-out natural text
(steps/fidelity.py); the choice and the ship gate (gate.py); the plan, its report and its export."""

from __future__ import annotations

import logging
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from moa_vllm.plan.generate import uniform_plan
from moa_vllm.plan.io import load_plan, save_plan
from moa_vllm.plan.schema import ModelFingerprint, Plan
from moa_vllm.planner import artefacts as art
from moa_vllm.planner.artefacts import density_tag
from moa_vllm.planner.config import PlannerConfig
from moa_vllm.planner.gate import Scores, ShipGateError, choose
from moa_vllm.planner.hybrid import hybrid_plans
from moa_vllm.planner.masked import mean_loss, plan_loss
from moa_vllm.planner.model_inputs import ModelInputs
from moa_vllm.planner.optimize import solution_to_plan
from moa_vllm.planner.steps.calibrate import Calibration
from moa_vllm.planner.steps.fidelity import HeldOutText, fidelity
from moa_vllm.planner.steps.optimize import ParetoSet, weight_suffix
from moa_vllm.planner.steps.profile import profiled_count
from moa_vllm.planner.steps.retrieval import LevelRetrieval
from moa_vllm.planner.tasks import PROSE_TASKS

log = logging.getLogger(__name__)

TRUTH_VERSION = 1


@dataclass(frozen=True)
class Candidate:
    name: str
    plan: Plan
    loss: float  # held-out true loss
    retrieval_weight: float | None = None  # of its Pareto set; None for a hybrid
    index: int | None = None  # in its Pareto set


def plan_notes(config: PlannerConfig) -> str:
    c = config
    profiled = {n: profiled_count(c, n) for n in c.levels}
    return (
        f"moa-plan: calibration at {c.levels} tokens (seed {c.seed}), samples profiled per length {profiled}, "
        f"objectives at {list(c.lengths)}, chosen by the true held-out loss at {c.validation_length} "
        f"({c.validation_samples} samples) among the candidates that beat uniform on it"
        + (f" and on held-out fidelity ({c.fidelity_texts} x {c.fidelity_length} tokens)" if c.fidelity_texts else "")
        + f"; loss = answer CE + {c.context_weight} x context CE; rule loss is "
        "token-exact (per-offset influence sums); candidates: influence only, influence + w x retrieval "
        f"mass for w in {list(c.retrieval_weights)}, hybrid-K for K in {list(c.hybrid_heads)}"
    )


def kept_solutions(pareto: ParetoSet, limit: int) -> list[int]:
    """Indices of the Pareto plans worth validating: all (limit 0), else the `limit` of lowest predicted loss.
    Each profiled length's objective is scaled to the set's range at that length (0 = the set's best) and the
    scaled objectives are summed, so no length dominates by its token count."""
    solutions = pareto.solutions
    if not limit or len(solutions) <= limit:
        return list(range(len(solutions)))
    lengths = list(solutions[0].objectives)
    low = {n: min(s.objectives[n] for s in solutions) for n in lengths}
    spread = {n: (max(s.objectives[n] for s in solutions) - low[n]) or 1.0 for n in lengths}
    score = [sum((s.objectives[n] - low[n]) / spread[n] for n in lengths) for s in solutions]
    return sorted(sorted(range(len(solutions)), key=lambda i: (score[i], i))[:limit])


def candidate_plans(pareto: ParetoSet, fingerprint: ModelFingerprint, config: PlannerConfig) -> dict[str, Plan]:
    """The Pareto plans of one candidate set that are validated (pareto-i, i the plan's index in the set; at most
    max_candidates of them); the influence-only set (weight 0) adds the uniform plan of the same density."""
    notes = plan_notes(config)
    plans = {}
    for i in kept_solutions(pareto, config.max_candidates):
        solution = pareto.solutions[i]
        plan = solution_to_plan(solution, pareto.problem, fingerprint, config.sinks, notes)
        plan.metadata.extra["retrieval_weight"] = pareto.retrieval_weight
        plans[f"pareto-{i}"] = plan
    if pareto.retrieval_weight == 0:
        plans["uniform"] = uniform_plan(fingerprint, pareto.density, config.sinks, config.min_span)
    return plans


def hybrid_candidates(
    density: float, retrieval: dict[int, LevelRetrieval], fingerprint: ModelFingerprint, config: PlannerConfig
) -> dict[str, Plan]:
    """hybrid-K for every K of hybrid_heads the budget allows (moa_vllm/planner/hybrid.py): the K heads of most
    retrieval mass (summed over the profiled lengths) at full span, the rest at one elastic window."""
    c = config
    if not c.hybrid_heads:
        return {}
    mass = sum(retrieval[n].mass for n in c.lengths)
    notes = plan_notes(c)
    return hybrid_plans(
        fingerprint, mass, c.hybrid_heads, density, c.sinks, c.min_span, c.constraint_lengths, notes, c.lengths
    )


def truth_key(pareto: ParetoSet, calibration: Calibration, config: PlannerConfig) -> dict[str, Any]:
    c = config
    return {
        "version": TRUTH_VERSION,
        "optimize": pareto.digest,
        "calibration": calibration.digest,
        "validation_length": c.validation_length,
        "context_weight": c.context_weight,
        "sinks": c.sinks,
        "min_span": c.min_span,
        "max_candidates": c.max_candidates,
    }


def true_losses(
    pareto: ParetoSet,
    plans: dict[str, Plan],
    calibration: Calibration,
    model: ModelInputs,
    config: PlannerConfig,
    work: art.WorkDir,
) -> dict[str, Any]:
    """Held-out true loss (masked forward at the validation length) of one candidate set's plans (plus dense
    for the influence-only set); checkpointed per plan."""
    measured: dict[str, Plan | None] = dict(plans)
    if pareto.retrieval_weight == 0:
        measured = {"dense": None, **measured}
    name = f"truth-{density_tag(pareto.density)}{weight_suffix(pareto.retrieval_weight)}"
    return measure_truth(name, truth_key(pareto, calibration, config), measured, calibration, model, config, work)


def hybrid_true_losses(
    density: float,
    plans: dict[str, Plan],
    calibration: Calibration,
    model: ModelInputs,
    config: PlannerConfig,
    work: art.WorkDir,
) -> dict[str, Any]:
    c = config
    key = {
        "version": TRUTH_VERSION,
        "calibration": calibration.digest,
        "validation_length": c.validation_length,
        "context_weight": c.context_weight,
        "plans": {n: art.plan_digest(p) for n, p in plans.items()},
    }
    return measure_truth(f"truth-{density_tag(density)}-hybrid", key, dict(plans), calibration, model, config, work)


def measure_truth(
    name: str,
    key: dict[str, Any],
    plans: dict[str, Plan | None],
    calibration: Calibration,
    model: ModelInputs,
    config: PlannerConfig,
    work: art.WorkDir,
) -> dict[str, Any]:
    path = work.path(f"{name}.json")
    doc = art.read_json(path)
    if not doc or doc.get("key") != art.normalised(key):
        doc = {"key": art.normalised(key), "complete": False, "plans": {}}
    if doc["complete"]:
        return doc
    samples = calibration.at(config.validation_length)
    if not samples:
        raise ValueError(f"no held-out samples at the validation length {config.validation_length}")
    todo = [n for n in plans if n not in doc["plans"]]
    with (
        work.timings.step(name, plans=len(todo), samples=len(samples)),
        work.bar(len(todo) * len(samples), name.replace("truth-", "true loss ")) as bar,
    ):
        for n in todo:
            losses = []
            for sample in samples:
                losses += plan_loss(model.model, plans[n], [sample], config.context_weight)
                bar.update(1)
            doc["plans"][n] = {"mean": asdict(mean_loss(losses)), "samples": [asdict(x) for x in losses]}
            art.write_json_atomic(path, doc)
    doc["complete"] = True
    art.write_json_atomic(path, doc)
    return doc


def pareto_candidates(plans_of: dict[float, dict[str, Plan]], truths: dict[float, dict[str, Any]]) -> list[Candidate]:
    """Each validated Pareto plan of each retrieval weight with its held-out true loss, named [r{w}-]pareto-{i}."""
    out = []
    for w, plans in plans_of.items():
        prefix = "" if w == 0 else f"r{w:g}-"
        for name, plan in plans.items():
            if name.startswith("pareto-"):
                loss = truths[w]["plans"][name]["mean"]["total"]
                out.append(Candidate(prefix + name, plan, loss, w, int(name.removeprefix("pareto-"))))
    return out


def validate(
    density: float,
    pareto_sets: dict[float, ParetoSet],
    retrieval: dict[int, LevelRetrieval] | None,
    calibration: Calibration,
    model: ModelInputs,
    held_out: HeldOutText,
    config: PlannerConfig,
    work: art.WorkDir,
) -> Path:
    """Choose among the candidate plans (every Pareto plan of every retrieval weight, every hybrid-K) by the
    held-out measures: the lowest true loss among those that beat the uniform plan of the same density on true
    loss and on held-out fidelity (gate.py); refuse when none does (ShipGateError, the ship gate); write the plan
    and its report. pareto_sets: this density's set per retrieval weight, 0 first."""
    c, fp = config, model.fingerprint
    plans_of = {w: candidate_plans(s, fp, c) for w, s in pareto_sets.items()}
    truths = {w: true_losses(pareto, plans_of[w], calibration, model, c, work) for w, pareto in pareto_sets.items()}
    candidates = pareto_candidates(plans_of, truths)
    hybrid_doc = None
    if c.hybrid_heads:
        if retrieval is None:
            raise ValueError("hybrid candidates need the retrieval step's profiles")
        hybrids = hybrid_candidates(density, retrieval, fp, c)
        hybrid_doc = hybrid_true_losses(density, hybrids, calibration, model, c, work)
        candidates += [Candidate(n, p, hybrid_doc["plans"][n]["mean"]["total"]) for n, p in hybrids.items()]
    base = truths[0.0]
    uniform_plan_ = plans_of[0.0]["uniform"]
    scored = fidelity(density, {**{x.name: x.plan for x in candidates}, "uniform": uniform_plan_}, held_out, c, work)
    tag = density_tag(density)
    path, key = work.path(f"validate-{tag}.json"), validate_key(truths, hybrid_doc, density, fp, c, work)
    plan_path, report_dir = work.path(f"plan-{tag}.json"), work.path(f"report-{tag}")

    natural = natural_text_losses(truths, hybrid_doc, calibration, c)

    def scores(name: str, loss: float) -> Scores:
        f = scored.get(name, {})
        return Scores(loss, f.get("kl"), f.get("top1"), natural.get(name))

    uniform = scores("uniform", base["plans"]["uniform"]["mean"]["total"])
    where = f"true loss at N={c.validation_length}"
    if natural:
        where += f" and its answer loss on {natural_count(calibration, c)} natural-text retrieval samples"
    if scored:
        where += f", fidelity on {c.fidelity_texts} x {c.fidelity_length} tokens of held-out text"
    choice = choose({x.name: scores(x.name, x.loss) for x in candidates}, uniform, density, where)
    verdict = choice.verdict
    if verdict is not None and not c.ship_gate:
        log.warning("%s (ship gate off: written anyway)", verdict.replace("; no plan written", ""))
        verdict = None
    if art.json_matches(path, key) and plan_path.exists() and verdict is None:
        log.info("validate: %s is up to date, skipped", path)
        return plan_path
    best = next(x for x in candidates if x.name == choice.name)
    shortfalls = scores(best.name, best.loss).shortfalls(uniform)
    dense = base["plans"]["dense"]["mean"]["total"]
    weight = best.retrieval_weight if best.retrieval_weight is not None else 0.0
    group = [x for x in candidates if x.index is not None and x.retrieval_weight == weight]
    record = {
        "key": key,
        "chosen": best.name,
        "retrieval_weight": best.retrieval_weight,
        "validation_length": c.validation_length,
        "true_loss": {
            "candidates": {x.name: x.loss for x in candidates},
            "pareto": {str(x.index): x.loss for x in group},
            "uniform": uniform.loss,
            "dense": dense,
        },
        "fidelity": _fidelity_record(scored, c),
        "natural_text_retrieval": {"samples": natural_count(calibration, c), "answer_loss": natural}
        if natural
        else None,
        "shipped": verdict is None,
        "beats_uniform": not shortfalls,
        "shortfalls": shortfalls,
    }
    art.write_json_atomic(path, record)
    if verdict is not None:
        plan_path.unlink(missing_ok=True)
        raise ShipGateError(verdict)
    with work.timings.step(f"validate-{tag}"):
        plan = best.plan.model_copy(deep=True)
        plan.metadata.extra["true_loss"] = {
            "length": c.validation_length,
            "samples": len(base["plans"]["dense"]["samples"]),
            "plan": best.loss,
            "uniform": uniform.loss,
            "dense": dense,
            "beats_uniform": best.loss < uniform.loss,
            "candidates": record["true_loss"]["candidates"],
        }
        if scored:
            plan.metadata.extra["fidelity"] = {
                "length": c.fidelity_length,
                "texts": c.fidelity_texts,
                "plan": {k: scored[best.name][k] for k in ("top1", "kl")},
                "uniform": {k: scored["uniform"][k] for k in ("top1", "kl")},
            }
        save_plan(plan, plan_path)
        _write_reports(report_dir, pareto_sets[weight], best.index, plan, group, uniform.loss, retrieval, record, c)
    return plan_path


def natural_count(calibration: Calibration, config: PlannerConfig) -> int:
    return sum(s.task in PROSE_TASKS for s in calibration.at(config.validation_length))


def natural_text_losses(
    truths: dict[float, dict[str, Any]],
    hybrid_doc: dict[str, Any] | None,
    calibration: Calibration,
    config: PlannerConfig,
) -> dict[str, float]:
    """Per candidate (named as pareto_candidates names them) and for uniform and dense: mean answer loss over the
    held-out samples of the natural-text tasks; empty when the validation samples hold none."""
    held_out = calibration.at(config.validation_length)
    natural = [i for i, s in enumerate(held_out) if s.task in PROSE_TASKS]
    if not natural:
        return {}
    entries: dict[str, dict[str, Any]] = {}
    for w, doc in truths.items():
        prefix = "" if w == 0 else f"r{w:g}-"
        entries.update({(prefix + n if n.startswith("pareto-") else n): e for n, e in doc["plans"].items()})
    if hybrid_doc is not None:
        entries.update(hybrid_doc["plans"])
    return {n: sum(e["samples"][i]["answer"] for i in natural) / len(natural) for n, e in entries.items()}


def validate_key(
    truths: dict[float, dict[str, Any]],
    hybrid_doc: dict[str, Any] | None,
    density: float,
    fingerprint: ModelFingerprint,
    config: PlannerConfig,
    work: art.WorkDir,
) -> dict[str, Any]:
    """Digests of the artefacts the choice read (as stored: a truth doc is digested as it reads back)."""
    tag = density_tag(density)
    truth = {f"{w:g}": art.digest(art.read_json(work.path(f"truth-{tag}{weight_suffix(w)}.json"))) for w in truths}
    key: dict[str, Any] = {"truth": truth["0"] if len(truth) == 1 else truth}
    if hybrid_doc is not None:
        key["hybrid"] = art.digest(art.read_json(work.path(f"truth-{tag}-hybrid.json")))
    if config.fidelity_texts:
        key["fidelity"] = art.digest(art.read_json(work.path(f"fidelity-{tag}.json")))
    key["fingerprint"] = fingerprint.model_dump()
    return key


def _fidelity_record(scored: dict[str, dict[str, Any]], config: PlannerConfig) -> dict[str, Any] | None:
    if not scored:
        return None
    plans = {n: {k: v[k] for k in ("top1", "kl")} for n, v in scored.items()}
    return {"length": config.fidelity_length, "texts": config.fidelity_texts, "plans": plans}


def _write_reports(
    out: Path,
    pareto: ParetoSet,
    chosen: int | None,
    plan: Plan,
    group: list[Candidate],
    uniform_loss: float,
    retrieval: dict[int, LevelRetrieval] | None,
    record: dict[str, Any],
    config: PlannerConfig,
) -> None:
    """The Pareto report of the chosen plan's set, retrieval mass vs span per head (when the retrieval step ran),
    and every candidate's measures (when fidelity was measured)."""
    from moa_vllm.planner.report import write_candidates_report, write_report, write_retrieval_report  # matplotlib

    measured = {x.index: x.loss for x in group}
    losses = [measured.get(i, float("nan")) for i in range(len(pareto.solutions))]
    write_report(
        out, pareto.solutions, chosen, pareto.problem, plan, losses, config.validation_length, uniform_loss=uniform_loss
    )
    if retrieval is not None:
        mass = {n: retrieval[n].mass for n in config.lengths}
        write_retrieval_report(out, mass, plan, config.validation_length)
    if record["fidelity"] is not None:
        all_losses = {**record["true_loss"]["candidates"], "uniform": uniform_loss}
        write_candidates_report(out, all_losses, record["fidelity"]["plans"], record["chosen"], pareto.density)


def export_plan(work: art.WorkDir, density: float, out_dir: Path) -> Path:
    """Copy the plan and its report into out_dir as moa-d{density}.json and moa-d{density}-report/."""
    tag = density_tag(density)
    out_dir.mkdir(parents=True, exist_ok=True)
    plan_src = work.path(f"plan-{tag}.json")
    load_plan(plan_src)  # never export a plan that does not load
    plan_dst = out_dir / f"moa-{tag}.json"
    shutil.copyfile(plan_src, plan_dst)
    shutil.copytree(work.path(f"report-{tag}"), out_dir / f"moa-{tag}-report", dirs_exist_ok=True)
    return plan_dst
