"""`moa-plan diagnose`: how well the first-order influence predicts the true loss change of a sparse mask.

For probe heads (one KV head in each of a few layers, each at a few spans) the real loss change is measured by a
masked forward from that layer on (earlier layers are unaffected, so their outputs are reused from the dense pass)
and compared with the planner's prediction, the summed |E| outside the mask. Reported: Spearman correlation of
predicted vs true over the probes, the true / predicted ratio per layer, split-half reliability of the per-head
losses (are there enough samples?), and a per-layer correction fitted on one half of the samples and judged on the
other (does rescaling by the measured ratio help?).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from scipy import stats

from moa_vllm.plan.span import window_tokens
from moa_vllm.planner.calibrate import Sample
from moa_vllm.planner.influence import outside_window_loss
from moa_vllm.planner.masked import masks, use_masked_attention
from moa_vllm.planner.profile import loss_parts

DEFAULT_SPAN_FRACTIONS = (0.125, 0.5)


@dataclass(frozen=True)
class Probe:
    layer: int
    kv_head: int
    span_fraction: float  # span = fraction * N (sinks included)


def probe_set(num_layers: int, num_kv_heads: int, count: int, fractions: Sequence[float]) -> list[Probe]:
    """`count` layers spread evenly from first to last; KV head cycles so every head index is probed."""
    layers = sorted({int(round(x)) for x in np.linspace(0, num_layers - 1, min(count, num_layers))})
    return [Probe(layer, i % num_kv_heads, f) for i, layer in enumerate(layers) for f in fractions]


def probe_window(probe: Probe, n: int, sinks: int) -> int:
    return window_tokens(max(int(round(probe.span_fraction * n)), 1), sinks)


def _layer_inputs(model, ids: torch.Tensor, layers: set[int]) -> tuple[dict[int, torch.Tensor], dict, torch.Tensor]:
    """Dense forward that keeps the hidden state entering each of `layers` and the keyword arguments decoder layers
    get (position embeddings, ...), plus the dense logits."""
    decoder = model.get_decoder()
    hidden: dict[int, torch.Tensor] = {}
    shared: dict = {}

    def keep(index: int):
        def hook(module, args, kwargs):
            hidden[index] = (args[0] if args else kwargs["hidden_states"]).detach()
            shared.update({k: v for k, v in kwargs.items() if k != "hidden_states"})

        return hook

    handles = [decoder.layers[i].register_forward_pre_hook(keep(i), with_kwargs=True) for i in layers]
    try:
        out = decoder(input_ids=ids[None], use_cache=False).last_hidden_state[0]
    finally:
        for h in handles:
            h.remove()
    return hidden, shared, model.get_output_embeddings()(out[:-1])


def _logits_from(model, layer: int, hidden: torch.Tensor, kwargs: dict) -> torch.Tensor:
    decoder = model.get_decoder()
    for module in decoder.layers[layer:]:
        out = module(hidden, **kwargs)
        hidden = out[0] if isinstance(out, tuple) else out
    return model.get_output_embeddings()(decoder.norm(hidden)[0, :-1])


@torch.no_grad()
def true_changes(model, sample: Sample, probes: Sequence[Probe], sinks: int, kv_heads: int) -> np.ndarray:
    """[probes, 2]: change of the (answer, context) mean CE when the probe's head is masked, on one sample (N = its
    level). Kept apart so any loss weighting can be judged from one measurement."""
    use_masked_attention(model)
    device = next(model.parameters()).device
    ids = torch.tensor(sample.prompt_ids + sample.answer_ids, device=device)
    start = len(sample.prompt_ids)
    hidden, kwargs, logits = _layer_inputs(model, ids, {p.layer for p in probes})
    dense = loss_parts(logits, ids, start, 1.0)
    out = []
    for p in probes:
        windows = [sample.level] * kv_heads  # a window as long as the sequence: every other head dense
        windows[p.kv_head] = probe_window(p, sample.level, sinks)
        with masks({p.layer: windows}, sinks):
            masked = loss_parts(_logits_from(model, p.layer, hidden[p.layer], kwargs), ids, start, 1.0)
        out.append([float(masked.answer - dense.answer), float(masked.context - dense.context)])
    return np.array(out)


def weighted(parts: np.ndarray, context_weight: float) -> np.ndarray:
    """[..., 2] (answer, context) changes -> the change of answer + context_weight * context."""
    return parts[..., 0] + context_weight * parts[..., 1]


def predicted_changes(offsets_each: np.ndarray, probes: Sequence[Probe], level: int, sinks: int) -> np.ndarray:
    """[samples, probes]: the planner's estimate, summed |E| outside the probe's mask, per profiled sample."""
    cols = []
    for p in probes:
        window = torch.tensor([probe_window(p, level, sinks)])
        per_sample = torch.from_numpy(offsets_each[:, p.layer, p.kv_head])
        cols.append(outside_window_loss(per_sample, window)[:, 0].numpy())
    return np.stack(cols, axis=1)


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    if len(a) < 3 or np.ptp(a) == 0 or np.ptp(b) == 0:
        return float("nan")
    return float(stats.spearmanr(a, b).statistic)


def layer_ratios(probes: Sequence[Probe], predicted: np.ndarray, true: np.ndarray) -> dict[int, float]:
    """Per probed layer: summed true change / summed predicted change over its probes (means over samples)."""
    out = {}
    for layer in sorted({p.layer for p in probes}):
        idx = [i for i, p in enumerate(probes) if p.layer == layer]
        pred = float(predicted[idx].sum())
        out[layer] = float(true[idx].sum()) / pred if pred > 0 else float("nan")
    return out


def interpolate_ratios(ratios: dict[int, float], num_layers: int, floor: float = 1e-3) -> np.ndarray:
    """[layers]: the measured ratios, linearly interpolated between probed layers, clipped to >= floor (a loss
    must stay positive for the MILP)."""
    known = {k: v for k, v in ratios.items() if np.isfinite(v)}
    if not known:
        return np.ones(num_layers)
    xs = np.array(sorted(known))
    ys = np.array([known[x] for x in xs])
    return np.clip(np.interp(np.arange(num_layers), xs, ys), floor, None)


def corrected_correlation(
    probes: Sequence[Probe], predicted: np.ndarray, true: np.ndarray, num_layers: int
) -> dict[str, float]:
    """Fit per-layer ratios on the even samples, judge on the odd ones: Spearman before and after rescaling.

    predicted, true: [samples, probes]."""
    if predicted.shape[0] < 2:
        return {"before": float("nan"), "after": float("nan")}
    fit_p, fit_t = predicted[0::2].mean(0), true[0::2].mean(0)
    test_p, test_t = predicted[1::2].mean(0), true[1::2].mean(0)
    scale = interpolate_ratios(layer_ratios(probes, fit_p, fit_t), num_layers)
    rescaled = test_p * np.array([scale[p.layer] for p in probes])
    return {"before": spearman(test_p, test_t), "after": spearman(rescaled, test_t)}


def split_half_reliability(rule_loss_each: np.ndarray) -> dict[str, float]:
    """rule_loss_each [samples, layers, kv_heads, rules]: how well the even samples and the odd samples agree on
    which heads lose most under each rule (Spearman across heads, averaged over rules that lose anything), and the
    Spearman-Brown estimate for the full sample count. Across heads, not across rules: a wider window always loses
    less, which would make any two halves agree."""
    samples = int(rule_loss_each.shape[0])
    if samples < 2:
        return {"samples": samples, "half_spearman": float("nan"), "spearman_brown": float("nan")}
    a = rule_loss_each[0::2].mean(0).reshape(-1, rule_loss_each.shape[-1])
    b = rule_loss_each[1::2].mean(0).reshape(-1, rule_loss_each.shape[-1])
    per_rule = [spearman(a[:, r], b[:, r]) for r in range(a.shape[1])]
    per_rule = [x for x in per_rule if np.isfinite(x)]
    r = float(np.mean(per_rule)) if per_rule else float("nan")
    return {"samples": samples, "half_spearman": r, "spearman_brown": 2 * r / (1 + r)}


def head_group_windows(
    heads: Sequence[tuple[int, int]], num_layers: int, num_kv_heads: int, n: int, window: int
) -> dict[int, list[int]]:
    """Windows of a plan that is dense except `heads` (layer, KV head), which get `window` tokens at length n."""
    windows = {layer: [n] * num_kv_heads for layer in range(num_layers)}
    for layer, h in heads:
        windows[layer][h] = window
    return windows


def group_heads(score: np.ndarray, count: int, highest: bool) -> list[tuple[int, int]]:
    """The `count` (layer, KV head) pairs of [layers, kv_heads] scores, highest or lowest first."""
    order = np.argsort(-score.ravel() if highest else score.ravel(), kind="stable")[:count]
    return [(int(i) // score.shape[1], int(i) % score.shape[1]) for i in order]
