"""BST layer: causality, window semantics, chunked/incremental path == full forward, constant-size state."""

from __future__ import annotations

import pytest
import torch

from moa_vllm.bst.layer import BSTLayer
from tests.bst.helpers import VARIANTS, open_gates, tiny_config

L = 40


def make_layer(variant: str, seed: int = 0) -> BSTLayer:
    torch.manual_seed(seed)
    return open_gates(BSTLayer(tiny_config(**VARIANTS[variant]))).double().eval()


def hidden(batch: int = 2, length: int = L, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, length, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("chunk", [1, 3, 8, 13, 40])
@torch.no_grad()
def test_chunked_matches_full(variant: str, chunk: int) -> None:
    layer, x = make_layer(variant), hidden()
    state = layer.initial_state(2, torch.float64)
    outs = []
    for a in range(0, L, chunk):
        y, state = layer.forward_chunk(x[:, a : a + chunk], state)
        outs.append(y)
    torch.testing.assert_close(torch.cat(outs, 1), layer(x), rtol=0, atol=1e-12)
    assert state.length == L


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("position", [0, 17, 39])
@torch.no_grad()
def test_causal(variant: str, position: int) -> None:
    layer, x = make_layer(variant), hidden()
    changed = x.clone()
    changed[:, position] += 1.0
    y, y2 = layer(x), layer(changed)
    torch.testing.assert_close(y2[:, :position], y[:, :position], rtol=0, atol=1e-12)
    assert not torch.allclose(y2[:, position], y[:, position])


@torch.no_grad()
def test_window_bounds_attention_and_ssm_reaches_beyond() -> None:
    """Without the SSM, a token W or more positions back has exactly no effect; with it, it has one."""
    x = hidden()
    changed = x.clone()
    changed[:, 0] += 1.0
    plain = make_layer("no_ssm")
    assert torch.equal(plain(x)[:, 8:], plain(changed)[:, 8:])
    assert not torch.equal(plain(x)[:, 7], plain(changed)[:, 7])
    for variant in ("sh", "mh"):
        bst = make_layer(variant)
        assert (bst(x)[:, L - 1] - bst(changed)[:, L - 1]).abs().max() > 1e-8


@pytest.mark.parametrize("variant", list(VARIANTS))
@torch.no_grad()
def test_state_shape_is_constant(variant: str) -> None:
    layer, x = make_layer(variant), hidden()
    state = layer.initial_state(2, torch.float64)
    shapes = [tuple(t.shape) for t in state.tensors()]
    for a in range(0, L, 7):
        _, state = layer.forward_chunk(x[:, a : a + 7], state)
        assert [tuple(t.shape) for t in state.tensors()] == shapes
    heads = 8 if variant != "no_ssm" else 4
    assert state.keys.shape == (2, heads, 8, 8)
    assert (state.ssm is None) == (variant == "no_ssm")


def test_multi_head_context_reads_only_its_channel_group() -> None:
    layer = make_layer("mh")
    ctx = torch.zeros(1, 3, 32, dtype=torch.float64)
    ctx[..., 8:16] = 1.0  # channel group of head 1 only
    k, v = layer.context_kv(ctx)
    assert k.shape == v.shape == (1, 3, 4, 8)
    for head in (0, 2, 3):
        assert torch.equal(k[:, :, head], torch.zeros_like(k[:, :, head]))
        assert torch.equal(v[:, :, head], torch.zeros_like(v[:, :, head]))
    assert k[:, :, 1].abs().max() > 0


def test_input_gate_scales_what_the_ssm_reads_and_closes_exactly() -> None:
    torch.manual_seed(0)
    layer = BSTLayer(tiny_config(ssm_input_gate=True)).double().eval()
    h = hidden()
    gate = torch.relu(layer.ssm_gate.proj(h))
    assert torch.allclose(layer.ssm_input(h), h * gate)
    assert 0.2 < (gate == 0).double().mean() < 0.8  # at init about half the (token, channel) gates are shut, exactly
    with torch.no_grad():
        layer.ssm_gate.proj.bias.fill_(-1e3)  # every gate shut: the SSM reads zeros, whatever the input
    assert torch.equal(layer.ssm_input(h), torch.zeros_like(h))
    plain = BSTLayer(tiny_config()).double()
    assert plain.ssm_gate is None and torch.equal(plain.ssm_input(h), h)
