"""`moa-plan diagnose` over a work dir: how well the first-order influence predicts the true loss change of a
sparse mask (measured, resumable), judged and plotted; the arithmetic lives in moa_vllm/planner/diagnose.py."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from moa_vllm.plan.io import load_plan
from moa_vllm.plan.span import window_tokens
from moa_vllm.planner import artefacts as art
from moa_vllm.planner import diagnose as dg
from moa_vllm.planner.artefacts import density_tag
from moa_vllm.planner.config import PlannerConfig
from moa_vllm.planner.influence import outside_window_loss
from moa_vllm.planner.masked import mean_loss, plan_loss, plan_loss_windows
from moa_vllm.planner.model_inputs import ModelInputs
from moa_vllm.planner.report import plot_diagnosis
from moa_vllm.planner.rule_losses import rule_windows
from moa_vllm.planner.steps.calibrate import Calibration
from moa_vllm.planner.steps.profile import LevelProfile
from moa_vllm.planner.steps.retrieval import LevelRetrieval

DIAGNOSE_VERSION = 1


@dataclass(frozen=True)
class DiagnoseOptions:
    probe_layers: int = 10  # layers probed (one KV head each)
    span_fractions: tuple[float, ...] = dg.DEFAULT_SPAN_FRACTIONS  # probe spans as fractions of N
    samples_per_level: int | None = None  # profiled samples per level used (default: all)
    extra_plans: tuple[Path, ...] = ()  # plan files whose held-out loss to add
    ablation_heads: int = 0  # also cut groups of this many heads at once (0: not measured)


def diagnose(
    calibration: Calibration,
    profiles: dict[int, LevelProfile],
    retrieval: dict[int, LevelRetrieval] | None,
    truths: dict[float, dict[str, Any]],
    model: ModelInputs,
    options: DiagnoseOptions,
    config: PlannerConfig,
    work: art.WorkDir,
) -> Path:
    """Predicted vs true loss change of probe heads on the profiled samples, split-half reliability, and the
    held-out true loss of the Pareto / uniform plans (truths: the influence-only set's true losses per density)
    and of the given plans; diagnose.json + diagnose.png in the work dir."""
    c, fp, o = config, model.fingerprint, options
    probes = dg.probe_set(fp.num_layers, fp.num_kv_heads, o.probe_layers, o.span_fractions)
    path = work.path("diagnose.json")
    # The measurement depends on the samples and probes only (answer and context parts are kept apart), so a
    # work dir profiled with another loss weighting can reuse it: copy diagnose.json over.
    key = art.normalised(
        {
            "version": DIAGNOSE_VERSION,
            "calibration": calibration.digest,
            "probes": [asdict(p) for p in probes],
            "samples_per_level": o.samples_per_level,
            "sinks": c.sinks,
        }
    )
    doc = art.read_json(path)
    if not doc or doc.get("key") != key:
        doc = {"key": key, "true": {}}
    levels = {}
    for level in c.lengths if probes else ():  # --probe-layers 0: plan losses / group ablation only
        offsets_each = profiles[level].offsets_each
        each = offsets_each[: o.samples_per_level]
        samples = calibration.at(level)[: len(each)]
        done = doc["true"].setdefault(str(level), [])
        with work.timings.step(f"diagnose-L{level}", samples=len(samples), resumed_from=len(done)):
            for sample in tqdm(samples[len(done) :], desc=f"diagnose {level}", disable=not c.progress):
                done.append(dg.true_changes(model.model, sample, probes, c.sinks, fp.num_kv_heads).tolist())
                art.write_json_atomic(path, doc)
        rule_each = outside_window_loss(torch.from_numpy(offsets_each), rule_windows(c, level)).numpy()
        levels[level] = {
            "predicted": dg.predicted_changes(each, probes, level, c.sinks),
            "true": dg.weighted(np.array(done).reshape(len(done), len(probes), 2), c.context_weight),
            "reliability": dg.split_half_reliability(rule_each),
        }
    summary = summarize(probes, levels, fp.num_layers) if probes else {"levels": {}}
    summary["plans"] = plan_truths(truths, o.extra_plans, calibration, model, c)
    if o.ablation_heads:
        if retrieval is None:
            raise ValueError("the group ablation needs the retrieval step's profiles")
        summary["group_ablation"] = group_ablation(
            profiles, retrieval, calibration, model, o.ablation_heads, o.span_fractions[0], c, work
        )
    doc.update(summary)
    art.write_json_atomic(path, doc)
    if probes:
        plot_diagnosis(work.path("diagnose.png"), probes, levels, summary)
    return path


def group_ablation(
    profiles: dict[int, LevelProfile],
    retrieval: dict[int, LevelRetrieval],
    calibration: Calibration,
    model: ModelInputs,
    count: int,
    fraction: float,
    config: PlannerConfig,
    work: art.WorkDir,
) -> dict[str, Any]:
    """Cut a GROUP of heads at once to `fraction` x N and measure the held-out true loss change, for three groups of
    `count` heads: most retrieval mass, most predicted influence loss (what the influence-only MILP protects), least
    retrieval mass. The first-order estimate adds single-head changes; this shows whether groups add up."""
    c, fp = config, model.fingerprint
    level = max(c.lengths)  # per-head scores from the longest profiled length
    mass = retrieval[level].mass
    window = window_tokens(max(round(fraction * level), c.min_span), c.sinks)
    predicted = outside_window_loss(torch.from_numpy(profiles[level].offsets), torch.tensor([window])).numpy()[..., 0]
    groups = {
        "most_retrieval": dg.group_heads(mass, count, highest=True),
        "most_influence": dg.group_heads(predicted, count, highest=True),
        "least_retrieval": dg.group_heads(mass, count, highest=False),
    }
    samples = calibration.at(c.validation_length)
    dense = mean_loss(plan_loss(model.model, None, samples, c.context_weight))
    out: dict[str, Any] = {"count": count, "span_fraction": fraction, "scores_from_length": level, "groups": {}}
    out["dense"] = asdict(dense)
    with work.timings.step("diagnose-group-ablation", groups=len(groups), samples=len(samples)):
        for name, heads in groups.items():
            losses = []
            for sample in samples:
                n = sample.level
                w = window_tokens(max(round(fraction * n), c.min_span), c.sinks)
                windows = dg.head_group_windows(heads, fp.num_layers, fp.num_kv_heads, n, w)
                losses += plan_loss_windows(model.model, windows, c.sinks, [sample], c.context_weight)
            true = mean_loss(losses)
            out["groups"][name] = {
                "heads": [list(h) for h in heads],
                "retrieval_mass": float(sum(mass[h] for h in heads)),
                "predicted_change": float(sum(predicted[h] for h in heads)),
                "true_change": {k: v - getattr(dense, k) for k, v in asdict(true).items()},
            }
    return out


def plan_truths(
    truths: dict[float, dict[str, Any]],
    extra_plans: tuple[Path, ...],
    calibration: Calibration,
    model: ModelInputs,
    config: PlannerConfig,
) -> dict[str, Any]:
    """Held-out true loss per plan: the Pareto and uniform plans of each density, and any given plan files."""
    out: dict[str, Any] = {}
    for d, truth in truths.items():
        out[density_tag(d)] = {name: v["mean"] for name, v in truth["plans"].items()}
    samples = calibration.at(config.validation_length)
    for plan_file in extra_plans:
        losses = plan_loss(model.model, load_plan(plan_file), samples, config.context_weight)
        out[str(plan_file)] = asdict(mean_loss(losses))
    if extra_plans:
        out["dense"] = asdict(mean_loss(plan_loss(model.model, None, samples, config.context_weight)))
    return out


def summarize(probes, levels: dict[int, dict[str, Any]], num_layers: int) -> dict[str, Any]:
    """Correlation, per-layer ratio and reliability per profiled level and over all levels (means over samples)."""
    out: dict[str, Any] = {"levels": {}}
    pooled_p, pooled_t = [], []
    for level, d in levels.items():
        pred, true = d["predicted"][: len(d["true"])], d["true"]
        mp, mt = pred.mean(0), true.mean(0)
        pooled_p.append(mp)
        pooled_t.append(mt)
        out["levels"][str(level)] = {
            "samples": int(len(true)),
            "probes": [{**asdict(p), "predicted": float(a), "true": float(b)} for p, a, b in zip(probes, mp, mt)],
            "spearman": dg.spearman(mp, mt),
            "layer_ratio": {str(k): v for k, v in dg.layer_ratios(probes, mp, mt).items()},
            "corrected": dg.corrected_correlation(probes, pred, true, num_layers),
            "reliability": d["reliability"],
        }
    out["spearman_all"] = dg.spearman(np.concatenate(pooled_p), np.concatenate(pooled_t))
    return out
