"""Sliding-window attention: dense and blocked paths against a plain masked reference; rotary embeddings."""

from __future__ import annotations

import math

import pytest
import torch

from moa_vllm.bst.attention import rotary, window_mask, windowed_attention

W = 8


def reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int, start: int) -> torch.Tensor:
    """Queries at start.. against the whole key history 0..start+T-1, masked to the window."""
    T, total = q.shape[-2], k.shape[-2]
    mask = window_mask(start + torch.arange(T), torch.arange(total), window)
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    return scores.masked_fill(~mask, float("-inf")).softmax(-1) @ v


def past_window(x: torch.Tensor, start: int, window: int) -> torch.Tensor:
    """The W slots before ``start``, zero-filled where positions would be negative."""
    padded = torch.nn.functional.pad(x, (0, 0, window, 0))
    return padded[..., start : start + window, :]


@pytest.mark.parametrize("T", [1, 5, 8, 9, 23, 64])
@pytest.mark.parametrize("start", [0, 3, 20])
def test_matches_reference(T: int, start: int) -> None:
    g = torch.Generator().manual_seed(T * 100 + start)
    q, k, v = (torch.randn(2, 3, start + T, 4, dtype=torch.float64, generator=g) for _ in range(3))
    expected = reference(q[..., start:, :], k, v, W, start)
    past_k = past_window(k, start, W) if start else None
    past_v = past_window(v, start, W) if start else None
    new = slice(start, None)
    out = windowed_attention(q[..., new, :], k[..., new, :], v[..., new, :], W, past_k, past_v, start)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-13)


def test_past_is_required_after_the_start() -> None:
    x = torch.randn(1, 1, 2, 4)
    with pytest.raises(ValueError):
        windowed_attention(x, x, x, W, start=5)


def test_rotary_scores_depend_on_offset_only() -> None:
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 16, dtype=torch.float64, generator=g)

    def score(p: int, s: int) -> torch.Tensor:
        rq = rotary(q[None], torch.tensor([p]), 10000.0)
        rk = rotary(k[None], torch.tensor([s]), 10000.0)
        return (rq * rk).sum()

    torch.testing.assert_close(score(7, 3), score(1007, 1003), rtol=0, atol=1e-10)
    x = torch.randn(5, 16, dtype=torch.float64, generator=g)
    torch.testing.assert_close(rotary(x, torch.arange(5), 1e4).norm(dim=-1), x.norm(dim=-1))
