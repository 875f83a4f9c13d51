"""Scored prompts and their summaries: accuracy with Wilson 95% intervals per form, corpus, length and depth, and
each plan's accuracy relative to the reference plan's on the same prompts (paired bootstrap 95% interval)."""

from __future__ import annotations

import hashlib
import json
import math
from collections import defaultdict
from collections.abc import Callable, Iterable

import numpy as np

from benchmarks.prose_retrieval.needles import is_correct
from benchmarks.prose_retrieval.tasks import ProseCase
from moa_vllm.plan import Plan, visible
from moa_vllm.plan.span import served_length

Z95 = 1.959963984540054
BOOTSTRAP = 2000
SPAN_GRID = 1  # the server's with prefix caching on (vllm_plugin.settings.DEFAULT_SPAN_GRID): spans at served N


def wilson(successes: int, n: int) -> tuple[float, float]:
    """95% Wilson score interval of a proportion (sensible at 0 and n, unlike the normal one)."""
    if n == 0:
        return (0.0, 1.0)
    p, z2 = successes / n, Z95 * Z95
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = Z95 * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / (1 + z2 / n)
    return (max(0.0, centre - half), min(1.0, centre + half))


def prompt_sha(case: ProseCase) -> str:
    """What a stored answer was generated from: the prompt's ids (a result is reused only for the same prompt)."""
    return hashlib.sha256(json.dumps(case.prompt_ids).encode()).hexdigest()[:16]


def answer_key(case: ProseCase) -> tuple[str, int]:
    """What generated a stored answer: the prompt's ids and the answer budget."""
    return prompt_sha(case), case.max_tokens


def heads_seeing_facts(plan: Plan, case: ProseCase, max_model_len: int) -> float:
    """Share of (layer, KV head) whose span lets the last prompt token see a token of every fact."""
    n, cap = served_length(case.prompt_tokens, case.max_tokens, max_model_len, SPAN_GRID)
    query = case.prompt_tokens - 1
    windows = [w for layer in plan.windows(n, cap) for w in layer]
    sees = sum(
        all(any(visible(query, k, plan.sink_tokens, w) for k in range(a, b)) for a, b in case.fact_spans)
        for w in windows
    )
    return sees / len(windows)


def case_record(case: ProseCase, answer: str, plan: Plan, max_model_len: int) -> dict:
    return {
        "form": case.form,
        "corpus": case.corpus,
        "length": case.length,
        "depths": list(case.depths),
        "seed": case.seed,
        "prompt_tokens": case.prompt_tokens,
        "prompt_sha": prompt_sha(case),
        "max_tokens": case.max_tokens,
        "fact_spans": [list(s) for s in case.fact_spans],
        "expected": list(case.needle.expected),
        "answer": answer,
        "correct": is_correct(case.needle, answer),
        "heads_seeing_facts": round(heads_seeing_facts(plan, case, max_model_len), 4),
    }


def proportion(records: list[dict]) -> dict:
    k, n = sum(r["correct"] for r in records), len(records)
    low, high = wilson(k, n)
    return {"prompts": n, "correct": k, "accuracy": k / n if n else None, "ci95": [round(low, 4), round(high, 4)]}


def grouped(records: list[dict], key: Callable[[dict], object]) -> dict[str, dict]:
    groups: dict[object, list[dict]] = defaultdict(list)
    for r in records:
        groups[key(r)].append(r)
    return {str(k): proportion(v) for k, v in sorted(groups.items(), key=lambda kv: str(kv[0]))}


def summary(records: list[dict]) -> dict:
    single = [r for r in records if len(r["depths"]) == 1]
    return {
        "all": proportion(records),
        "by_form": grouped(records, lambda r: r["form"]),
        "by_corpus": grouped(records, lambda r: r["corpus"]),
        "by_length": grouped(records, lambda r: r["length"]),
        "by_depth": grouped(single, lambda r: r["depths"][0]),  # single-fact forms
        "cells": grouped(single, lambda r: f"{r['length']}@{r['depths'][0]:g}"),
    }


def _key(r: dict) -> tuple:
    return (r["form"], r["corpus"], r["length"], tuple(r["depths"]), r["seed"])


def paired_ratio(plan: list[dict], reference: list[dict], seed: int = 0) -> dict:
    """accuracy(plan) / accuracy(reference) on the same prompts, with a paired bootstrap 95% interval."""
    ref = {_key(r): r["correct"] for r in reference}
    pairs = np.array([(r["correct"], ref[_key(r)]) for r in plan if _key(r) in ref], dtype=np.float64)
    if len(pairs) == 0 or pairs[:, 1].sum() == 0:
        return {"prompts": int(len(pairs)), "ratio": None, "ci95": None}
    rng = np.random.default_rng(seed)
    draws = pairs[rng.integers(0, len(pairs), size=(BOOTSTRAP, len(pairs)))]
    num, den = draws[..., 0].sum(axis=1), draws[..., 1].sum(axis=1)
    ratios = num[den > 0] / den[den > 0]
    low, high = np.percentile(ratios, [2.5, 97.5])
    ratio = pairs[:, 0].sum() / pairs[:, 1].sum()
    return {"prompts": int(len(pairs)), "ratio": round(float(ratio), 4), "ci95": [round(low, 4), round(high, 4)]}


def ratios_by(
    plan: list[dict], reference: list[dict], groups: Iterable[tuple[str, Callable[[dict], object]]]
) -> dict[str, dict]:
    """The paired ratio over all prompts and within each value of each grouping (form, corpus, length)."""
    out = {"all": paired_ratio(plan, reference)}
    for name, key in groups:
        values = sorted({str(key(r)) for r in plan})
        out[name] = {
            v: paired_ratio([r for r in plan if str(key(r)) == v], [r for r in reference if str(key(r)) == v])
            for v in values
        }
    return out
