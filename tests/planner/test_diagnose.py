"""Diagnostic arithmetic: probes, predicted changes from per-offset sums, ratios, corrected correlation, reliability."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from moa_vllm.planner import diagnose as dg
from moa_vllm.planner.influence import outside_window_loss


def test_probe_set_spreads_layers_and_cycles_heads():
    probes = dg.probe_set(30, 3, 10, (0.125, 0.5))
    layers = sorted({p.layer for p in probes})
    assert len(probes) == 20 and layers[0] == 0 and layers[-1] == 29 and len(layers) == 10
    assert {p.kv_head for p in probes} == {0, 1, 2}


def test_predicted_change_is_the_influence_outside_the_probe_window():
    rng = np.random.default_rng(0)
    each = rng.random((3, 4, 2, 256))
    probes = [dg.Probe(1, 1, 0.25), dg.Probe(3, 0, 0.5)]
    got = dg.predicted_changes(each, probes, 256, sinks=8)
    for j, p in enumerate(probes):
        window = dg.probe_window(p, 256, 8)
        assert window == round(p.span_fraction * 256) - 8
        expected = each[:, p.layer, p.kv_head, window:].sum(-1)
        np.testing.assert_allclose(got[:, j], expected)
        np.testing.assert_allclose(
            got[:, j], outside_window_loss(torch.from_numpy(each[:, p.layer, p.kv_head]), torch.tensor([window]))[:, 0]
        )


def test_layer_ratio_and_correction_recover_a_per_layer_scale():
    """True changes that are the prediction times a per-layer factor: the ratio finds the factor, and rescaling by
    it (fitted on half the samples) makes the held-out ranking perfect."""
    rng = np.random.default_rng(1)
    probes = dg.probe_set(6, 2, 6, (0.125, 0.5))
    factor = {0: 0.1, 1: 10.0, 2: 1.0, 3: 3.0, 4: 0.3, 5: 30.0}
    predicted = rng.random((8, len(probes))) + 0.1
    true = predicted * np.array([factor[p.layer] for p in probes])
    ratios = dg.layer_ratios(probes, predicted.mean(0), true.mean(0))
    assert ratios == pytest.approx(factor)
    corrected = dg.corrected_correlation(probes, predicted, true, 6)
    assert corrected["after"] == pytest.approx(1.0) and corrected["before"] < 0.9


def test_split_half_reliability_is_high_for_consistent_samples_and_low_for_noise():
    rng = np.random.default_rng(2)
    base = rng.random((4, 3, 5))
    consistent = base[None] + 0.01 * rng.random((8, 4, 3, 5))
    noise = rng.random((8, 4, 3, 5))
    assert dg.split_half_reliability(consistent)["spearman_brown"] > 0.95
    assert dg.split_half_reliability(noise)["spearman_brown"] < 0.6
