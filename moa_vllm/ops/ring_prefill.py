"""Prefill and chunked prefill over a ring, token-exact, in plain torch (the CPU path; the Triton kernel on CUDA).

A chunk's queries attend to (the ring as it was before the step) and (the chunk's own fresh K/V). Query at
position p sees key k iff k <= p and (k < sinks or p - k < window[h]).

Per KV head the ring's window is put in position order once and joined with the chunk's keys, so the keys are the
sinks plus one run of consecutive positions. The queries then split in two:
- near queries (p < sinks + window) see every key 0..p: one full block of the keys before the chunk and one causal
  square over the chunk's own;
- far queries (p >= sinks + window) see the sinks and their window, which starts after the sinks. They are cut into
  tiles of T <= window consecutive queries; relative to its tile every query sees the same pattern, so every tile's
  band is three blocks at fixed offsets in the position-ordered keys (strided views, no copy): the tile's own keys
  (a causal square), the window's old edge (T keys, of which query a sees those after a: a causal square once
  queries and keys are reversed) and, when window > T, the window - T keys between them, seen by all.
Each block kind is one call of torch's fused CPU flash attention over all tiles at once (tiles are its batch), and
returns its log-sum-exp; the blocks and the sinks are merged exactly (online-softmax style). No block is masked,
so the work is sum over queries of min(p + 1, span) keys plus at most a tile of padding per head, and a head costs
a few kernel calls whatever its length. Keys stay in the cache dtype (the kernel accumulates in float32).
"""

from __future__ import annotations

import torch

from moa_vllm.ops.ring_layout import ring_slot_of

Q_TILE = 128  # largest query tile of the far queries (benchmarks/prefill_kernels.py picks it)
SMALL_WINDOW = 128  # below this the flash kernel's per-block cost dominates: one masked GEMM per tile instead

Segment = tuple[torch.Tensor, torch.Tensor]  # (out [B, G, T, D] float32, lse [B, G, T] float32)


def _flash(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, causal: bool) -> Segment:
    """q [B, G, T, D] against one KV head's k/v [B, S, D] per batch entry; causal = top-left aligned square."""
    b, g, t, d = q.shape
    s = k.shape[1]
    if s == 0 or t == 0:  # the CPU kernel divides by these sizes
        return q.new_zeros(b, g, t, d, dtype=torch.float32), q.new_full((b, g, t), float("-inf"), dtype=torch.float32)
    if q.device.type != "cpu":
        return _flash_math(q, k, v, scale, causal)
    if not causal:  # every query row sees the same keys: fold the G heads into rows
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q.reshape(b, 1, g * t, d), k[:, None], v[:, None], 0.0, False, scale=scale
        )
        return out.view(b, g, t, d).float(), lse.view(b, g, t)
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        q, k[:, None].expand(b, g, s, d), v[:, None].expand(b, g, s, d), 0.0, True, scale=scale
    )
    return out.float(), lse


def _flash_math(q, k, v, scale: float, causal: bool) -> Segment:
    """Same contract in plain float32 math, for devices without the CPU flash kernel."""
    scores = torch.einsum("bgtd,bsd->bgts", q.float(), k.float()) * scale
    if causal:
        mask = torch.ones(q.shape[2], k.shape[1], dtype=torch.bool, device=q.device).tril()
        scores = scores.masked_fill(~mask, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    return torch.einsum("bgts,bsd->bgtd", torch.exp(scores - lse[..., None]), v.float()), lse


def _merge(parts: list[Segment]) -> torch.Tensor:
    if len(parts) == 1:
        return parts[0][0]
    lse = torch.stack([p[1] for p in parts])  # [P, ...]
    top = lse.max(dim=0).values
    weight = torch.exp(lse - top)  # 0 for segments a row does not see
    total = weight[0][..., None] * parts[0][0]
    for w, (o, _) in zip(weight[1:], parts[1:], strict=True):
        total.addcmul_(w[..., None], o)
    return total.div_(weight.sum(dim=0)[..., None])


def _ordered_keys(kf, vf, ring_k, ring_v, ring_pos, computed: int, sinks: int):
    """One KV head's keys as (sink block, band sequence, first band position): the band holds consecutive
    positions base .. computed + n - 1 (the ring's window reordered by position, then the chunk's fresh keys)."""
    if ring_k is None or ring_pos.shape[0] == 0:
        return None, kf, vf, computed
    held = ring_pos.shape[0]
    if held == computed:  # the ring never wrapped: slot = position
        return None, torch.cat([ring_k, kf]), torch.cat([ring_v, vf]), 0
    if held <= sinks:  # a ring of sinks only (window 0): the band is the chunk
        return (ring_k, ring_v), kf, vf, computed
    order = torch.argsort(ring_pos[sinks:]) + sinks  # wrapped: window slots sorted by position
    base = int(ring_pos[order[0]])
    sink_kv = (ring_k[:sinks], ring_v[:sinks]) if sinks else None
    return sink_kv, torch.cat([ring_k[order], kf]), torch.cat([ring_v[order], vf]), base


def _near(q, ks, vs, start: int, scale: float) -> torch.Tensor:
    """Queries at positions start .. start + m - 1 that see every key 0..p; ks holds positions 0 ... ."""
    m = q.shape[1]
    parts = [_flash(q[None], ks[None, start : start + m], vs[None, start : start + m], scale, causal=True)]
    if start:
        parts.append(_flash(q[None], ks[None, :start], vs[None, :start], scale, causal=False))
    return _merge(parts)[0]


def _tiles(seq: torch.Tensor, first: int, length: int, tiles: int, tile: int) -> torch.Tensor:
    """[tiles, length, D] view: tile i's block starts at index first + i * tile of seq [S, D] (contiguous)."""
    d = seq.shape[1]
    return seq.as_strided((tiles, length, d), (tile * d, d, 1), seq.storage_offset() + first * d)


def _far(q, ks, vs, sink_kv, window: int, tile: int, scale: float) -> torch.Tensor:
    """Queries [G, m, D] at positions p0 .. p0 + m - 1 (p0 >= sinks + window); ks/vs [window + m, D] hold positions
    p0 - window .. p0 + m - 1; sink_kv the sinks' K/V (or None)."""
    g, m, d = q.shape
    parts: list[Segment] = []
    if 0 < window < SMALL_WINDOW and q.device.type == "cpu":
        return _far_small(q, ks, vs, sink_kv, window, scale)
    if window > 0:
        tiles = -(-m // tile)
        pad = tiles * tile - m
        if pad:  # padded queries are dropped; padded keys come after every real query (causal blocks skip them)
            q = torch.cat([q, q.new_zeros(g, pad, d)], dim=1)
            ks, vs = torch.cat([ks, ks.new_zeros(pad, d)]), torch.cat([vs, vs.new_zeros(pad, d)])
        ks, vs = ks.contiguous(), vs.contiguous()
        qt = q.view(g, tiles, tile, d).transpose(0, 1).contiguous()  # [tiles, G, T, D]
        # Key index j holds position p0 - window + j; tile i's query a (position p0 + i*T + a) sees j in
        # (i*T + a, window + i*T + a].
        parts.append(_flash(qt, _tiles(ks, window, tile, tiles, tile), _tiles(vs, window, tile, tiles, tile),
                            scale, causal=True))  # fmt: skip
        if tile > 1:  # old edge j = i*T + b, b = 1..T-1, seen iff b > a: reversed, a causal square
            edge_q = qt[:, :, : tile - 1].flip(2)
            o, lse = _flash(edge_q, _tiles(ks, 1, tile - 1, tiles, tile).flip(1),
                            _tiles(vs, 1, tile - 1, tiles, tile).flip(1), scale, causal=True)  # fmt: skip
            edge_o = o.new_zeros(tiles, g, tile, d)
            edge_lse = lse.new_full((tiles, g, tile), float("-inf"))  # the tile's last query sees no old edge
            edge_o[:, :, : tile - 1] = o.flip(2)
            edge_lse[:, :, : tile - 1] = lse.flip(2)
            parts.append((edge_o, edge_lse))
        if window > tile:  # j = i*T + T .. i*T + window - 1, seen by every query of the tile
            mk = _tiles(ks, tile, window - tile, tiles, tile).contiguous()
            mv = _tiles(vs, tile, window - tile, tiles, tile).contiguous()
            parts.append(_flash(qt, mk, mv, scale, causal=False))
        if sink_kv is not None:
            o, lse = _flash(qt.view(1, tiles * g, tile, d), sink_kv[0][None], sink_kv[1][None], scale, causal=False)
            parts.append((o.view(tiles, g, tile, d), lse.view(tiles, g, tile)))
        return _merge(parts).transpose(0, 1).reshape(g, tiles * tile, d)[:, :m]
    if sink_kv is None:
        raise RuntimeError("moa-vllm: a ring with no window and no sinks leaves its far queries no key")
    return _flash(q[None], sink_kv[0][None], sink_kv[1][None], scale, causal=False)[0][0]


def _far_small(q, ks, vs, sink_kv, window: int, scale: float) -> torch.Tensor:
    """`_far` for small windows: tiles of T = window queries, each against [sinks, old edge, own keys] in one
    batched GEMM with one shared additive mask (the pattern is the same in every tile), softmax, GEMM."""
    g, m, d = q.shape
    tile = window
    tiles = -(-m // tile)
    pad = tiles * tile - m
    if pad:
        q = torch.cat([q, q.new_zeros(g, pad, d)], dim=1)
        ks, vs = torch.cat([ks, ks.new_zeros(pad, d)]), torch.cat([vs, vs.new_zeros(pad, d)])
    qt = q.view(g, tiles, tile, d).transpose(0, 1).reshape(tiles, g * tile, d)
    kb, vb = ks.reshape(tiles + 1, tile, d), vs.reshape(tiles + 1, tile, d)
    k_blocks, v_blocks = [kb[:-1], kb[1:]], [vb[:-1], vb[1:]]
    a, b = torch.arange(tile, device=q.device)[:, None], torch.arange(tile, device=q.device)[None, :]
    seen = [b > a, b <= a]  # old edge: key b is seen by queries before it; own keys: causal
    if sink_kv is not None:
        k_blocks.insert(0, sink_kv[0].expand(tiles, -1, -1))
        v_blocks.insert(0, sink_kv[1].expand(tiles, -1, -1))
        seen.insert(0, torch.ones(tile, sink_kv[0].shape[0], dtype=torch.bool, device=q.device))
    mask = torch.cat(seen, dim=1).repeat(g, 1)  # [G*T, L]
    bias = torch.zeros(mask.shape, dtype=qt.dtype, device=q.device).masked_fill_(~mask, float("-inf"))
    scores = torch.baddbmm(bias, qt, torch.cat(k_blocks, dim=1).transpose(1, 2), alpha=scale)
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(qt.dtype)
    o = torch.bmm(probs, torch.cat(v_blocks, dim=1))
    return o.view(tiles, g, tile, d).transpose(0, 1).reshape(g, tiles * tile, d)[:, :m]


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
) -> None:
    n, hq, d = query.shape
    h = key.shape[1]
    g = hq // h
    tile_max = q_tile or Q_TILE
    kf_all = key.transpose(0, 1)  # [H, n, D]
    vf_all = value.transpose(0, 1)
    qh = query.view(n, h, g, d)
    outh = out.view(n, h, g, d)
    window_list = windows.tolist()
    for head in range(h):
        window = max(int(window_list[head]), 0)
        rk = rv = rp = None
        if ring_k is not None:
            held = int((ring_pos[head] >= 0).sum())  # valid slots come first: min(computed, span)
            rk, rv, rp = ring_k[head, :held], ring_v[head, :held], ring_pos[head, :held]
        kf = kf_all[head].to(rk.dtype) if rk is not None else kf_all[head]
        vf = vf_all[head].to(kf.dtype)
        sink_kv, ks, vs, base = _ordered_keys(kf, vf, rk, rv, rp, computed, sinks)
        q = qh[:, head].permute(1, 0, 2)  # [G, n, D]
        near = min(n, max(0, sinks + window - computed))  # p < sinks + window: the ring has not wrapped (base 0)
        if near:
            if base != 0:
                raise RuntimeError(
                    f"moa-vllm: head {head}: queries before sinks + window but the ring starts at {base}"
                )
            near_out = _near(q[:, :near], ks, vs, computed, scale)
            outh[:near, head] = near_out.permute(1, 0, 2).to(out.dtype)
        if near < n:
            p0 = computed + near
            if sink_kv is None and sinks:
                sink_kv = (ks[:sinks], vs[:sinks])  # base 0: the band starts with the sinks
            lo = p0 - window - base
            tile = max(1, min(window, n - near, tile_max))
            far = _far(q[:, near:], ks[lo:], vs[lo:], sink_kv, window, tile, scale)
            outh[near:, head] = far.permute(1, 0, 2).to(out.dtype)


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
