"""Sink + window attention over per-KV-head ring buffers carved out of paged KV blocks, in plain torch.

Layout (see moa_vllm/plan/ring.py): the cache of one layer is viewed as [num_blocks, H, page_tokens, 2 * D]; each
(block, h) cell is a head page that may hold any KV head's tokens. A request's blocks form one flat list of token
slots (slot f is in page f // page_tokens, which lives in block_table[page // H], cell page % H); head h's ring is
the span[h] slots after the rings of heads 0..h-1.

One step of one layer: queries attend to what the ring held before the step plus the step's own fresh K/V, then the
fresh tokens that stay visible to future queries are written into the ring. Attention is token-exact: query q sees
key k iff k <= q and (k < sinks or q - k < window[h]). Nothing is quadratic beyond one query tile.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

Q_TILE = 256


def plan_spans(alphas: torch.Tensor, betas: torch.Tensor, n: torch.Tensor, min_span: int) -> torch.Tensor:
    """Spans [requests, heads] for rules [heads] and request lengths n [requests]; same math as plan.span."""
    n64 = n.to(torch.float64)[:, None]
    raw = torch.floor(alphas.to(torch.float64)[None, :] + betas.to(torch.float64)[None, :] * n64 + 0.5)
    return torch.minimum(torch.clamp(raw, min=float(min_span)), n64).to(torch.int64)


@dataclass
class RingBatch:
    """Where one step's requests read and write their rings in one layer. Index tensors live on the cache device."""

    query_start_loc: list[int]  # [requests + 1]
    computed: list[int]  # tokens already in each request's ring before this step
    windows: torch.Tensor  # [requests, H] recent-window tokens (CPU)
    spans: torch.Tensor  # [requests, H] ring tokens (CPU)
    lead: torch.Tensor  # [requests, H] offset of each ring's first slot inside its first page (CPU)
    read_block: torch.Tensor  # [requests, H, P] block of each page a ring touches (padding points at block 0)
    read_cell: torch.Tensor  # [requests, H, P] head cell inside that block
    read_pos: torch.Tensor  # [requests, H, P * page_tokens] position held by each gathered token, -1 if none
    write_token: torch.Tensor  # [W] token index in the step
    write_head: torch.Tensor  # [W]
    write_block: torch.Tensor  # [W]
    write_cell: torch.Tensor  # [W]
    write_offset: torch.Tensor  # [W]
    num_tokens: int


def build_ring_batch(
    spans: torch.Tensor,  # [R, H] int64, CPU
    block_table: torch.Tensor,  # [R, max_blocks] (any int dtype, any device)
    query_start_loc: list[int],
    seq_lens: list[int],
    sinks: int,
    page_tokens: int,
) -> RingBatch:
    r_count, h_count = spans.shape
    device = block_table.device
    table = block_table[:r_count].long().cpu()
    windows = torch.clamp(spans - sinks, min=0)
    first_slot = torch.cumsum(spans, dim=1) - spans  # [R, H] flat slot where each ring starts
    lead = first_slot % page_tokens
    qlens = [query_start_loc[r + 1] - query_start_loc[r] for r in range(r_count)]
    computed = [seq_lens[r] - qlens[r] for r in range(r_count)]

    # Reads: the pages each ring touches, padded to the longest; slot positions aligned with the gathered tokens.
    ring_pages = -(-(lead + spans) // page_tokens)
    p_max = int(ring_pages.max()) if r_count else 0
    page_idx = torch.arange(p_max)[None, None, :]
    valid_page = page_idx < ring_pages[:, :, None]
    abs_page = torch.where(valid_page, (first_slot // page_tokens)[:, :, None] + page_idx, 0)
    flat = torch.div(abs_page, h_count, rounding_mode="floor").view(r_count, -1)
    read_block = torch.where(valid_page, torch.gather(table, 1, flat).view(r_count, h_count, p_max), 0)
    read_cell = abs_page % h_count
    ring_slot = torch.arange(p_max * page_tokens)[None, None, :] - lead[:, :, None]
    read_pos = _ring_positions(torch.tensor(computed), spans, windows, sinks, ring_slot)

    # Writes: the step's tokens that remain visible to later queries.
    num_tokens = query_start_loc[r_count] if r_count else 0
    req = torch.repeat_interleave(torch.arange(r_count), torch.tensor(qlens, dtype=torch.int64))
    pos = torch.arange(num_tokens) - torch.tensor(query_start_loc[:r_count])[req] + torch.tensor(computed)[req]
    end = torch.tensor(seq_lens[:r_count], dtype=torch.int64)[req]  # first position after the step
    win = windows[req]  # [T, H]
    pos2 = pos[:, None].expand(-1, h_count)
    keep = (pos2 < sinks) | ((win > 0) & (pos2 >= end[:, None] - win))
    slot = torch.where(pos2 < sinks, pos2, sinks + (pos2 - sinks) % torch.clamp(win, min=1))
    token_idx, head_idx = keep.nonzero(as_tuple=True)
    w_req = req[token_idx]
    w_flat = first_slot[w_req, head_idx] + slot[token_idx, head_idx]
    w_page = w_flat // page_tokens
    write_block = table[w_req, w_page // h_count]

    def dev(t: torch.Tensor) -> torch.Tensor:
        return t.to(device, non_blocking=True)

    return RingBatch(
        query_start_loc=list(query_start_loc[: r_count + 1]),
        computed=computed,
        windows=windows,
        spans=spans,
        lead=lead,
        read_block=dev(read_block),
        read_cell=dev(read_cell),
        read_pos=dev(read_pos),
        write_token=dev(token_idx),
        write_head=dev(head_idx),
        write_block=dev(write_block),
        write_cell=dev(w_page % h_count),
        write_offset=dev(w_flat % page_tokens),
        num_tokens=num_tokens,
    )


def _ring_positions(
    computed: torch.Tensor, spans: torch.Tensor, windows: torch.Tensor, sinks: int, s: torch.Tensor
) -> torch.Tensor:
    """Position ring slot s [R, H, T] holds once `computed` tokens were written; -1 where empty or not a slot."""
    p = computed[:, None, None]
    w = windows[:, :, None]
    in_ring = (s >= 0) & (s < spans[:, :, None])
    sink_pos = torch.where((s < sinks) & (s < p), s, -1)
    k = s - sinks
    last = p - 1 - sinks - k  # >= 0 iff some position t < p maps to this window slot
    window_pos = sinks + k + torch.div(last, torch.clamp(w, min=1), rounding_mode="floor") * w
    window_pos = torch.where((s >= sinks) & (w > 0) & (last >= 0), window_pos, -1)
    return torch.where(in_ring, torch.where(s < sinks, sink_pos, window_pos), -1)


def _attend(
    q: torch.Tensor,  # [n, Hq, D] float32
    q_pos: torch.Tensor,  # [n]
    k: torch.Tensor,  # [H, T, D] float32
    v: torch.Tensor,  # [H, T, D]
    k_pos: torch.Tensor,  # [H, T], -1 = empty
    windows: torch.Tensor,  # [H]
    sinks: int,
    scale: float,
) -> torch.Tensor:
    n, hq, d = q.shape
    h = k.shape[0]
    qg = q.view(n, h, hq // h, d)
    scores = torch.einsum("nhgd,htd->hgnt", qg, k) * scale
    rel = q_pos[None, :, None] - k_pos[:, None, :]  # [H, n, T]
    keep = (k_pos[:, None, :] >= 0) & (rel >= 0) & ((k_pos[:, None, :] < sinks) | (rel < windows[:, None, None]))
    scores = scores.masked_fill(~keep[:, None], float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    return torch.einsum("hgnt,htd->nhgd", probs, v).reshape(n, hq, d)


def _read_ring(kv_cache: torch.Tensor, batch: RingBatch, r: int, d: int) -> tuple[torch.Tensor, ...]:
    """Request r's rings as float32 [H, slots, D] keys and values plus positions [H, slots]."""
    page_count = int(-(-(batch.lead[r] + batch.spans[r]).max() // kv_cache.shape[2]))
    pages = kv_cache[batch.read_block[r, :, :page_count], batch.read_cell[r, :, :page_count]]  # [H, P, bs, 2D]
    h = pages.shape[0]
    kv = pages.reshape(h, -1, pages.shape[-1]).float()
    pos = batch.read_pos[r, :, : kv.shape[1]]
    kv = kv.masked_fill((pos < 0)[:, :, None], 0.0)  # stale pages may hold anything; keep it out of 0 * x
    return kv[..., :d], kv[..., d:], pos


def _decode_rows(batch: RingBatch) -> list[int]:
    qsl = batch.query_start_loc
    return [r for r in range(len(batch.computed)) if qsl[r + 1] - qsl[r] == 1 and batch.computed[r] > 0]


def _attend_decodes(query, key, value, kv_cache, batch, rows, sinks, scale, out) -> None:
    """All single-token rows at once: gather their rings padded to the widest, one batched softmax."""
    d = key.shape[-1]
    bs = kv_cache.shape[2]
    rows_t = torch.tensor(rows, device=batch.read_block.device)
    page_count = int(-(-(batch.lead[rows] + batch.spans[rows]).max() // bs))
    pages = kv_cache[batch.read_block[rows_t, :, :page_count], batch.read_cell[rows_t, :, :page_count]]
    b, h = pages.shape[:2]
    kv = pages.reshape(b, h, -1, pages.shape[-1]).float()
    pos = batch.read_pos[rows_t, :, : kv.shape[2]]
    tok = torch.tensor([batch.query_start_loc[r] for r in rows], device=query.device)
    q_pos = torch.tensor([batch.computed[r] for r in rows], device=query.device)  # the new token's position
    # Append the fresh token as one more key per head.
    k = torch.cat([kv[..., :d].masked_fill((pos < 0)[..., None], 0.0), key[tok].float()[:, :, None]], dim=2)
    v = torch.cat([kv[..., d:].masked_fill((pos < 0)[..., None], 0.0), value[tok].float()[:, :, None]], dim=2)
    k_pos = torch.cat([pos, q_pos[:, None, None].expand(b, h, 1)], dim=2)
    win = batch.windows[rows].to(query.device)
    hq = query.shape[1]
    q = query[tok].float().view(b, h, hq // h, d)
    scores = torch.einsum("bhgd,bhtd->bhgt", q, k) * scale
    rel = q_pos[:, None, None] - k_pos
    keep = (k_pos >= 0) & (rel >= 0) & ((k_pos < sinks) | (rel < win[:, :, None]))
    probs = torch.softmax(scores.masked_fill(~keep[:, :, None], float("-inf")), dim=-1)
    out[tok] = torch.einsum("bhgt,bhtd->bhgd", probs, v).reshape(b, hq, d).to(out.dtype)


def ring_attention(
    query: torch.Tensor,  # [T, Hq, D]
    key: torch.Tensor,  # [T, H, D] this step's fresh keys
    value: torch.Tensor,  # [T, H, D]
    kv_cache: torch.Tensor,  # [num_blocks, H, page_tokens, 2D] (any strides)
    batch: RingBatch,
    sinks: int,
    scale: float,
    out: torch.Tensor,  # [T, Hq, D]
    q_tile: int = Q_TILE,
) -> torch.Tensor:
    """Attention of every query of the step, then the ring update. Rows of `out` past the batch are untouched."""
    d = key.shape[-1]
    decodes = _decode_rows(batch)
    if decodes:
        _attend_decodes(query, key, value, kv_cache, batch, decodes, sinks, scale, out)
    done = set(decodes)
    device = query.device
    for r in range(len(batch.computed)):
        qs, qe = batch.query_start_loc[r], batch.query_start_loc[r + 1]
        if qe <= qs or r in done:
            continue
        p0_req = batch.computed[r]
        win = batch.windows[r].to(device)
        w_max = int(batch.windows[r].max())
        if p0_req > 0:
            ring_k, ring_v, ring_pos = _read_ring(kv_cache, batch, r, d)
        else:
            ring_k = ring_v = key.new_zeros(len(win), 0, d, dtype=torch.float32)
            ring_pos = torch.zeros(len(win), 0, dtype=torch.int64, device=device)
        for t0 in range(qs, qe, q_tile):
            t1 = min(t0 + q_tile, qe)
            p0, p1 = p0_req + (t0 - qs), p0_req + (t1 - qs)
            lo = max(p0_req, p0 - w_max + 1)  # oldest fresh position any query of the tile can see
            sink_stop = max(min(sinks, lo) - p0_req, 0)  # fresh sink tokens before lo
            idx = torch.cat([torch.arange(qs, qs + sink_stop), torch.arange(qs + lo - p0_req, t1)]).to(device)
            fresh_pos = idx - qs + p0_req
            h = ring_k.shape[0]
            k = torch.cat([ring_k, key[idx].float().transpose(0, 1)], dim=1)
            v = torch.cat([ring_v, value[idx].float().transpose(0, 1)], dim=1)
            k_pos = torch.cat([ring_pos, fresh_pos[None].expand(h, -1)], dim=1)
            q_pos = torch.arange(p0, p1, device=device)
            out[t0:t1] = _attend(query[t0:t1].float(), q_pos, k, v, k_pos, win, sinks, scale).to(out.dtype)
    write_ring(key, value, kv_cache, batch)
    return out


def write_ring(key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor, batch: RingBatch) -> None:
    """Store the step's surviving K/V into their ring slots (no two survivors share a slot)."""
    if batch.write_token.numel() == 0:
        return
    t, h = batch.write_token, batch.write_head
    kv = torch.cat([key[t, h], value[t, h]], dim=-1).to(kv_cache.dtype)
    kv_cache[batch.write_block, batch.write_cell, batch.write_offset] = kv
