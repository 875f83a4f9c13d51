"""One markdown table over every plan result in a folder, with accuracy relative to dense on the same prompts."""

from __future__ import annotations

import json
from pathlib import Path

from benchmarks.accuracy.results import accuracy

RESULT_KIND = "moa-vllm passkey+fidelity accuracy"


def load_results(folder: Path) -> list[dict]:
    results = []
    for path in sorted(folder.glob("*.json")):
        data = json.loads(path.read_text())
        if data.get("kind") == RESULT_KIND:
            results.append(data)
    return results


def _key(record: dict) -> tuple[int, float, int]:
    return record["length"], record["depth"], record["seed"]


def relative_accuracy(records: list[dict], reference: list[dict]) -> float | None:
    """Accuracy on `records` divided by the reference's accuracy on the same prompts (None when undefined)."""
    ref = {_key(r): r for r in reference}
    shared = [r for r in records if _key(r) in ref]
    if not shared:
        return None
    ref_acc = accuracy([ref[_key(r)] for r in shared])
    return accuracy(shared) / ref_acc if ref_acc else None


def _fmt(value: float | None, digits: int = 2) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def _subset_cell(records: list[dict], reference: list[dict], uniform: str) -> str:
    out = [r for r in records if r["key_outside"].get(uniform)]
    if not out:
        return "-"
    return f"{_fmt(accuracy(out))} ({_fmt(relative_accuracy(out, reference))}x, n={len(out)})"


def plan_row(result: dict, reference: list[dict], uniform_names: list[str]) -> str:
    records = result["cases"]
    fid = result["fidelity"]["mean"]
    density = " / ".join(_fmt(v) for v in result["plan"]["density_at"].values())
    cols = [
        result["plan"]["name"],
        density,
        _fmt(accuracy(records)),
        _fmt(relative_accuracy(records, reference)),
        *(_subset_cell(records, reference, u) for u in uniform_names),
        _fmt(fid["top1_agreement"], 3),
        _fmt(fid["kl_mean"], 4),
        _fmt(fid["tail_top1_agreement"], 3),
        _fmt(fid["tail_kl_mean"], 4),
        f"{result['wall_s']['total']:.0f}",
    ]
    return "| " + " | ".join(cols) + " |"


def render(results: list[dict], reference_name: str) -> str:
    """The summary table (markdown); accuracy ratios are against the plan named reference_name."""
    by_name = {r["plan"]["name"]: r for r in results}
    reference = by_name[reference_name]["cases"] if reference_name in by_name else []
    uniform_names = sorted({u for r in results for case in r["cases"] for u in case["key_outside"]})
    lengths = sorted({case["length"] for r in results for case in r["cases"]})
    first = results[0]
    density_lengths = " / ".join(first["plan"]["density_at"])
    header = [
        "plan",
        f"density at N={density_lengths}",
        "passkey acc",
        f"x {reference_name}",
        *(f"key outside {u} window: acc (x {reference_name}, n)" for u in uniform_names),
        "top-1 agree",
        "KL",
        "top-1 agree (tail)",
        "KL (tail)",
        "wall s",
    ]
    lines = [
        "# Accuracy harness summary (CPU)",
        "",
        f"Model `{first['model']}`, vLLM {first['vllm_version']} with the moa backend "
        "(rows `stock-vllm*`: vLLM's own), float32, greedy, unquantized KV cache unless a row's name ends in "
        "its KV cache dtype (e.g. `-fp8`); "
        f"device: {first['device']}. Passkey grid: lengths {lengths}, depths {first['grid']['depths']}, "
        f"seeds per cell {first['grid']['seeds']}; prompt format `{first['settings']['prompt_format']}`. "
        f"Fidelity: {len(first['fidelity']['texts'])} texts of {first['settings']['fidelity_tokens']} tokens, "
        f"top-{first['settings']['topk']} prompt logprobs against `{reference_name}` (KL over the reference's top-k "
        f"plus a rest bucket; tail = positions >= {first['fidelity']['mean']['tail_from']}). "
        "Wall time: engine start + one generate call on a shared 2-core machine.",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
        *(plan_row(r, reference, uniform_names) for r in results),
        "",
        "Passkey accuracy by request length N:",
        "",
        "| plan | " + " | ".join(str(n) for n in lengths) + " |",
        "|" + "---|" * (len(lengths) + 1),
    ]
    for r in results:
        by_length = r["passkey"]["by_length"]
        lines.append(f"| {r['plan']['name']} | " + " | ".join(_fmt(by_length.get(str(n))) for n in lengths) + " |")
    lines += ["", "Commands (each run writes one JSON and one heatmap PNG per plan):", ""]
    commands: dict[str, list[str]] = {}
    for r in results:
        commands.setdefault(r["command"], []).append(r["plan"]["name"])
    lines += [f"- {', '.join(names)}: `{command}`" for command, names in commands.items()]
    return "\n".join(lines) + "\n"
