"""True loss under sparse masks: a HF model forward in which chosen (layer, KV head) pairs see only their sinks and
recent window, exactly the serving rule of moa_vllm.plan.span (key k visible from query q iff k <= q and
(k < sinks or q - k < window)).

This is what the planner's first-order influence estimates; `diagnose` compares the two and `validate` ranks
Pareto plans by it. Layers without windows run plain causal attention.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import AttentionInterface, AttentionMaskInterface
from transformers.masking_utils import sdpa_mask

from moa_vllm.plan.schema import Plan
from moa_vllm.planner.calibrate import Sample
from moa_vllm.planner.profile import decoder_logits, loss_parts

MASKED_ATTENTION = "moa_planner_masked"

Windows = Mapping[int, Sequence[int]]  # layer -> recent window per KV head


@dataclass(frozen=True)
class _MaskState:
    windows: Windows
    sinks: int


_ACTIVE: list[_MaskState] = []


def band_mask(length: int, windows: torch.Tensor, sinks: int) -> torch.Tensor:
    """bool [heads, L, L]: the serving visibility rule for each head's window (windows int [heads])."""
    q = torch.arange(length, device=windows.device)[:, None]
    k = torch.arange(length, device=windows.device)[None, :]
    diff = q - k
    return (diff >= 0) & ((k < sinks) | (diff < windows[:, None, None]))


def _masked_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """Causal attention of one unpadded sequence, with per-KV-head sink + window masks where some are set."""
    group = query.shape[1] // key.shape[1]
    k_full = key.repeat_interleave(group, dim=1) if group > 1 else key
    v_full = value.repeat_interleave(group, dim=1) if group > 1 else value
    length = query.shape[2]
    state = _ACTIVE[-1] if _ACTIVE else None
    windows = state.windows.get(module.layer_idx) if state else None
    if windows is None or all(w + state.sinks >= length for w in windows):
        out = F.scaled_dot_product_attention(query, k_full, v_full, is_causal=True, scale=scaling)
    else:
        per_kv = torch.tensor(list(windows), device=query.device)
        mask = band_mask(length, per_kv.repeat_interleave(group), state.sinks)
        out = F.scaled_dot_product_attention(query, k_full, v_full, attn_mask=mask[None], scale=scaling)
    return out.transpose(1, 2).contiguous(), None


AttentionInterface.register(MASKED_ATTENTION, _masked_attention)
AttentionMaskInterface.register(MASKED_ATTENTION, sdpa_mask)


def use_masked_attention(model) -> None:
    model.set_attn_implementation(MASKED_ATTENTION)


@contextmanager
def masks(windows: Windows, sinks: int) -> Iterator[None]:
    """Within the block, forwards of a model using the masked attention apply these windows."""
    _ACTIVE.append(_MaskState(windows, sinks))
    try:
        yield
    finally:
        _ACTIVE.pop()


def plan_windows(plan: Plan, n: int) -> dict[int, list[int]]:
    """Windows of every (layer, KV head) of a plan for a request of length n."""
    return dict(enumerate(plan.windows(n)))


@dataclass(frozen=True)
class TrueLoss:
    total: float
    answer: float
    context: float


@torch.no_grad()
def sample_loss(model, sample: Sample, context_weight: float) -> TrueLoss:
    """The profiled loss of one calibration sample under whatever masks are active."""
    device = next(model.parameters()).device
    ids = torch.tensor(sample.prompt_ids + sample.answer_ids, device=device)
    embeds = model.get_input_embeddings()(ids[None])
    parts = loss_parts(decoder_logits(model, embeds, 0), ids, len(sample.prompt_ids), context_weight)
    return TrueLoss(float(parts.total), float(parts.answer), float(parts.context))


def mean_loss(losses: Sequence[TrueLoss]) -> TrueLoss:
    count = max(len(losses), 1)
    return TrueLoss(
        sum(x.total for x in losses) / count,
        sum(x.answer for x in losses) / count,
        sum(x.context for x in losses) / count,
    )


def plan_loss_windows(
    model, windows: Windows, sinks: int, samples: Sequence[Sample], context_weight: float
) -> list[TrueLoss]:
    """Per-sample true loss under explicit windows {layer: [window per KV head]} (the same for every sample)."""
    use_masked_attention(model)
    out = []
    for sample in samples:
        with masks(windows, sinks):
            out.append(sample_loss(model, sample, context_weight))
    return out


def plan_loss(model, plan: Plan | None, samples: Sequence[Sample], context_weight: float) -> list[TrueLoss]:
    """Per-sample true loss of a plan (None = dense), each sample's spans taken at its level N."""
    use_masked_attention(model)
    out = []
    for sample in samples:
        windows = plan_windows(plan, sample.level) if plan is not None else {}
        with masks(windows, plan.sink_tokens if plan is not None else 0):
            out.append(sample_loss(model, sample, context_weight))
    return out
