"""Passkey heatmap of one plan: accuracy per (length, depth), with the share of heads that can see the key."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def cell_matrix(cells: list[dict], lengths: list[int], depths: list[float], key: str) -> np.ndarray:
    """[lengths, depths] of cells[...][key]; NaN where a cell is absent."""
    grid = np.full((len(lengths), len(depths)), np.nan)
    for cell in cells:
        grid[lengths.index(cell["length"]), depths.index(cell["depth"])] = cell[key]
    return grid


def plot_heatmap(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lengths, depths = result["grid"]["lengths"], result["grid"]["depths"]
    acc = cell_matrix(result["cells"], lengths, depths, "accuracy")
    seeing = cell_matrix(result["cells"], lengths, depths, "heads_seeing_key")
    fig, ax = plt.subplots(figsize=(1.3 * len(depths) + 2, 0.8 * len(lengths) + 1.6))
    image = ax.imshow(acc, cmap="RdYlGn", vmin=0.0, vmax=1.0, aspect="auto")
    for i in range(len(lengths)):
        for j in range(len(depths)):
            if not np.isnan(acc[i, j]):
                ax.text(j, i, f"{acc[i, j]:.2f}\nheads {seeing[i, j]:.0%}", ha="center", va="center", fontsize=8)
    ax.set_xticks(range(len(depths)), [f"{d:g}" for d in depths])
    ax.set_yticks(range(len(lengths)), [str(n) for n in lengths])
    ax.set_xlabel("needle depth (fraction of filler before the key)")
    ax.set_ylabel("request length N (tokens)")
    ax.set_title(f"passkey accuracy, {result['plan']['name']} (CPU)\nheads = share of KV heads that see the key")
    fig.colorbar(image, ax=ax, fraction=0.04)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
