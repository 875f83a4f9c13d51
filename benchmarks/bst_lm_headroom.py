"""What context beyond the attention window offers the LM on held-out stdlib files, and how much the BST takes.

Usage:
    python -m benchmarks.bst_lm_headroom [--bst DIR] [--baseline DIR] [--length 8192] [--out FILE]  (+ FILE.png)

Same documents and buckets as ``benchmarks.bst_lm``. For each model, its per-position probability of the target is
interpolated with two caches built only from tokens outside its attention window (moa_vllm/bst/lm_cache.py): a
unigram cache and a bigram copy cache. The NLL drop per bucket, at the best single interpolation weight (picked on
these same documents, so an optimistic bound), says how much distant context is worth here and of which kind; the
drop on top of the BST says how much of it the BST already holds. The BST-vs-baseline gap per bucket comes with a
95% paired bootstrap interval over documents (documents resampled with replacement): with 8 documents, a bucket
gap whose interval straddles zero is not a measured difference.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

import torch
from torch import Tensor

from moa_vllm.bst.lm_cache import FarCache, far_cache, interpolated_nll
from moa_vllm.bst.lm_eval import DEFAULT_EDGES, bucket_perplexity, position_nll
from moa_vllm.bst.model import BSTForCausalLM

REPO = Path(__file__).resolve().parents[1]
LAMBDAS = (0.02, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5)
RESAMPLES = 10000


def bucket_means(nll: Tensor, edges: tuple[int, ...]) -> Tensor:
    """``(docs, buckets)`` mean NLL of each document in each context bucket."""
    return torch.tensor([[b["nll"] for b in bucket_perplexity(nll[i : i + 1], edges)] for i in range(nll.shape[0])])


def cache_gains(nll: Tensor, caches: list[FarCache], edges: tuple[int, ...]) -> dict[str, dict]:
    """Per cache kind: NLL drop per bucket at every weight, and at the weight best over all positions."""
    p_model = torch.exp(-nll)
    base = bucket_means(nll, edges).mean(0)
    out = {}
    for kind in ("unigram", "copy"):
        probs = torch.stack([getattr(c, kind) for c in caches])
        available = torch.stack([getattr(c, f"has_{kind}") for c in caches])
        by_lam = {}
        for lam in LAMBDAS:
            mixed = interpolated_nll(p_model, probs, available, lam)
            by_lam[lam] = {"gain": (base - bucket_means(mixed, edges).mean(0)).tolist(), "mean": mixed.mean().item()}
        best = min(LAMBDAS, key=lambda lam: by_lam[lam]["mean"])
        out[kind] = {
            "best_lambda": best,
            "gain_at_best": by_lam[best]["gain"],
            "gain_by_lambda": {str(lam): v["gain"] for lam, v in by_lam.items()},
            "positions_with_cache": bucket_means(available.double(), edges).mean(0).tolist(),
        }
    return out


def bootstrap_gap(base: Tensor, bst: Tensor, seed: int = 0) -> dict[str, list[float]]:
    """Mean over documents of baseline minus BST bucket NLL (positive: BST better) and a 95% paired interval."""
    diff = base - bst  # (docs, buckets)
    picks = torch.randint(0, diff.shape[0], (RESAMPLES, diff.shape[0]), generator=torch.Generator().manual_seed(seed))
    means = diff[picks].mean(1)  # (resamples, buckets)
    low, high = torch.quantile(means, torch.tensor([0.025, 0.975], dtype=means.dtype), dim=0)
    return {
        "mean": diff.mean(0).tolist(),
        "low": low.tolist(),
        "high": high.tolist(),
        "documents_bst_better": (diff > 0).sum(0).tolist(),
    }


def plot(report: dict, path: Path) -> None:
    """Per bucket: the BST-baseline gap with its interval next to what each cache adds to the baseline."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    edges, gap = report["edges"], report["baseline_minus_bst_nll"]
    labels = [f"{lo}-{hi}" for lo, hi in zip(edges[:-1], edges[1:])]
    x = torch.arange(len(labels)).tolist()
    results = report["results"]
    fig, ax = plt.subplots(figsize=(8, 4))
    errors = [[m - lo for m, lo in zip(gap["mean"], gap["low"])], [hi - m for m, hi in zip(gap["mean"], gap["high"])]]
    ax.bar([i - 0.3 for i in x], gap["mean"], 0.2, yerr=errors, capsize=3, label="BST gain over baseline (95% CI)")
    bars = (("baseline", "unigram", -0.1), ("baseline", "copy", 0.1), ("bst", "copy", 0.3))
    for model, kind, offset in bars:
        gain = results[model]["cache_gain"][kind]["gain_at_best"]
        ax.bar([i + offset for i in x], gain, 0.2, label=f"{kind} cache beyond the window, added to the {model}")
    ax.axhline(0, color="black", lw=0.8)
    ax.set_xticks(x, labels)
    ax.set(xlabel="context bucket (tokens)", ylabel="NLL drop (nats)")
    ax.set_ylim(top=1.5 * ax.get_ylim()[1])  # room for the legend
    ax.set_title(f"what distant context is worth ({report['documents']} held-out files, window {report['window']})")
    ax.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bst", type=Path, default=REPO / "benchmarks" / "checkpoints" / "bst-lm")
    parser.add_argument("--baseline", type=Path, default=REPO / "benchmarks" / "checkpoints" / "bst-lm-no-ssm")
    parser.add_argument("--length", type=int, default=8192)
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "bst_lm" / "headroom.json")
    args = parser.parse_args()
    from benchmarks.bst_lm import heldout_docs  # here: importing it sets vLLM's engine variables for the process

    torch.set_num_threads(2)
    docs = heldout_docs(args.bst, args.length)
    edges = tuple(e for e in DEFAULT_EDGES if e < args.length) + (args.length,)
    window = json.loads((args.bst / "config.json").read_text())["sliding_window"]
    caches = [far_cache(ids, window) for _, ids in docs]
    nll, results = {}, {}
    for name, folder in (("bst", args.bst), ("baseline", args.baseline)):
        model = BSTForCausalLM.from_pretrained(folder, dtype=torch.float32)
        nll[name] = position_nll(model, [ids for _, ids in docs])
        metrics = json.loads((folder / "metrics.json").read_text())
        results[name] = {
            "checkpoint": str(folder),
            "steps": metrics.get("steps"),
            "seed": metrics.get("settings", {}).get("seed"),
            "training_command": metrics.get("command"),
            "bucket_nll": bucket_means(nll[name], edges).mean(0).tolist(),
            "cache_gain": cache_gains(nll[name], caches, edges),
        }
    gap = bootstrap_gap(bucket_means(nll["baseline"], edges), bucket_means(nll["bst"], edges))
    report = {
        "command": shlex.join(["python", "-m", "benchmarks.bst_lm_headroom", *sys.argv[1:]]),
        "device": "CPU, float32",
        "documents": len(docs),
        "length": args.length,
        "window": window,
        "edges": list(edges),
        "lambdas": list(LAMBDAS),
        "results": results,
        "baseline_minus_bst_nll": gap,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    plot(report, args.out.with_suffix(".png"))
    buckets = [f"({lo}, {hi}]" for lo, hi in zip(edges[:-1], edges[1:])]
    for i, bucket in enumerate(buckets):
        cells = [f"gap {gap['mean'][i]:+.3f} [{gap['low'][i]:+.3f}, {gap['high'][i]:+.3f}]"]
        for name in ("baseline", "bst"):
            unigram, copy = (results[name]["cache_gain"][kind]["gain_at_best"][i] for kind in ("unigram", "copy"))
            cells.append(f"{name}: unigram {unigram:.3f} copy {copy:.3f}")
        print(bucket, " | ".join(cells))
    print(args.out)


if __name__ == "__main__":
    main()
