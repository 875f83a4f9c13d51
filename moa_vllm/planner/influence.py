"""Attention influence of one head (MoA's first-order loss change from removing each attention value) and its
reductions: 64x64 block sums and per-offset sums, the two forms the planner keeps.

With A the causal softmax attention of a head and G = dL/dA,
    E_ij = -A_ij * (G_ij - sum_n G_in * A_in) / (1 - A_ij)
is the first-order change of the loss when A_ij is removed and row i renormalised. G needs no stored attention:
O = A V, so dL/dA = dL/dO V^T exactly (per head, with the KV head's V under GQA).
"""

from __future__ import annotations

import torch

BLOCK = 64  # MoA pools influence into 64x64 blocks


def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    """float32 at least (bf16/fp16 models), float64 kept (tests)."""
    return torch.promote_types(t.dtype, torch.float32)


def causal_attention(q: torch.Tensor, k: torch.Tensor, scaling: float) -> torch.Tensor:
    """Softmax attention [L, L] of one head from post-RoPE q, k [L, d], causal, in float32 or wider."""
    dtype = _compute_dtype(q)
    scores = (q.to(dtype) @ k.to(dtype).T) * scaling
    length = scores.shape[0]
    future = torch.ones(length, length, dtype=torch.bool, device=scores.device).triu_(1)
    return scores.masked_fill_(future, float("-inf")).softmax(dim=-1)


def influence(attn: torch.Tensor, grad_attn: torch.Tensor) -> torch.Tensor:
    """E [L, L] from A and G = dL/dA (both [L, L]). Entries with A_ij = 1 (a row with a single visible key, such as
    row 0) have no renormalisation to undo; they get 0 (the numerator is exactly 0 there too)."""
    row = (grad_attn * attn).sum(dim=-1, keepdim=True)
    denom = 1.0 - attn
    safe = denom > 1e-6
    e = -attn * (grad_attn - row) / torch.where(safe, denom, torch.ones_like(denom))
    return torch.where(safe, e, torch.zeros_like(e))


def head_influence(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, grad_out: torch.Tensor, scaling: float):
    """|E| [L, L] of one head, causal part only, from q, k, v, dL/dO (all [L, d])."""
    attn = causal_attention(q, k, scaling)
    grad_attn = grad_out.to(attn.dtype) @ v.to(attn.dtype).T
    return influence(attn, grad_attn).abs_().tril_()


def block_sums(m: torch.Tensor, block: int = BLOCK) -> torch.Tensor:
    """Sum-pool a square [L, L] matrix into [ceil(L/block)]^2 blocks (the last block row/column is partial)."""
    length = m.shape[0]
    nb = -(-length // block)
    pad = nb * block - length
    padded = torch.nn.functional.pad(m, (0, pad, 0, pad))
    return padded.view(nb, block, nb, block).sum(dim=(1, 3))


def offset_sums(m: torch.Tensor, sinks: int) -> torch.Tensor:
    """D[d] = sum_q m[q, q - d] over keys q - d >= sinks, for d in 0..L-1, of a lower-triangular [L, L] matrix.

    The loss of a window w (keys q - k < w kept, sinks kept) is then sum_{d >= w} D[d], token-exact.
    Diagonals are read with a strided view: in a row-major [L, L] matrix, element (q, q - d) sits at flat index
    q * (L + 1) - d, so after prepending L zeros, column L - d of the [L, L + 1] view with row stride L + 1 holds
    diagonal d. Entries the view reads above the diagonal are zero because m is lower-triangular.
    """
    length = m.shape[0]
    body = m.clone() if sinks <= 0 else torch.cat([m.new_zeros(length, min(sinks, length)), m[:, sinks:]], dim=1)
    flat = torch.cat([body.new_zeros(length), body.reshape(-1)])
    diagonals = flat.as_strided((length, length + 1), (length + 1, 1)).sum(dim=0)
    return diagonals.flip(0)[:length]


def outside_window_loss(offsets: torch.Tensor, windows: torch.Tensor) -> torch.Tensor:
    """Influence outside sink + window masks: for each window w, sum_{d >= w} offsets[..., d].

    offsets [..., L]; windows int [R] -> [..., R]. A window >= L keeps everything (loss 0)."""
    length = offsets.shape[-1]
    tail = offsets.flip(-1).cumsum(-1).flip(-1)  # tail[d] = sum_{d' >= d}
    tail = torch.cat([tail, tail.new_zeros(*tail.shape[:-1], 1)], dim=-1)
    return tail[..., windows.clamp(0, length)]
