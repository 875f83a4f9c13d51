"""The table of a benchmarks/before_after.sh run: per harness and configuration the figure on the base commit and on
the head, each as a ratio to stock vLLM measured in the same harness run (so a drift of the machine between runs
cancels), and head / base of those ratios.

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
        for config in [c for c in h if c in b]:
            (bv, br), (hv, hr) = b[config], h[config]
            lines.append(f"| {label} | {config} | {bv:g} | {br:.2f} | {hv:g} | {hr:.2f} | {hr / br:.2f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(table(Path(sys.argv[1])))
