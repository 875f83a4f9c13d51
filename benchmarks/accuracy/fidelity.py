"""Fidelity of a plan to dense on natural text: top-1 agreement and KL of next-token distributions.

vLLM returns top-k prompt logprobs per position (plus the logprob of the actual next token), not the full
distribution, so KL(dense || plan) is computed on a coarsened vocabulary: dense's top-k tokens plus one "rest" bucket
holding all other mass. With exact probabilities, coarsening can only lower KL (data processing inequality), so this is
a lower-bound style estimate. A dense top-k token missing from the plan's own top-k has an unknown plan probability;
it is imputed as min(plan's k-th probability, plan's mass outside its top-k / number of such tokens), which keeps the
plan's probabilities summing to at most one. With k = 20 such tokens carry little dense mass.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from moa_vllm.data import natural_prompt

LICENSE_DIR = Path("/usr/share/common-licenses")
LICENSE_TEXTS = ("GPL-3", "GFDL-1.3", "LGPL-2.1")  # long English prose present on Debian machines
_EPS = 1e-12


@dataclass(frozen=True)
class TopK:
    """Next-token predictions at every scored position of one text: [positions, k] ids and logprobs, rank order."""

    ids: np.ndarray
    logprobs: np.ndarray
    target_logprobs: np.ndarray  # [positions] logprob of the token that actually comes next

    def __post_init__(self) -> None:
        if self.ids.shape != self.logprobs.shape or self.ids.shape[0] != self.target_logprobs.shape[0]:
            raise ValueError(f"shape mismatch: ids {self.ids.shape}, logprobs {self.logprobs.shape}")


def fidelity_texts(tokenizer, n_tokens: int, count: int) -> list[tuple[str, list[int]]]:
    """`count` texts of exactly n_tokens ids: license documents when present, else the project's synthetic story."""
    texts: list[tuple[str, list[int]]] = []
    for name in LICENSE_TEXTS:
        path = LICENSE_DIR / name
        if len(texts) < count and path.is_file():
            ids = tokenizer.encode(path.read_text(), add_special_tokens=False)
            if len(ids) >= n_tokens:
                texts.append((f"{path}", ids[:n_tokens]))
    seed = 0
    while len(texts) < count:
        texts.append((f"moa_vllm.data.natural_prompt(seed={seed})", natural_prompt(tokenizer, n_tokens, seed)))
        seed += 1
    return texts


def topk_from_prompt_logprobs(prompt_logprobs: list, prompt_ids: list[int], k: int) -> TopK:
    """vLLM's per-position {token_id: Logprob(logprob, rank, ...)} (entry 0 is None) -> arrays.

    Entry i predicts prompt_ids[i] from the tokens before it; the actual token may be listed beyond the top k.
    """
    ids, lps, target = [], [], []
    for pos in range(1, len(prompt_ids)):
        entries = prompt_logprobs[pos]
        ranked = sorted((v.rank, t, v.logprob) for t, v in entries.items() if v.rank is not None and v.rank <= k)
        if len(ranked) < k:
            raise ValueError(f"position {pos}: {len(ranked)} top logprobs, expected {k}")
        ids.append([t for _, t, _ in ranked[:k]])
        lps.append([lp for _, _, lp in ranked[:k]])
        target.append(entries[prompt_ids[pos]].logprob)
    return TopK(np.array(ids, dtype=np.int64), np.array(lps, dtype=np.float64), np.array(target, dtype=np.float64))


def top1_agreement(ref: TopK, other: TopK) -> np.ndarray:
    """Per position: does the plan's most likely next token equal dense's."""
    return ref.ids[:, 0] == other.ids[:, 0]


def kl_topk(ref: TopK, other: TopK) -> np.ndarray:
    """Per position KL(ref || other) over ref's top-k tokens plus a rest bucket (see module docstring)."""
    p = np.exp(ref.logprobs)  # [P, k]
    q_own = np.exp(other.logprobs)  # [P, k] other's top-k, in other's order
    match = ref.ids[:, :, None] == other.ids[:, None, :]  # [P, k_ref, k_other]
    found = match.any(axis=2)
    q_found = (match * q_own[:, None, :]).sum(axis=2)
    n_missing = (~found).sum(axis=1, keepdims=True)
    q_outside = np.clip(1.0 - q_own.sum(axis=1, keepdims=True), 0.0, None)
    q_missing = np.minimum(q_own[:, -1:], q_outside / np.maximum(n_missing, 1))
    q = np.where(found, q_found, q_missing)
    p_rest = np.clip(1.0 - p.sum(axis=1), 0.0, None)
    q_rest = np.clip(1.0 - q.sum(axis=1), 0.0, None)
    head = (p * (np.log(np.maximum(p, _EPS)) - np.log(np.maximum(q, _EPS)))).sum(axis=1)
    rest = np.where(p_rest > 0, p_rest * (np.log(np.maximum(p_rest, _EPS)) - np.log(np.maximum(q_rest, _EPS))), 0.0)
    return head + rest


def compare(ref: TopK, other: TopK, tail_from: int) -> dict[str, float]:
    """Aggregates over all scored positions and over positions >= tail_from (where sparse windows cut most)."""
    agree = top1_agreement(ref, other)
    kl = kl_topk(ref, other)
    tail = slice(tail_from, None)
    return {
        "positions": int(agree.size),
        "top1_agreement": float(agree.mean()),
        "kl_mean": float(kl.mean()),
        "tail_from": tail_from,
        "tail_top1_agreement": float(agree[tail].mean()),
        "tail_kl_mean": float(kl[tail].mean()),
        "nll_ref": float(-ref.target_logprobs.mean()),
        "nll": float(-other.target_logprobs.mean()),
    }


def save_topks(path: Path, topks: list[TopK]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays = {}
    for i, t in enumerate(topks):
        arrays[f"ids{i}"], arrays[f"lp{i}"], arrays[f"tg{i}"] = t.ids, t.logprobs, t.target_logprobs
    np.savez_compressed(path, **arrays)


def load_topks(path: Path) -> list[TopK]:
    with np.load(path) as data:
        count = sum(1 for name in data.files if name.startswith("ids"))
        return [TopK(data[f"ids{i}"], data[f"lp{i}"], data[f"tg{i}"]) for i in range(count)]
