"""Token-exact sink + recent-window attention over a paged KV cache, per KV head, in plain torch.

Memory stays linear in context: queries are processed in tiles and each tile gathers only the sinks plus the keys
its widest window can reach, so the largest temporary is [heads, tile, window + tile] of one layer.
"""

from __future__ import annotations

import torch

Q_TILE = 256


def plan_windows(alphas: torch.Tensor, betas: torch.Tensor, n: torch.Tensor, min_span: int, sinks: int) -> torch.Tensor:
    """Windows [layers, requests, kv_heads] for request lengths n [requests]; same math as plan.span (float64)."""
    n64 = n.to(torch.float64)[None, :, None]
    raw = torch.floor(alphas.to(torch.float64)[:, None, :] + betas.to(torch.float64)[:, None, :] * n64 + 0.5)
    span = torch.minimum(torch.clamp(raw, min=float(min_span)), n64)
    return torch.clamp(span - sinks, min=0).to(torch.int64)


def _gather_range(cache: torch.Tensor, blocks: torch.Tensor, start: int, stop: int) -> torch.Tensor:
    """Tokens [start, stop) of one request from cache [num_blocks, kv_heads, block_size, D] -> [T, kv_heads, D].

    Whole blocks are gathered (contiguous copies) and then trimmed: much cheaper than per-token indexing.
    """
    bs = cache.shape[2]
    if stop <= start:
        return cache.new_empty(0, cache.shape[1], cache.shape[3])
    first, last = start // bs, (stop - 1) // bs
    pages = cache[blocks[first : last + 1]]  # [nb, Hkv, bs, D]
    flat = pages.transpose(1, 2).reshape(-1, cache.shape[1], cache.shape[3])
    return flat[start - first * bs : stop - first * bs]


def _gather(cache: torch.Tensor, blocks: torch.Tensor, sink_stop: int, lo: int, hi: int) -> torch.Tensor:
    """Sinks [0, sink_stop) followed by the window range [lo, hi)."""
    return torch.cat([_gather_range(cache, blocks, 0, sink_stop), _gather_range(cache, blocks, lo, hi)])


def _attend_tile(
    q: torch.Tensor,  # [n, Hq, D] float32
    q_pos: torch.Tensor,  # [n]
    k: torch.Tensor,  # [T, Hkv, D] float32
    v: torch.Tensor,
    k_pos: torch.Tensor,  # [T]
    windows: torch.Tensor,  # [Hkv]
    sinks: int,
    scale: float,
) -> torch.Tensor:
    n, hq, d = q.shape
    hkv = k.shape[1]
    qg = q.view(n, hkv, hq // hkv, d)
    scores = torch.einsum("nhgd,thd->hgnt", qg, k) * scale
    rel = q_pos[:, None] - k_pos[None, :]  # [n, T]
    in_window = rel[None] < windows[:, None, None]  # [Hkv, n, T]
    keep = (rel >= 0)[None] & (in_window | (k_pos < sinks)[None, None, :])
    scores = scores.masked_fill(~keep[:, None], float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    return torch.einsum("hgnt,thd->nhgd", probs, v).reshape(n, hq, d)


def paged_sink_window_attention(
    query: torch.Tensor,  # [tokens, Hq, D]
    k_cache: torch.Tensor,  # [num_blocks, Hkv, block_size, D]
    v_cache: torch.Tensor,
    block_table: torch.Tensor,  # [requests, max_blocks]
    query_start_loc: list[int],  # requests + 1
    seq_lens: list[int],  # tokens in context per request, new ones included
    windows: torch.Tensor,  # [requests, Hkv] recent-window tokens per KV head (CPU)
    sinks: int,
    scale: float,
    out: torch.Tensor,  # [tokens, Hq, D]
    q_tile: int = Q_TILE,
) -> torch.Tensor:
    """Causal attention where query q sees key k iff k < sinks or q - k < window (per KV head).

    New tokens' K/V must already be in the cache. Rows of `out` outside the requests' query ranges are untouched.
    """
    device = query.device
    for r, seq_len in enumerate(seq_lens):
        qs, qe = query_start_loc[r], query_start_loc[r + 1]
        if qe <= qs:
            continue
        first_pos = seq_len - (qe - qs)
        w_max = int(windows[r].max())  # windows live on the CPU: no device sync per request
        win = windows[r].to(device)
        blocks = block_table[r].long()
        for t0 in range(qs, qe, q_tile):
            t1 = min(t0 + q_tile, qe)
            p0, p1 = first_pos + (t0 - qs), first_pos + (t1 - qs)
            lo = max(0, p0 - w_max + 1)
            sink_stop = min(sinks, lo)
            k_pos = torch.cat([torch.arange(sink_stop, device=device), torch.arange(lo, p1, device=device)])
            k = _gather(k_cache, blocks, sink_stop, lo, p1).float()
            v = _gather(v_cache, blocks, sink_stop, lo, p1).float()
            q_pos = torch.arange(p0, p1, device=device)
            res = _attend_tile(query[t0:t1].float(), q_pos, k, v, k_pos, win, sinks, scale)
            out[t0:t1] = res.to(out.dtype)
    return out
