"""Influence formula, its reductions (block sums, per-offset sums) and the rule loss built from them."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from moa_vllm.plan.span import span_tokens, visible, window_tokens
from moa_vllm.planner.influence import (
    block_sums,
    causal_attention,
    head_influence,
    influence,
    offset_sums,
    outside_window_loss,
)


def _attention_problem(length: int = 12, dim: int = 4, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(length, dim, generator=gen, dtype=torch.float64) for _ in range(3))
    w = torch.randn(length, dim, generator=gen, dtype=torch.float64)
    return q, k, v, w


def _removed(attn: torch.Tensor, i: int, j: int) -> torch.Tensor:
    """attn with A_ij removed and row i renormalised: what E_ij linearises."""
    out = attn.clone()
    out[i, j] = 0.0
    out[i] /= out[i].sum()
    return out


def test_influence_is_the_exact_loss_change_of_removal_when_the_loss_is_linear_in_a():
    """With L linear in A (L = sum W * (A V)), the first-order E_ij is exact: it must equal L(A without j) - L(A)."""
    q, k, v, w = _attention_problem()
    attn = causal_attention(q, k, 0.5).double().requires_grad_(True)
    loss_of = lambda a: (w * (a @ v)).sum()  # noqa: E731
    loss_of(attn).backward()
    e = influence(attn.detach(), attn.grad)
    base = loss_of(attn.detach())
    for i in range(1, attn.shape[0]):  # row 0 has one key; removing it is undefined
        for j in range(i + 1):
            exact = loss_of(_removed(attn.detach(), i, j)) - base
            assert e[i, j].item() == pytest.approx(exact.item(), rel=1e-9, abs=1e-12)


def test_influence_of_a_nonlinear_loss_matches_autograd_directional_derivative():
    """For any loss, E_ij = G . (A_removed - A) with G = dL/dA from autograd (first-order change)."""
    q, k, v, w = _attention_problem(seed=1)
    attn = causal_attention(q, k, 0.3).double().requires_grad_(True)
    ((attn @ v).tanh() * w).sum().backward()
    e = influence(attn.detach(), attn.grad)
    i, j = 9, 4
    expected = (attn.grad * (_removed(attn.detach(), i, j) - attn.detach())).sum()
    assert e[i, j].item() == pytest.approx(expected.item(), rel=1e-9)


def test_head_influence_recomputes_grad_from_grad_out_and_keeps_only_the_causal_part():
    """G = dL/dO V^T: head_influence from (q, k, v, dL/dO) equals |E| from autograd's dL/dA."""
    q, k, v, w = _attention_problem(seed=2)
    attn = causal_attention(q, k, 0.5).double().requires_grad_(True)
    out = attn @ v
    out.retain_grad()
    (out.sin() * w).sum().backward()
    expected = influence(attn.detach(), attn.grad).abs().tril()
    got = head_influence(q, k, v, out.grad, 0.5)
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-7)
    assert torch.all(got.triu(1) == 0)
    assert got.tril().sum() > 0


def test_row_with_a_single_key_has_zero_influence():
    attn = torch.tensor([[1.0, 0.0], [0.3, 0.7]])
    e = influence(attn, torch.ones(2, 2))
    assert e[0, 0] == 0 and torch.isfinite(e).all()


def test_block_sums_pool_64_by_64_with_a_partial_last_block():
    m = torch.rand(150, 150, dtype=torch.float64)
    got = block_sums(m, 64)
    assert got.shape == (3, 3)
    for a in range(3):
        for b in range(3):
            assert got[a, b].item() == pytest.approx(m[a * 64 : (a + 1) * 64, b * 64 : (b + 1) * 64].sum().item())
    assert got.sum().item() == pytest.approx(m.sum().item())


@pytest.mark.parametrize("sinks", [0, 3, 20])
def test_offset_sums_are_diagonal_sums_beyond_the_sinks(sinks: int):
    length = 17
    m = torch.rand(length, length, dtype=torch.float64).tril()
    got = offset_sums(m, sinks)
    expected = [sum(m[q, q - d].item() for q in range(length) if q - d >= sinks) for d in range(length)]
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-12)


def _brute_outside(m: torch.Tensor, sinks: int, window: int) -> float:
    n = m.shape[0]
    return sum(m[q, k].item() for q in range(n) for k in range(q + 1) if not visible(q, k, sinks, window))


@pytest.mark.parametrize("alpha,beta", [(0.0, 0.25), (8.0, 0.5), (-16.0, 1.0), (0.0, 0.0)])
def test_rule_loss_is_the_influence_outside_the_sink_and_window_mask(alpha: float, beta: float):
    """Token-exact: the same mask the runtime applies (moa_vllm.plan.span.visible)."""
    length, sinks, min_span = 40, 4, 8
    m = torch.rand(length, length, dtype=torch.float64).tril()
    window = window_tokens(span_tokens(alpha, beta, length, min_span), sinks)
    got = outside_window_loss(offset_sums(m, sinks), torch.tensor([window]))
    assert got.item() == pytest.approx(_brute_outside(m, sinks, window), rel=1e-12, abs=1e-12)


def test_wider_rule_never_loses_more():
    length, sinks = 64, 4
    offsets = offset_sums(torch.rand(3, length, length).tril()[0], sinks).expand(2, length)
    windows = torch.arange(0, length + 5)
    loss = outside_window_loss(offsets, windows)
    assert torch.all(loss[..., 1:] <= loss[..., :-1] + 1e-6)
    assert loss[..., 0].sum() > 0 and torch.all(loss[..., length:] == 0)  # full window keeps everything
