"""Retrieval mass: how much each KV head's attention, while the dense model writes its answer's target tokens,
rests on the hidden facts in the context (the pass key, the box number, the sentences of a natural-text fact).

Why the planner needs it beside the influence profile: a few heads copy the target from far back, and the model
has several such heads, so removing any ONE of them barely moves the loss (the first-order influence of each is
small and noisy), while removing all of them loses the answer. The retrieval mass sees each of those heads
directly. It is kept in the profile's per-offset form, R[layer, kv_head, d] = attention mass at query-key distance
d on target keys beyond the sinks.

A rule's retrieval loss does not use the calibration's distances, only each head's total mass: the calibration
shows WHICH heads retrieve, but its few targets sit at a handful of depths (0.05-0.6 of the context), while a user
may put one anywhere. So a head's mass is spread uniformly over the context, and a rule loses the share its window
misses: loss = mass x (N - sinks - window) / (N - sinks). With the calibration's own distances no sample needed the
last eighth of the context, and retrieval heads came out at 0.875 N, blind to a key at depth 0.1.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from moa_vllm.planner.calibrate import Sample
from moa_vllm.planner.profile import LayerCapture, capturing


@dataclass(frozen=True)
class TargetPositions:
    queries: list[int]  # positions whose next token is a target token of the answer
    keys: list[int]  # positions of the target's tokens in the prompt (every occurrence)


def _find(ids: list[int], pattern: list[int], start: int = 0, stop: int | None = None) -> list[int]:
    stop = len(ids) if stop is None else stop
    n = len(pattern)
    return [i for i in range(start, stop - n + 1) if ids[i : i + n] == pattern]


def target_positions(sample: Sample, tokenizer) -> TargetPositions | None:
    """Where the answer names its target and where the facts sit in the context: every occurrence of the target
    and every token of the sample's hidden facts (a two-hop answer reads a fact that does not contain it, and a head
    that reads a fact's label carries the answer as much as one that copies its value). None when the answer's
    tokens of the target cannot be matched in the prompt (then the sample carries no retrieval signal)."""
    ids = sample.prompt_ids + sample.answer_ids
    prompt = len(sample.prompt_ids)
    for expected in sample.expected:
        for text in (expected, f" {expected}"):
            pattern = tokenizer.encode(text, add_special_tokens=False)
            if not pattern:
                continue
            in_answer = _find(ids, pattern, start=prompt)
            in_prompt = _find(ids, pattern, stop=prompt)
            if in_answer and in_prompt:
                first = in_answer[0]
                facts = {k for a, b in sample.fact_spans for k in range(a, b)}
                return TargetPositions(
                    queries=[first - 1 + j for j in range(len(pattern))],
                    keys=sorted({at + j for at in in_prompt for j in range(len(pattern))} | facts),
                )
    return None


def layer_retrieval(rec: LayerCapture, target: TargetPositions, sinks: int, length: int) -> torch.Tensor:
    """[kv_heads, length]: attention mass of the target queries on target keys beyond the sinks, by distance,
    summed over each KV head's query group and averaged over the queries."""
    heads, kv_heads = rec.q.shape[0], rec.k.shape[0]
    group = heads // kv_heads
    queries = torch.tensor(target.queries, device=rec.q.device)
    keys = torch.tensor([k for k in target.keys if k >= sinks], dtype=torch.long, device=rec.q.device)
    out = torch.zeros(kv_heads, length, dtype=torch.float64)
    if keys.numel() == 0:
        return out
    positions = torch.arange(length, device=rec.q.device)
    future = positions[None, :] > queries[:, None]  # [Q, L]
    distance = queries[:, None] - keys[None, :]  # [Q, K]
    valid = distance >= 0
    for h in range(heads):
        scores = (rec.q[h, queries].float() @ rec.k[h // group, :length].float().T) * rec.scaling
        attn = scores.masked_fill(future, float("-inf")).softmax(dim=-1)  # [Q, L]
        mass = attn[:, keys].double().where(valid, 0.0)  # [Q, K]
        out[h // group].index_add_(0, distance.clamp(min=0).reshape(-1).cpu(), mass.reshape(-1).cpu())
    return out / len(target.queries)


@torch.no_grad()
def sample_retrieval(model, ids: list[int], target: TargetPositions, sinks: int) -> np.ndarray:
    """[layers, kv_heads, len(ids)] retrieval mass by distance of one sample (model uses the capture attention)."""
    device = next(model.parameters()).device
    with capturing() as capture:
        model(input_ids=torch.tensor([ids], device=device), use_cache=False)
    layers = [capture.layers.pop(i) for i in range(len(capture.layers))]
    return np.stack([layer_retrieval(rec, target, sinks, len(ids)).numpy() for rec in layers])


def head_scores(offsets: np.ndarray) -> np.ndarray:
    """[layers, kv_heads]: total retrieval mass of each head (beyond the sinks), for reports."""
    return offsets.sum(axis=-1)


def uniform_depth_loss(mass: np.ndarray, windows: np.ndarray, length: int, sinks: int) -> np.ndarray:
    """[layers, kv_heads, rules]: each head's retrieval mass times the share of the context (beyond the sinks) that
    each rule's recent window misses, i.e. the expected cut mass for a target at a uniformly random depth."""
    context = max(length - sinks, 1)
    missed = np.clip((context - np.asarray(windows, dtype=np.float64)) / context, 0.0, 1.0)
    return mass[..., None] * missed
