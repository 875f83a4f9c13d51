"""Independent token-exact reference: sink + window attention from the full K/V history with an explicit mask.

No rings, no pages: tests compare the ring paths (stock kernels for decode, ring prefill) with this.
"""

from __future__ import annotations

import torch


def reference_attention(
    query: torch.Tensor,  # [n, Hq, D] queries at positions q_pos [n]
    q_pos: torch.Tensor,
    keys: torch.Tensor,  # [H, T, D] every position 0..T-1
    values: torch.Tensor,
    windows: torch.Tensor,  # [H]
    sinks: int,
    scale: float,
) -> torch.Tensor:
    n, hq, d = query.shape
    h, t, _ = keys.shape
    g = hq // h
    k = torch.arange(t)
    rel = q_pos[:, None] - k[None, :]
    mask = (rel >= 0)[None] & ((k[None, None, :] < sinks) | (rel[None] < windows[:, None, None]))  # [H, n, T]
    q = query.double().view(n, h, g, d)
    scores = torch.einsum("nhgd,htd->hgnt", q, keys.double()) * scale
    probs = torch.softmax(scores.masked_fill(~mask[:, None], float("-inf")), dim=-1)
    return torch.einsum("hgnt,htd->nhgd", probs, values.double()).reshape(n, hq, d)
