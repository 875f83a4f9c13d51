"""Prefill and chunked prefill over a ring, token-exact, in plain torch (the reference the Triton kernels follow).

A chunk's queries attend to (the ring as it was before the step) and (the chunk's own fresh K/V). Query at
position q sees key k iff k <= q and (k < sinks or q - k < window[h]). Keys stay in the cache dtype; the softmax
runs in torch's fused scaled-dot-product attention, which accumulates in float32 for fp16/bf16 inputs. The ring is
read once per request and each query tile takes only the keys it can see (sinks + its window), as views where they
are contiguous.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

Q_TILE = 256


def _tile_keys(s: int, computed: int, sinks: int, lo: int, t1: int) -> list[tuple[int, int]]:
    """Index ranges of [ring (s slots) | fresh chunk] that a tile ending at fresh index t1 may see."""
    if lo < computed:  # the window reaches into the ring: the whole ring and the fresh tokens so far
        return [(0, s + t1)]
    if computed >= sinks:  # sinks sit in ring slots 0..sinks-1
        first = (0, min(sinks, s))
        second = (s + lo - computed, s + t1)
    else:  # the ring holds positions 0..computed-1, all sinks; the rest of the sinks are fresh
        first = (0, s + min(sinks, computed + t1) - computed)
        second = (s + max(lo, sinks) - computed, s + t1)
    if second[0] <= first[1]:
        return [(0, s + t1)]
    return [first, second]


def prefill_attention(
    query: torch.Tensor,  # [n, Hq, D] the chunk's queries, positions computed .. computed + n - 1
    key: torch.Tensor,  # [n, H, D] the chunk's fresh keys
    value: torch.Tensor,  # [n, H, D]
    ring_k: torch.Tensor | None,  # [H, S, D] the ring before the step (None when nothing was computed)
    ring_v: torch.Tensor | None,
    ring_pos: torch.Tensor | None,  # [H, S] position held by each ring slot, -1 = empty
    computed: int,
    windows: torch.Tensor,  # [H] recent-window tokens per KV head
    sinks: int,
    scale: float,
    out: torch.Tensor,  # [n, Hq, D]
    q_tile: int = Q_TILE,
) -> None:
    n, hq, d = query.shape
    h = key.shape[1]
    g = hq // h
    device = query.device
    fresh_pos = torch.arange(computed, computed + n, device=device)
    if ring_k is None or ring_k.shape[1] == 0:
        k_all, v_all = key.transpose(0, 1), value.transpose(0, 1)
        pos_all = fresh_pos[None].expand(h, n)
        s = 0
    else:
        valid = (ring_pos >= 0)[..., None]  # stale slots may hold NaN: keep them out of 0 * x
        k_all = torch.cat([torch.where(valid, ring_k, 0), key.transpose(0, 1).to(ring_k.dtype)], dim=1)
        v_all = torch.cat([torch.where(valid, ring_v, 0), value.transpose(0, 1).to(ring_v.dtype)], dim=1)
        pos_all = torch.cat([ring_pos, fresh_pos[None].expand(h, n)], dim=1)
        s = ring_k.shape[1]
    w_max = int(windows.max())
    win = windows.to(device)[:, None, None]
    for t0 in range(0, n, q_tile):
        t1 = min(t0 + q_tile, n)
        p0 = computed + t0
        lo = max(p0 - w_max + 1, 0)
        ranges = _tile_keys(s, computed, sinks, lo, t1)
        if len(ranges) == 1:
            a, b = ranges[0]
            k, v, kp = k_all[:, a:b], v_all[:, a:b], pos_all[:, a:b]
        else:
            k = torch.cat([k_all[:, a:b] for a, b in ranges], dim=1)
            v = torch.cat([v_all[:, a:b] for a, b in ranges], dim=1)
            kp = torch.cat([pos_all[:, a:b] for a, b in ranges], dim=1)
        q_pos = fresh_pos[t0:t1]
        rel = q_pos[None, :, None] - kp[:, None, :]  # [H, tile, keys]
        mask = (kp[:, None, :] >= 0) & (rel >= 0) & ((kp[:, None, :] < sinks) | (rel < win))
        q = query[t0:t1].view(t1 - t0, h, g, d).permute(1, 2, 0, 3)  # [H, G, tile, D]
        o = F.scaled_dot_product_attention(
            q, k[:, None].expand(h, g, -1, d), v[:, None].expand(h, g, -1, d), attn_mask=mask[:, None], scale=scale
        )
        out[t0:t1] = o.permute(2, 0, 1, 3).reshape(t1 - t0, hq, d).to(out.dtype)


def survivors(
    computed: int, n: int, spans: torch.Tensor, sinks: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The chunk's tokens that stay visible to later queries: (token index, head, ring slot), no two on one slot.

    spans [H]. A token survives if it is a sink or one of the last `window` positions written so far.
    """
    device = spans.device
    pos = torch.arange(computed, computed + n, device=device)[:, None]
    window = spans - sinks
    keep = (pos < sinks) | ((window > 0) & (pos >= computed + n - window))
    token, head = keep.nonzero(as_tuple=True)
    p = pos[token, 0]
    sp = spans[head]
    slot = torch.where(p < sinks, p, sinks + torch.remainder(p - sinks, torch.clamp(sp - sinks, min=1)))
    return token, head, slot
