"""Per-plan result records: scored passkey cases, per-cell and per-subset accuracy (plain dicts, JSON-ready)."""

from __future__ import annotations

from collections import defaultdict
from statistics import mean

from benchmarks.accuracy.tasks import PasskeyCase, heads_seeing_key, is_correct, key_outside
from moa_vllm.plan import Plan


def case_record(
    case: PasskeyCase,
    answer: str,
    plan: Plan,
    uniform: dict[str, Plan],
    answer_tokens: int,
    max_model_len: int,
) -> dict:
    """One scored prompt, with where its key sits relative to this plan and to each uniform reference plan."""
    return {
        "length": case.length,
        "depth": case.depth,
        "seed": case.seed,
        "key": case.key,
        "prompt_tokens": case.prompt_tokens,
        "key_positions": case.key_positions,
        "needle_position": round(case.needle_position, 4),
        "answer": answer,
        "correct": is_correct(case, answer),
        "heads_seeing_key": round(heads_seeing_key(plan, case, answer_tokens, max_model_len), 4),
        "key_outside": {name: key_outside(u, case, answer_tokens, max_model_len) for name, u in uniform.items()},
    }


def accuracy(records: list[dict]) -> float | None:
    return mean(r["correct"] for r in records) if records else None


def cells(records: list[dict]) -> list[dict]:
    """Accuracy and mean share of heads seeing the key per (length, depth)."""
    groups: dict[tuple[int, float], list[dict]] = defaultdict(list)
    for r in records:
        groups[(r["length"], r["depth"])].append(r)
    return [
        {
            "length": n,
            "depth": d,
            "prompts": len(rs),
            "accuracy": accuracy(rs),
            "heads_seeing_key": mean(r["heads_seeing_key"] for r in rs),
        }
        for (n, d), rs in sorted(groups.items())
    ]


def passkey_summary(records: list[dict]) -> dict:
    """Overall accuracy, by length, and on the prompts whose key lies outside each uniform plan's window."""
    by_length: dict[int, list[dict]] = defaultdict(list)
    for r in records:
        by_length[r["length"]].append(r)
    names = sorted({name for r in records for name in r["key_outside"]})
    outside = {}
    for name in names:
        out = [r for r in records if r["key_outside"][name]]
        inside = [r for r in records if not r["key_outside"][name]]
        outside[name] = {
            "prompts_outside": len(out),
            "accuracy_outside": accuracy(out),
            "prompts_inside": len(inside),
            "accuracy_inside": accuracy(inside),
        }
    return {
        "prompts": len(records),
        "accuracy": accuracy(records),
        "by_length": {str(n): accuracy(rs) for n, rs in sorted(by_length.items())},
        "by_uniform_window": outside,
    }
