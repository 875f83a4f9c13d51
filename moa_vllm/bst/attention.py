"""Sliding-window causal attention with an optional cache of the previous W keys/values, and rotary embeddings.

Every query at absolute position p attends to the keys at positions p-W+1 .. p (those >= 0). Decode and chunked
prefill pass the W keys/values before the chunk as ``past_*``; a full forward passes none. A chunk longer than the
window is processed in query blocks of W against 2W keys, so memory is O(T W), not O(T^2).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def rotary(x: Tensor, positions: Tensor, theta: float) -> Tensor:
    """Rotary position embedding (rotate-half convention) of ``x`` ``(..., T, head_dim)`` at ``positions`` ``(T,)``.

    RoPE makes scores depend on relative offsets only, which suits a sliding window: cached keys are stored already
    rotated, so the cache needs no positions and the model has no length limit.
    """
    half = x.shape[-1] // 2
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    inv_freq = theta ** (-torch.arange(half, device=x.device, dtype=dtype) / half)
    angles = positions.to(dtype)[:, None] * inv_freq[None, :]
    cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


def window_mask(query_pos: Tensor, key_pos: Tensor, window: int) -> Tensor:
    """Boolean mask ``(..., Tq, Tk)``, True where a key is visible: 0 <= key, query - window < key <= query."""
    q = query_pos[..., :, None]
    k = key_pos[..., None, :]
    return (k <= q) & (k > q - window) & (k >= 0)


def windowed_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    window: int,
    past_k: Tensor | None = None,
    past_v: Tensor | None = None,
    start: int = 0,
) -> Tensor:
    """Sliding-window causal attention for a chunk of T new tokens at absolute positions start .. start+T-1.

    ``q``, ``k``, ``v``: ``(batch, heads, T, head_dim)``. ``past_k``/``past_v``: ``(batch, heads, window, head_dim)``,
    the keys/values of positions start-W .. start-1 in order (slots for negative positions are ignored); None means
    zeros, which with ``start=0`` is a fresh sequence. Returns ``(batch, heads, T, head_dim)``.
    """
    if past_k is None or past_v is None:
        if start != 0:
            raise ValueError("a chunk that does not start the sequence needs the past keys/values")
        past_k = k.new_zeros(*k.shape[:-2], window, k.shape[-1])
        past_v = v.new_zeros(*v.shape[:-2], window, v.shape[-1])
    if past_k.shape[-2] != window:
        raise ValueError(f"past keys must hold exactly window={window} slots, got {past_k.shape[-2]}")
    keys = torch.cat([past_k, k], dim=-2)
    values = torch.cat([past_v, v], dim=-2)
    if q.shape[-2] <= window:
        return _dense(q, keys, values, window, start)
    return _blocked(q, keys, values, window, start)


def _dense(q: Tensor, keys: Tensor, values: Tensor, window: int, start: int) -> Tensor:
    """All T queries against all W+T keys; used when T <= W (decode, short chunks)."""
    T = q.shape[-2]
    device = q.device
    query_pos = start + torch.arange(T, device=device)
    key_pos = start - window + torch.arange(window + T, device=device)
    return F.scaled_dot_product_attention(q, keys, values, attn_mask=window_mask(query_pos, key_pos, window))


def _blocked(q: Tensor, keys: Tensor, values: Tensor, window: int, start: int) -> Tensor:
    """Queries in blocks of W; block b (positions start+bW ..) sees keys start+(b-1)W .. start+(b+1)W-1."""
    T = q.shape[-2]
    blocks = -(-T // window)
    pad = blocks * window - T
    # Padded queries/keys sit after every real position, so causality hides them from real queries.
    q = F.pad(q, (0, 0, 0, pad))
    keys = F.pad(keys, (0, 0, 0, pad))
    values = F.pad(values, (0, 0, 0, pad))
    qb = q.unflatten(-2, (blocks, window))  # (B, H, blocks, W, dh)
    kb = keys.unfold(-2, 2 * window, window).transpose(-1, -2)  # (B, H, blocks, 2W, dh)
    vb = values.unfold(-2, 2 * window, window).transpose(-1, -2)
    device = q.device
    block_start = start + window * torch.arange(blocks, device=device)[:, None]
    query_pos = block_start + torch.arange(window, device=device)
    key_pos = block_start - window + torch.arange(2 * window, device=device)
    out = F.scaled_dot_product_attention(qb, kb, vb, attn_mask=window_mask(query_pos, key_pos, window))
    return out.flatten(-3, -2)[..., :T, :]
