"""The paged, tiled torch kernel equals a naive dense masked attention on random data."""

from __future__ import annotations

import pytest
import torch

from moa_vllm.ops import paged_sink_window_attention, plan_windows
from moa_vllm.plan import Rule
from moa_vllm.plan.span import span_tokens, window_tokens

HQ, HKV, D, BS = 6, 2, 16, 8


def naive(q, k, v, first_pos, windows, sinks, scale):
    """q [n, Hq, D], k/v [L, Hkv, D] for one request; dense mask."""
    n, L = q.shape[0], k.shape[0]
    g = HQ // HKV
    qp = torch.arange(first_pos, first_pos + n)[:, None]
    kp = torch.arange(L)[None]
    mask = (kp <= qp) & ((kp < sinks) | (qp - kp < windows[:, None, None]))  # [Hkv, n, L]
    mask = mask.repeat_interleave(g, 0)
    s = torch.einsum("nhd,lhd->hnl", q, k.repeat_interleave(g, 1)) * scale
    p = s.masked_fill(~mask, float("-inf")).softmax(-1)
    return torch.einsum("hnl,lhd->nhd", p, v.repeat_interleave(g, 1))


def paged_case(seq_lens, query_lens, dtype, seed):
    """Scatter each request's K/V into shuffled blocks of one cache; return everything both sides need."""
    gen = torch.Generator().manual_seed(seed)
    max_blocks = max((s + BS - 1) // BS for s in seq_lens)
    num_blocks = len(seq_lens) * max_blocks + 1
    cache_k = torch.zeros(num_blocks, HKV, BS, D, dtype=dtype)
    cache_v = torch.zeros_like(cache_k)
    perm = torch.randperm(num_blocks - 1, generator=gen) + 1  # block 0 stays the null block
    table = perm.view(len(seq_lens), max_blocks)
    ks, vs = [], []
    for r, s in enumerate(seq_lens):
        k = torch.randn(s, HKV, D, generator=gen).to(dtype)
        v = torch.randn(s, HKV, D, generator=gen).to(dtype)
        pos = torch.arange(s)
        cache_k[table[r, pos // BS], :, pos % BS] = k
        cache_v[table[r, pos // BS], :, pos % BS] = v
        ks.append(k)
        vs.append(v)
    q = torch.randn(sum(query_lens), HQ, D, generator=gen).to(dtype)
    qsl = [0]
    for n in query_lens:
        qsl.append(qsl[-1] + n)
    return cache_k, cache_v, table, q, qsl, ks, vs


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("q_tile", [5, 256])
def test_matches_naive_mixed_batch(dtype, q_tile):
    seq_lens = [70, 1, 53, 90]  # prefill, tiny, chunk in the middle, decode
    query_lens = [70, 1, 20, 1]
    sinks = 4
    windows = torch.tensor([[9, 30], [1, 1], [1, 60], [17, 5]])
    ck, cv, table, q, qsl, ks, vs = paged_case(seq_lens, query_lens, dtype, seed=0)
    out = torch.full_like(q, float("nan"))
    paged_sink_window_attention(q, ck, cv, table, qsl, seq_lens, windows, sinks, 0.25, out, q_tile=q_tile)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    for r, s in enumerate(seq_lens):
        n = query_lens[r]
        ref = naive(q[qsl[r] : qsl[r + 1]].float(), ks[r].float(), vs[r].float(), s - n, windows[r], sinks, 0.25)
        torch.testing.assert_close(out[qsl[r] : qsl[r + 1]].float(), ref, atol=tol, rtol=tol)


def test_null_blocks_behind_window_are_never_read():
    """Blocks wholly behind sinks + window may be freed (null block 0 full of garbage): output must not change."""
    seq_lens, query_lens, sinks = [96], [1], 8
    windows = torch.tensor([[20, 12]])
    ck, cv, table, q, qsl, _, _ = paged_case(seq_lens, query_lens, torch.float32, seed=1)
    out1 = torch.zeros_like(q)
    paged_sink_window_attention(q, ck, cv, table, qsl, seq_lens, windows, sinks, 0.25, out1)
    table2 = table.clone()
    table2[0, 1:9] = 0  # tokens 8..71 are behind every window here (96 - 20 = 76 > 72)
    ck[0], cv[0] = 1e4, 1e4
    out2 = torch.zeros_like(q)
    paged_sink_window_attention(q, ck, cv, table2, qsl, seq_lens, windows, sinks, 0.25, out2)
    torch.testing.assert_close(out1, out2)


def test_plan_windows_matches_scalar_span_math():
    rules = [
        [Rule(alpha=-100.5, beta=0.37), Rule(alpha=64, beta=0.0)],
        [Rule(alpha=0, beta=1.0), Rule(alpha=7, beta=0.5)],
    ]
    alphas = torch.tensor([[r.alpha for r in row] for row in rules])
    betas = torch.tensor([[r.beta for r in row] for row in rules])
    n = torch.tensor([1, 50, 129, 1001, 8192])
    got = plan_windows(alphas, betas, n, min_span=32, sinks=16)
    for li, row in enumerate(rules):
        for ri, nn in enumerate(n.tolist()):
            for h, r in enumerate(row):
                assert got[li, ri, h] == window_tokens(span_tokens(r.alpha, r.beta, nn, 32), 16)
