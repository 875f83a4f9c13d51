"""The table of a benchmarks/before_after.sh run: per harness and configuration the figure on the base commit and on
the head, each as a ratio to stock vLLM measured in the same harness run (so a drift of the machine between runs
cancels; the served prefix_cache runs share one stock run, on the head side), and head / base of those ratios.

    python -m benchmarks.before_after_table OUT > OUT/README.md
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

STOCK = ("stock vLLM (CPU_ATTN)", "dense (stock vLLM)")


def _rows(side: Path, name: str) -> list[dict] | None:
    path = side / name
    return json.loads(path.read_text())["results"] if path.exists() else None


def _ratios(rows: list[dict], key: str, value: str, lower_is_better: bool) -> dict[str, tuple[float, float]]:
    """config -> (figure, figure relative to stock, > 1 = better than stock)."""
    stock = next(r[value] for r in rows if r[key] in STOCK)
    return {r[key]: (r[value], (stock / r[value]) if lower_is_better else (r[value] / stock)) for r in rows}


PARTS = (  # file, config key, figure, label, lower is better
    ("decode_speed_equal_batch.json", "config", "decode_step_s_median", "decode step at equal batch (s)", True),
    ("prefill_speed_alone.json", "config", "prefill_2048_tok_s", "prefill 2k tok/s", False),
    ("prefill_speed_alone.json", "config", "prefill_4096_tok_s", "prefill 4k tok/s", False),
    ("prefill_speed_alone.json", "config", "prefill_8000_tok_s", "prefill 8k tok/s", False),
    ("ring_cache_concurrency.json", "plan", "decode_tok_s_at_max", "decode tok/s at a 0.4 GiB budget", False),
    ("ring_cache_concurrency.json", "plan", "max_running_observed", "requests running at once (0.4 GiB)", False),
)


SERVED = (  # prefix_cache workload, figure, label, lower is better
    ("prefix", "output_throughput", "served prefix_repetition output tok/s", False),
    ("prefix", "median_ttft_ms", "served prefix_repetition TTFT p50 (ms)", True),
    ("random", "output_throughput", "served random output tok/s", False),
    ("chat", "output_throughput", "served multi-turn chat output tok/s", False),
    ("chat", "prefix_cache_hits_total_delta", "served multi-turn chat hit tokens", False),
)


def _served(side: Path, stock: Path, workload: str, value: str, lower: bool) -> dict[str, tuple[float, float]]:
    """config -> (figure, relative to stock) from prefix_cache's per-run JSON; stock runs once (head side)."""
    runs = sorted(side.glob(f"prefix_cache/runs/*/{workload}.json"))
    ref = stock / "prefix_cache" / "runs" / "stock" / f"{workload}.json"
    if not runs or not ref.exists():
        return {}
    rows = [json.loads(ref.read_text()) | {"config": STOCK[0]}, *(json.loads(p.read_text()) for p in runs if p != ref)]
    return _ratios(rows, "config", value, lower)


def _lines(label: str, base: dict, head: dict) -> list[str]:
    return [
        f"| {label} | {c} | {base[c][0]:.4g} | {base[c][1]:.2f} | {head[c][0]:.4g} | {head[c][1]:.2f} | "
        f"{head[c][1] / base[c][1]:.2f} |"
        for c in head
        if c in base
    ]


def table(out: Path) -> str:
    base_commit = (out / "base" / "commit").read_text().strip()[:7]
    head_commit = (out / "head" / "commit").read_text().strip()[:7]
    lines = [
        f"base {base_commit}, head {head_commit}; 'x stock': the figure relative to stock vLLM in the same run "
        "(> 1: better than stock); 'head / base': of those.",
        "",
        "| figure | config | base | x stock | head | x stock | head / base |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, key, value, label, lower in PARTS:
        base, head = _rows(out / "base", name), _rows(out / "head", name)
        if base is None or head is None:
            continue
        b, h = _ratios(base, key, value, lower), _ratios(head, key, value, lower)
        lines += _lines(label, b, h)
    for workload, value, label, lower in SERVED:
        b = _served(out / "base", out / "head", workload, value, lower)
        h = _served(out / "head", out / "head", workload, value, lower)
        lines += _lines(label, b, h)
    return "\n".join(lines)


if __name__ == "__main__":
    print(table(Path(sys.argv[1])))
