"""The `moa-plan diagnose` step over a planner work dir: measure (resumable), judge, plot. The arithmetic lives in
`diagnose`; this module reads and writes the work dir's artefacts through the pipeline."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from moa_vllm.plan.io import load_plan
from moa_vllm.planner import artefacts as art
from moa_vllm.planner import diagnose as dg
from moa_vllm.planner.influence import outside_window_loss
from moa_vllm.planner.masked import mean_loss, plan_loss
from moa_vllm.planner.pipeline import density_tag
from moa_vllm.planner.report import plot_diagnosis

DIAGNOSE_VERSION = 1


def run_diagnosis(
    pipe,
    probe_layers: int = 10,
    span_fractions: tuple[float, ...] = (0.125, 0.5),
    samples_per_level: int | None = None,
    densities: tuple[float, ...] = (),
    extra_plans: tuple[Path, ...] = (),
) -> Path:
    """Predicted vs true loss change of probe heads on the profiled samples, split-half reliability, and the
    held-out true loss of the Pareto / uniform / given plans; diagnose.json + diagnose.png in the work dir."""
    c, fp = pipe.config, pipe.fingerprint
    pipe.profile()
    probes = dg.probe_set(fp.num_layers, fp.num_kv_heads, probe_layers, span_fractions)
    path = pipe.path("diagnose.json")
    # The measurement depends on the samples and probes only (answer and context parts are kept apart), so a
    # work dir profiled with another loss weighting can reuse it: copy diagnose.json over.
    key = art.normalised(
        {
            "version": DIAGNOSE_VERSION,
            "calibration": pipe.calibrate()["digest"],
            "probes": [asdict(p) for p in probes],
            "samples_per_level": samples_per_level,
            "sinks": c.sinks,
        }
    )
    doc = art.read_json(path)
    if not doc or doc.get("key") != key:
        doc = {"key": key, "true": {}}
    levels = {}
    for level in c.lengths:
        data = art.load_npz(pipe.path(f"profile-L{level}.npz"))
        each = data["offsets_each"][:samples_per_level]
        samples = pipe.samples(level)[: len(each)]
        done = doc["true"].setdefault(str(level), [])
        with pipe.timings.step(f"diagnose-L{level}", samples=len(samples), resumed_from=len(done)):
            for sample in tqdm(samples[len(done) :], desc=f"diagnose {level}", disable=not c.progress):
                done.append(dg.true_changes(pipe.model, sample, probes, c.sinks, fp.num_kv_heads).tolist())
                art.write_json_atomic(path, doc)
        rule_each = outside_window_loss(torch.from_numpy(data["offsets_each"]), pipe.rule_windows(level)).numpy()
        levels[level] = {
            "predicted": dg.predicted_changes(each, probes, level, c.sinks),
            "true": dg.weighted(np.array(done).reshape(len(done), len(probes), 2), c.context_weight),
            "reliability": dg.split_half_reliability(rule_each),
        }
    summary = summarize(probes, levels, fp.num_layers)
    summary["plans"] = plan_truths(pipe, densities, extra_plans)
    doc.update(summary)
    art.write_json_atomic(path, doc)
    plot_diagnosis(pipe.path("diagnose.png"), probes, levels, summary)
    return path


def plan_truths(pipe, densities: tuple[float, ...], extra_plans: tuple[Path, ...]) -> dict[str, Any]:
    """Held-out true loss per plan: the Pareto and uniform plans of each density, and any given plan files."""
    out: dict[str, Any] = {}
    for d in densities:
        truth = pipe.true_losses(d)
        out[density_tag(d)] = {name: v["mean"] for name, v in truth["plans"].items()}
    samples = pipe.samples(pipe.config.validation_length)
    for plan_file in extra_plans:
        losses = plan_loss(pipe.model, load_plan(plan_file), samples, pipe.config.context_weight)
        out[str(plan_file)] = asdict(mean_loss(losses))
    if extra_plans:
        out["dense"] = asdict(mean_loss(plan_loss(pipe.model, None, samples, pipe.config.context_weight)))
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
