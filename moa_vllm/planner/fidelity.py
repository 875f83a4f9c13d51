"""Held-out fidelity to the dense model on natural text: top-1 agreement and KL(dense || plan) of the next-token
distributions at every position, under a plan's masks (the planner's own measure; the accuracy harness measures
the same through vLLM on other texts).

Why the planner needs it beside the held-out task loss: the task loss is dominated by a few answer tokens (mostly
retrieval), so a plan can win it while its many N/8-floor heads cost local fidelity everywhere else; the ship gate
asks a plan to beat uniform on both. The texts are windows of Python's reference docs that share no 32-token run
with any calibration sample, so no candidate was profiled on them.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from moa_vllm.plan.schema import Plan
from moa_vllm.planner.calibrate import docs_corpus
from moa_vllm.planner.masked import masks, plan_windows, use_masked_attention
from moa_vllm.planner.profile import decoder_logits

SHINGLE = 32  # a text overlapping a calibration sample in this many consecutive tokens is not held out
_MAX_DRAWS = 200


@dataclass(frozen=True)
class Fidelity:
    top1: float  # share of positions where the plan's argmax equals dense's
    kl: float  # mean over positions of KL(dense || plan), nats

    def to_json(self) -> dict[str, float]:
        return {"top1": self.top1, "kl": self.kl}


def _shingles(ids: Sequence[int]) -> set[tuple[int, ...]]:
    return {tuple(ids[i : i + SHINGLE]) for i in range(max(len(ids) - SHINGLE + 1, 0))}


def held_out_texts(tokenizer, length: int, count: int, seed: int, exclude: Sequence[Sequence[int]]) -> list[list[int]]:
    """`count` windows of exactly `length` token ids from Python's reference docs, each sharing no SHINGLE-token
    run with `exclude` (the calibration samples) or with each other. Raises when the docs are missing or too few
    windows qualify: the planner then says so rather than measure on text it profiled."""
    corpus = docs_corpus()
    chars = 6 * length  # the docs average about 4 characters per token here; 6 leaves room
    if len(corpus) < 2 * chars:
        raise ValueError("held-out fidelity needs Python's pydoc_data reference docs, which this Python lacks")
    seen: set[tuple[int, ...]] = set()
    for ids in exclude:
        seen |= _shingles(ids)
    rng, texts = random.Random(f"fidelity:{seed}:{length}"), []
    for _ in range(_MAX_DRAWS):
        if len(texts) == count:
            break
        start = rng.randrange(0, len(corpus) - chars)
        start = corpus.find("\n", start) + 1 or start
        ids = tokenizer.encode(corpus[start : start + chars], add_special_tokens=False)[:length]
        mine = _shingles(ids)
        if len(ids) == length and not (mine & seen):
            texts.append(ids)
            seen |= mine
    if len(texts) < count:
        raise ValueError(f"only {len(texts)} of {count} held-out fidelity texts of {length} tokens found")
    return texts


@torch.no_grad()
def next_token_logprobs(model, plan: Plan | None, ids: Sequence[int]) -> torch.Tensor:
    """float32 [len(ids) - 1, vocab]: log-probabilities of every next token under the plan's masks (None: dense),
    the plan's spans taken at N = len(ids)."""
    use_masked_attention(model)
    device = next(model.parameters()).device
    embeds = model.get_input_embeddings()(torch.tensor([list(ids)], device=device))
    windows = plan_windows(plan, len(ids)) if plan is not None else {}
    with masks(windows, plan.sink_tokens if plan is not None else 0):
        logits = decoder_logits(model, embeds, 0)
    return torch.log_softmax(logits.float(), dim=-1).cpu()


def compare(dense: torch.Tensor, other: torch.Tensor) -> Fidelity:
    """Top-1 agreement and mean KL(dense || other) of two [positions, vocab] log-probability tensors."""
    if dense.shape != other.shape:
        raise ValueError(f"shape mismatch: {tuple(dense.shape)} vs {tuple(other.shape)}")
    top1 = (dense.argmax(-1) == other.argmax(-1)).double().mean()
    kl = (dense.exp() * (dense - other)).sum(-1).clamp(min=0).double().mean()
    return Fidelity(float(top1), float(kl))


def plan_fidelity(model, plan: Plan | None, texts: Sequence[Sequence[int]], dense: Sequence[torch.Tensor]) -> Fidelity:
    """Fidelity of one plan to the dense log-probabilities `dense` (one per text), averaged over the texts."""
    each = [compare(ref, next_token_logprobs(model, plan, ids)) for ids, ref in zip(texts, dense)]
    return Fidelity(sum(f.top1 for f in each) / len(each), sum(f.kl for f in each) / len(each))
