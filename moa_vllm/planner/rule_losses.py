"""The loss of every grid rule on every KV head, from the step artefacts: what the MILP minimises.

Influence loss: mean influence outside each rule's sink + window mask (token-exact, per-offset sums), optionally
rescaled per layer by a diagnosis. Retrieval loss: the retrieval mass each rule's window would miss for a target at
a uniformly random depth (retrieval.py), scaled to the influence's total so that a weight of 1 means "as much"."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

from moa_vllm.plan.span import span_tokens, window_tokens
from moa_vllm.planner import artefacts as art
from moa_vllm.planner.config import PlannerConfig
from moa_vllm.planner.influence import outside_window_loss
from moa_vllm.planner.retrieval import uniform_depth_loss

log = logging.getLogger(__name__)


def rule_windows(config: PlannerConfig, length: int) -> torch.Tensor:
    """Recent-window tokens of every grid rule at `length` (span math from moa_vllm.plan.span)."""
    c = config
    return torch.tensor(
        [window_tokens(span_tokens(r.alpha, r.beta, length, c.min_span), c.sinks) for r in c.grid.rules]
    )


def rule_loss(offsets: np.ndarray, config: PlannerConfig, level: int) -> np.ndarray:
    """loss[layer, kv_head, rule] at `level` from a profile's mean per-offset influence."""
    return outside_window_loss(torch.from_numpy(offsets), rule_windows(config, level)).numpy()


def layer_scale(layer_correction: Path | None, level: int, num_layers: int) -> np.ndarray:
    """[layers]: the correction applied to the rule losses of `level` (ones when there is none).

    From a diagnose.json: the measured true / predicted ratio per probed layer at that level, interpolated
    between probed layers (clipped positive: the MILP needs non-negative losses)."""
    from moa_vllm.planner.diagnose import interpolate_ratios

    if layer_correction is None:
        return np.ones(num_layers)
    doc = art.read_json(layer_correction)
    if not doc or str(level) not in doc.get("levels", {}):
        raise ValueError(f"{layer_correction}: no diagnosis at length {level} to correct with")
    ratios = {int(k): float(v) for k, v in doc["levels"][str(level)]["layer_ratio"].items()}
    return interpolate_ratios(ratios, num_layers)


def retrieval_loss(mass: np.ndarray, config: PlannerConfig, level: int) -> np.ndarray:
    """loss[layer, kv_head, rule] at `level`: the retrieval mass each rule's window would miss for a target at a
    uniformly random depth (see retrieval.py for why not the calibration's own depths), averaged over `level`
    and every extension length above it. The mass does not depend on N under that model, so the longer lengths
    cost nothing to score, and without them a constant rule (2048 + 0 N) looks as good as a full one."""
    lengths = [level, *(n for n in config.extension_lengths if n > level)]
    losses = [uniform_depth_loss(mass, rule_windows(config, n).numpy(), n, config.sinks) for n in lengths]
    return np.mean(losses, axis=0)


def level_loss(
    offsets: np.ndarray,
    retrieval_mass: np.ndarray | None,
    retrieval_weight: float,
    config: PlannerConfig,
    level: int,
    num_layers: int,
) -> np.ndarray:
    """Rule losses [layer, kv_head, rule] at one profiled length: influence (optionally corrected per layer)
    plus retrieval_weight x the retrieval loss scaled so that both have the same total over all heads at
    window 0 (all context beyond the sinks cut)."""
    influence = (
        rule_loss(offsets, config, level) * layer_scale(config.layer_correction, level, num_layers)[:, None, None]
    )
    if retrieval_weight == 0:
        return influence
    if retrieval_mass is None:
        raise ValueError(f"retrieval weight {retrieval_weight} needs the retrieval profile at length {level}")
    mass = float(retrieval_mass.sum())
    if mass <= 0:
        log.warning("retrieval: no retrieval mass at length %d (no sample with a matched target)", level)
        return influence
    scale = float(offsets.sum()) / mass
    return influence + retrieval_weight * scale * retrieval_loss(retrieval_mass, config, level)
