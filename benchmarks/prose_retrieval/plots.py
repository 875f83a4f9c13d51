"""Figures of a run: accuracy per needle form for every plan with 95% intervals, and per plan accuracy by
(length, depth) of the single-fact forms."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_forms(results: dict[str, dict], path: Path) -> None:
    plt = _pyplot()
    plans = list(results)
    forms = list(next(iter(results.values()))["summary"]["by_form"])
    width = 0.8 / len(plans)
    fig, ax = plt.subplots(figsize=(1.6 * len(forms) + 2, 3.6))
    for i, name in enumerate(plans):
        by_form = results[name]["summary"]["by_form"]
        acc = np.array([by_form[f]["accuracy"] for f in forms])
        low = acc - np.array([by_form[f]["ci95"][0] for f in forms])
        high = np.array([by_form[f]["ci95"][1] for f in forms]) - acc
        ax.bar(np.arange(len(forms)) + i * width, acc, width, yerr=[low, high], capsize=2, label=name)
    ax.set_xticks(np.arange(len(forms)) + width * (len(plans) - 1) / 2, forms)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("accuracy (95% Wilson interval)")
    ax.set_title("needle retrieval in natural prose by form (CPU, greedy)")
    ax.legend(fontsize=7, ncol=len(plans))
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_cells(results: dict[str, dict], lengths: list[int], depths: list[float], path: Path) -> None:
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(results), figsize=(2.2 * len(results) + 1, 0.6 * len(lengths) + 1.6))
    for ax, (name, result) in zip(np.atleast_1d(axes), results.items()):
        grid = np.full((len(lengths), len(depths)), np.nan)
        for i, n in enumerate(lengths):
            for j, d in enumerate(depths):
                cell = result["summary"]["cells"].get(f"{n}@{d:g}")
                grid[i, j] = np.nan if cell is None else cell["accuracy"]
        ax.imshow(grid, cmap="RdYlGn", vmin=0.0, vmax=1.0, aspect="auto")
        for i in range(len(lengths)):
            for j in range(len(depths)):
                if not np.isnan(grid[i, j]):
                    ax.text(j, i, f"{grid[i, j]:.2f}", ha="center", va="center", fontsize=7)
        ax.set_xticks(range(len(depths)), [f"{d:g}" for d in depths], fontsize=7)
        ax.set_yticks(range(len(lengths)), [str(n) for n in lengths], fontsize=7)
        ax.set_title(name, fontsize=8)
        ax.set_xlabel("depth", fontsize=7)
    fig.suptitle("single-fact accuracy by request length and needle depth (CPU)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
