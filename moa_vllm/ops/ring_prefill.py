"""Prefill and chunked prefill over a ring, token-exact, in plain torch (the reference the Triton kernels follow).

A chunk's queries attend to (the ring as it was before the step) and (the chunk's own fresh K/V). Query at
position q sees key k iff k <= q and (k < sinks or q - k < window[h]).

Per KV head the ring's window is put in position order once and joined with the chunk's keys, so the keys are
the sinks plus one run of consecutive positions. Per query tile they split into segments: whole blocks every query
of the tile sees (the sinks, the middle of the band), the causal diagonal block, and the band's old edge (one
tile-wide block) that needs an explicit mask. Each segment runs through torch's fused CPU flash
attention, which returns its log-sum-exp, and the segments are merged exactly (online-softmax style). Keys stay in
the cache dtype (the kernel accumulates in float32) and are views of the ring / chunk, not copies; masked work is
limited to the partial blocks, so the cost follows the span, not the context.
"""

from __future__ import annotations

import torch

from moa_vllm.ops.ring_layout import ring_slot_of

Q_TILE = 512

Segment = tuple[torch.Tensor, torch.Tensor]  # (out [G, T, D] float32, lse [G, T] float32)


def _attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float,
    mask: torch.Tensor | None = None,
    causal: bool = False,
) -> Segment:
    """q [G, T, D] against one KV head's k/v [S, D]; mask [T, S] bool (True = visible) or a causal square."""
    g, t, d = q.shape
    s = k.shape[0]
    if q.device.type != "cpu":
        return _attend_math(q, k, v, scale, mask, causal)
    if mask is None and not causal:  # every query row sees the same keys: fold the G heads into rows
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q.reshape(1, 1, g * t, d), k.view(1, 1, s, d), v.view(1, 1, s, d), 0.0, False, scale=scale
        )
        return out.view(g, t, d).float(), lse.view(g, t)
    kk, vv = k.view(1, 1, s, d).expand(1, g, s, d), v.view(1, 1, s, d).expand(1, g, s, d)
    if causal:
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q[None], kk, vv, 0.0, True, scale=scale)
        return out[0].float(), lse[0]
    bias = torch.zeros(mask.shape, dtype=q.dtype, device=q.device).masked_fill_(~mask, float("-inf"))
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        q[None], kk, vv, 0.0, False, attn_mask=bias[None, None], scale=scale
    )
    seen = mask.any(dim=1)  # the kernel reports lse 0 for rows that see nothing; they must weigh nothing
    return out[0].float(), torch.where(seen[None], lse[0], float("-inf"))


def _attend_math(q, k, v, scale, mask, causal) -> Segment:
    """Same contract in plain float32 math, for devices without the CPU flash kernel (until the Triton kernel)."""
    scores = torch.einsum("gtd,sd->gts", q.float(), k.float()) * scale
    if causal:
        mask = torch.ones(q.shape[1], k.shape[0], dtype=torch.bool, device=q.device).tril()
    if mask is not None:
        scores = scores.masked_fill(~mask[None], float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    probs = torch.exp(scores - torch.where(torch.isfinite(lse), lse, 0.0)[..., None])
    return torch.einsum("gts,sd->gtd", probs, v.float()), lse


def _merge(parts: list[Segment]) -> torch.Tensor:
    if len(parts) == 1:
        return parts[0][0]
    lse = torch.stack([p[1] for p in parts])  # [P, G, T]
    top = lse.max(dim=0).values
    weight = torch.exp(lse - top)  # 0 for segments a row does not see
    total = sum(w[..., None] * torch.nan_to_num(o) for w, (o, _) in zip(weight, parts))
    return total / weight.sum(dim=0)[..., None]


def _ordered_keys(kf, vf, ring_k, ring_v, ring_pos, computed: int, sinks: int):
    """One KV head's keys as (sink block, band sequence, first band position): the band holds consecutive
    positions base .. computed + n - 1 (the ring's window reordered by position, then the chunk's fresh keys)."""
    if ring_k is None or ring_pos.shape[0] == 0:
        return None, kf, vf, computed
    held = ring_pos.shape[0]
    if held == computed:  # the ring never wrapped: slot = position
        return None, torch.cat([ring_k, kf]), torch.cat([ring_v, vf]), 0
    order = torch.argsort(ring_pos[sinks:]) + sinks  # wrapped: window slots sorted by position
    base = int(ring_pos[order[0]])
    sink_kv = (ring_k[:sinks], ring_v[:sinks]) if sinks else None
    return sink_kv, torch.cat([ring_k[order], kf]), torch.cat([ring_v[order], vf]), base


def _old_edge(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> Segment:
    """The band's old edge of a tile of T queries: keys j = 0..T-2 where query i sees j >= i. Reversing both the
    queries and the keys makes it a causal square, so no mask is built and the kernel skips the hidden half."""
    g, t, d = q.shape
    o, lse = _attend(q[:, : t - 1].flip(1), k.flip(0), v.flip(0), scale, causal=True)  # row r is query t-2-r
    out = torch.zeros(g, t, d, dtype=o.dtype, device=o.device)
    full_lse = torch.full((g, t), float("-inf"), dtype=lse.dtype, device=lse.device)  # the last query sees none
    out[:, : t - 1] = o.flip(1)
    full_lse[:, : t - 1] = lse.flip(1)
    return out, full_lse


def _band_segments(
    q, ks, vs, base: int, p_first: int, p_last: int, sinks: int, window: int, scale: float, out_parts: list[Segment]
) -> None:
    """Keys ks[j] at position base + j (consecutive, up to p_last) for queries p_first..p_last of one KV head.
    Positions below `sinks` inside the band are sinks; sinks below `base` are the caller's."""
    device = q.device
    a = max(base, p_first - window + 1)  # older band keys are out of every query's window
    sink_end = min(sinks, p_last + 1)  # positions below this are sinks
    if a > base and sink_end > base:
        end = min(sink_end, a)
        out_parts.append(_attend(q, ks[: end - base], vs[: end - base], scale))

    def masked(lo: int, hi: int) -> None:
        p = torch.arange(p_first, p_last + 1, device=device)[:, None]
        k = torch.arange(lo, hi, device=device)[None, :]
        mask = (k <= p) & ((k < sink_end) | (p - k < window))
        out_parts.append(_attend(q, ks[lo - base : hi - base], vs[lo - base : hi - base], scale, mask=mask))

    if window >= p_last + 1 - p_first:
        mid_lo = max(a, p_last - window + 1)
        if mid_lo > a and mid_lo - a == p_last - p_first and a >= sink_end:
            out_parts.append(_old_edge(q, ks[a - base : mid_lo - base], vs[a - base : mid_lo - base], scale))
        elif mid_lo > a:
            masked(a, mid_lo)  # the band's old edge, clipped or holding sinks: query p sees k > p - window
        if p_first > mid_lo:
            out_parts.append(_attend(q, ks[mid_lo - base : p_first - base], vs[mid_lo - base : p_first - base], scale))
        lo, hi = p_first - base, p_last + 1 - base
        out_parts.append(_attend(q, ks[lo:hi], vs[lo:hi], scale, causal=True))
    else:
        masked(a, p_last + 1)


def prefill_attention(
    query: torch.Tensor,  # [n, Hq, D] the chunk's queries, positions computed .. computed + n - 1
    key: torch.Tensor,  # [n, H, D] the chunk's fresh keys
    value: torch.Tensor,  # [n, H, D]
    ring_k: torch.Tensor | None,  # [H, S, D] the ring before the step (None when nothing was computed)
    ring_v: torch.Tensor | None,
    ring_pos: torch.Tensor | None,  # [H, S] position held by each ring slot, -1 = not this head's slot
    computed: int,
    windows: torch.Tensor,  # [H] recent-window tokens per KV head
    sinks: int,
    scale: float,
    out: torch.Tensor,  # [n, Hq, D]
    q_tile: int | None = None,
    heads: list[int] | None = None,  # KV heads to compute (default all); the others' outputs are left alone
) -> None:
    n, hq, d = query.shape
    h = key.shape[1]
    g = hq // h
    tile = q_tile or Q_TILE
    kf_all = key.transpose(0, 1)  # [H, n, D]
    vf_all = value.transpose(0, 1)
    qh = query.view(n, h, g, d)
    outh = out.view(n, h, g, d)
    window_list = windows.tolist()
    for head in range(h) if heads is None else heads:
        window = window_list[head]
        rk = rv = rp = None
        if ring_k is not None:
            held = int((ring_pos[head] >= 0).sum())  # valid slots come first: min(computed, span)
            rk, rv, rp = ring_k[head, :held], ring_v[head, :held], ring_pos[head, :held]
        kf = kf_all[head].to(rk.dtype) if rk is not None else kf_all[head]
        vf = vf_all[head].to(kf.dtype)
        sink_kv, ks, vs, base = _ordered_keys(kf.contiguous(), vf.contiguous(), rk, rv, rp, computed, sinks)
        for t0 in range(0, n, tile):
            t1 = min(n, t0 + tile)
            q = qh[t0:t1, head].permute(1, 0, 2).contiguous()  # [G, T, D]
            parts: list[Segment] = []
            if sink_kv is not None:  # sinks held apart from a wrapped ring: every query sees them
                parts.append(_attend(q, sink_kv[0], sink_kv[1], scale))
            _band_segments(q, ks, vs, base, computed + t0, computed + t1 - 1, sinks, window, scale, parts)
            outh[t0:t1, head] = _merge(parts).permute(1, 0, 2).to(out.dtype)


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
    return token, head, ring_slot_of(pos[token, 0], spans[head], sinks)
