"""What a planner run leaves to read: the Pareto set as CSV, the chosen plan's spans and the front as PNGs."""

from __future__ import annotations

import csv
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; never open a window (CI, servers)
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)
import numpy as np  # noqa: E402

from moa_vllm.plan.schema import Plan  # noqa: E402
from moa_vllm.planner.optimize import ParetoSolution, PlanningProblem  # noqa: E402

CSV_NAME = "pareto.csv"
HEATMAP_NAME = "spans.png"
FRONT_NAME = "pareto_front.png"


@dataclass(frozen=True)
class ReportFiles:
    csv: Path
    heatmap: Path
    front: Path


def write_report(
    out_dir: str | Path,
    solutions: Sequence[ParetoSolution],
    chosen_index: int | None,
    problem: PlanningProblem,
    plan: Plan,
    validation: Sequence[float] | None = None,
    validation_length: int | None = None,
    span_length: int | None = None,
    uniform_loss: float | None = None,
) -> ReportFiles:
    """Write the Pareto CSV, the span heatmap of `plan` at `span_length` and the Pareto-front plot into out_dir.

    validation (one true held-out loss per solution, measured at validation_length; NaN for a plan that was not
    validated) adds a column and colours the front; uniform_loss (the uniform plan's, same samples) goes into the
    CSV and the plot title.
    span_length defaults to the largest constraint length. chosen_index None: the plan is not one of these
    solutions (a hybrid candidate won); the front is drawn without a chosen point.
    """
    if not solutions:
        raise ValueError("no solutions to report")
    if chosen_index is not None and not 0 <= chosen_index < len(solutions):
        raise ValueError(f"chosen_index {chosen_index} outside 0..{len(solutions) - 1}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if validation is not None and len(validation) != len(solutions):
        raise ValueError(f"{len(validation)} validation losses for {len(solutions)} solutions")
    files = ReportFiles(out / CSV_NAME, out / HEATMAP_NAME, out / FRONT_NAME)
    write_pareto_csv(files.csv, solutions, chosen_index, problem, validation, uniform_loss)
    plot_span_heatmap(files.heatmap, plan, span_length or max(problem.constraint_lengths))
    plot_pareto_front(files.front, solutions, chosen_index, problem, validation, validation_length, uniform_loss)
    return files


def write_pareto_csv(
    path: Path,
    solutions: Sequence[ParetoSolution],
    chosen_index: int | None,
    problem: PlanningProblem,
    validation: Sequence[float] | None,
    uniform_loss: float | None = None,
) -> None:
    """One row per Pareto plan: losses per profiled length, densities per constraint length, validation, chosen;
    then a row for the uniform plan (validation loss only) when uniform_loss is given."""
    header = [
        "index",
        "chosen",
        *(f"loss_{n}" for n in problem.lengths),
        *(f"density_{n}" for n in problem.constraint_lengths),
        "validation_loss",
        "optimal",
        "gap",
    ]
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        for i, s in enumerate(solutions):
            writer.writerow(
                [
                    i,
                    int(i == chosen_index),
                    *(repr(s.objectives[n]) for n in problem.lengths),
                    *(repr(s.densities[n]) for n in problem.constraint_lengths),
                    "" if validation is None or np.isnan(validation[i]) else repr(float(validation[i])),
                    int(s.optimal),
                    repr(float(s.gap)),
                ]
            )
        if uniform_loss is not None:
            blank = [""] * (len(problem.lengths) + len(problem.constraint_lengths))
            writer.writerow(["uniform", 0, *blank, repr(float(uniform_loss)), "", ""])


def plot_span_heatmap(path: Path, plan: Plan, length: int) -> None:
    """Layers x KV heads, coloured by the span (tokens kept) at `length`."""
    spans = np.array(plan.spans(length), dtype=np.int64)
    layers, heads = spans.shape
    fig, ax = plt.subplots(figsize=(1.6 + 0.45 * heads, 1.5 + 0.22 * layers))
    image = ax.imshow(spans, aspect="auto", cmap="viridis", vmin=0, vmax=length, interpolation="nearest")
    fig.colorbar(image, ax=ax, label=f"span (tokens) at N={length}")
    ax.set_xlabel("KV head")
    ax.set_ylabel("layer")
    ax.set_xticks(range(heads))
    ax.set_title(f"span at N={length}, density {plan.density(length):.3f}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_pareto_front(
    path: Path,
    solutions: Sequence[ParetoSolution],
    chosen_index: int | None,
    problem: PlanningProblem,
    validation: Sequence[float] | None,
    validation_length: int | None,
    uniform_loss: float | None = None,
) -> None:
    """Loss at the shortest vs the longest profiled length (one length: loss per plan), chosen plan ringed."""
    first, last = problem.lengths[0], problem.lengths[-1]
    xs = np.array([s.objectives[first] for s in solutions])
    if len(problem.lengths) > 1:
        ys, x_label, y_label = np.array([s.objectives[last] for s in solutions]), f"loss at {first}", f"loss at {last}"
    else:
        xs, ys, x_label, y_label = np.arange(len(solutions)), xs, "Pareto plan", f"loss at {first}"
    fig, ax = plt.subplots(figsize=(6, 4.5))
    if validation is None:
        ax.scatter(xs, ys, color="tab:blue", zorder=2)
    else:
        values = np.asarray(validation, dtype=np.float64)
        measured = ~np.isnan(values)
        if not measured.all():
            ax.scatter(xs[~measured], ys[~measured], color="0.7", zorder=2, label="not validated")
        points = ax.scatter(xs[measured], ys[measured], c=values[measured], cmap="plasma", zorder=2)
        at = f" at {validation_length}" if validation_length else ""
        fig.colorbar(points, ax=ax, label=f"held-out true loss{at}")
    if chosen_index is not None:
        ax.scatter(
            [xs[chosen_index]], [ys[chosen_index]], s=220, facecolors="none", edgecolors="red", zorder=3, label="chosen"
        )
    ax.set_xlabel(x_label)
    ax.set_ylabel(y_label)
    uniform = "" if uniform_loss is None else f"; uniform plan's held-out loss {uniform_loss:.4f}"
    ax.set_title(f"Pareto front ({len(solutions)} plans){uniform}", fontsize=9)
    if ax.get_legend_handles_labels()[1]:
        ax.legend(loc="best")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_diagnosis(path: Path, probes, levels: dict, summary: dict) -> None:
    """Left: predicted vs true loss change per probe (means over samples), one marker per level, coloured by layer.
    Right: true / predicted ratio per probed layer and level."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.5))
    markers = "osD^v"
    layers = np.array([p.layer for p in probes])
    for i, (level, d) in enumerate(levels.items()):
        pred = d["predicted"][: len(d["true"])].mean(0)
        true = d["true"].mean(0)
        rho = summary["levels"][str(level)]["spearman"]
        left.scatter(
            pred, true, c=layers, cmap="viridis", marker=markers[i % len(markers)], label=f"N={level} (rho {rho:.2f})"
        )
        ratio = summary["levels"][str(level)]["layer_ratio"]
        right.plot([int(k) for k in ratio], list(ratio.values()), marker=markers[i % len(markers)], label=f"N={level}")
    left.set_xscale("log")
    left.set_yscale("symlog", linthresh=1e-4)
    left.set_xlabel("predicted loss change (sum |E| outside the mask)")
    left.set_ylabel("true loss change (masked forward)")
    left.set_title(f"probe heads: Spearman over all levels {summary['spearman_all']:.2f}", fontsize=9)
    left.legend(loc="best", fontsize=8)
    left.grid(alpha=0.3)
    right.axhline(1.0, color="grey", lw=0.8)
    right.set_yscale("symlog", linthresh=1e-2)
    right.set_xlabel("layer")
    right.set_ylabel("true / predicted")
    right.set_title("per-layer ratio", fontsize=9)
    right.legend(loc="best", fontsize=8)
    right.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


RETRIEVAL_JSON = "retrieval.json"
RETRIEVAL_PNG = "retrieval.png"


def write_retrieval_report(out_dir: Path, mass: dict[int, np.ndarray], plan: Plan, length: int) -> Path:
    """Per (layer, KV head): retrieval mass at each profiled length and the plan's span fraction at `length`, as
    JSON and a scatter plot (a good plan gives its high-mass heads long spans)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    spans = np.array(plan.spans(length), dtype=np.float64) / length
    heads = [
        {
            "layer": layer,
            "kv_head": h,
            "span_fraction": float(spans[layer, h]),
            "mass": {str(n): float(m[layer, h]) for n, m in mass.items()},
        }
        for layer in range(spans.shape[0])
        for h in range(spans.shape[1])
    ]
    heads.sort(key=lambda e: -sum(e["mass"].values()))
    (out_dir / RETRIEVAL_JSON).write_text(json.dumps({"length": length, "heads": heads}, indent=1) + "\n")
    fig, ax = plt.subplots(figsize=(6, 4.5))
    for n, m in mass.items():
        ax.scatter(m.ravel(), spans.ravel(), label=f"mass at N={n}", alpha=0.7)
    ax.set_xlabel("retrieval mass (answer's target queries on the target's tokens, group sum)")
    ax.set_ylabel(f"span / N at N={length}")
    ax.set_title("retrieval mass vs span per KV head", fontsize=9)
    ax.legend(loc="best", fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out_dir / RETRIEVAL_PNG, dpi=100)
    plt.close(fig)
    return out_dir / RETRIEVAL_JSON


CANDIDATES_JSON = "candidates.json"
CANDIDATES_PNG = "candidates.png"


def write_candidates_report(
    out_dir: Path,
    losses: dict[str, float],
    fidelity: dict[str, dict[str, float]],
    chosen: str,
    density: float,
) -> Path:
    """Every candidate's held-out true loss against its held-out top-1 agreement (colour: KL), uniform's as lines:
    a candidate the gate accepts sits left of the vertical line and above the horizontal one (and is bluer than
    uniform). The trade-off between retrieval (loss) and local fidelity (top-1) at a density reads off this plot."""
    out_dir.mkdir(parents=True, exist_ok=True)
    names = sorted(losses, key=losses.get)
    rows = [{"name": n, "true_loss": losses[n], **fidelity[n]} for n in names]
    doc = {"density": density, "chosen": chosen, "uniform": fidelity["uniform"], "candidates": rows}
    (out_dir / CANDIDATES_JSON).write_text(json.dumps(doc, indent=1) + "\n")
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    kl = np.array([fidelity[n]["kl"] for n in names])
    points = ax.scatter([losses[n] for n in names], [fidelity[n]["top1"] for n in names], c=kl, cmap="viridis_r")
    fig.colorbar(points, ax=ax, label="KL(dense || plan), held-out text")
    ax.scatter([losses[chosen]], [fidelity[chosen]["top1"]], s=220, facecolors="none", edgecolors="red", label="chosen")
    if "uniform" in losses:
        ax.axvline(losses["uniform"], color="grey", linestyle="--", label="uniform")
    ax.axhline(fidelity["uniform"]["top1"], color="grey", linestyle="--")
    ax.set_xlabel("held-out true loss")
    ax.set_ylabel("held-out top-1 agreement with dense")
    ax.set_title(f"candidates at density {density}: uniform KL {fidelity['uniform']['kl']:.4f}", fontsize=9)
    ax.legend(loc="best", fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path = out_dir / CANDIDATES_PNG
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
