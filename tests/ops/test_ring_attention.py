"""Ring attention over per-head pages equals a naive dense masked attention, step after step.

A simulated engine feeds each request's tokens through prefill chunks and decode steps into a shared paged cache
(pages of every request shuffled across the pool), and checks every step's output against attention over the whole
sequence with the sink + window mask.
"""

from __future__ import annotations

import pytest
import torch

from moa_vllm.ops.ring_attention import build_ring_batch, plan_spans, ring_attention
from moa_vllm.plan.ring import blocks_for_spans, ring_slot
from moa_vllm.plan.span import span_tokens

HQ, H, D, BS = 6, 2, 8, 4
SCALE = 0.3


def naive(q, k, v, q_pos, windows, sinks):
    """q [n, Hq, D] at positions q_pos; k/v [L, H, D] = the whole sequence so far."""
    g = HQ // H
    kp = torch.arange(k.shape[0])[None]
    qp = q_pos[:, None]
    mask = (kp <= qp) & ((kp < sinks) | (qp - kp < windows[:, None, None]))  # [H, n, L]
    s = torch.einsum("nhd,lhd->hnl", q, k.repeat_interleave(g, 1)) * SCALE
    p = s.masked_fill(~mask.repeat_interleave(g, 0), float("-inf")).softmax(-1)
    return torch.einsum("hnl,lhd->nhd", p, v.repeat_interleave(g, 1))


class Engine:
    """Allocates each request's blocks once (from its spans), then runs steps of mixed chunks and decodes."""

    def __init__(self, spans: list[list[int]], lengths: list[int], sinks: int, dtype: torch.dtype, seed: int):
        self.gen = torch.Generator().manual_seed(seed)
        self.spans = torch.tensor(spans)
        self.kernel_spans = self.spans  # what the kernel is told; tests may corrupt it
        self.sinks = sinks
        need = [blocks_for_spans(s, BS, H) for s in spans]
        pool = torch.randperm(sum(need) + 5, generator=self.gen) + 1  # block 0 stays unused, like vLLM's null block
        self.table = torch.zeros(len(spans), max(need) + 3, dtype=torch.int32)
        start = 0
        for r, n in enumerate(need):
            self.table[r, :n] = pool[start : start + n]
            start += n
        self.cache = torch.full((sum(need) + 6, H, BS, 2 * D), float("nan"), dtype=dtype)  # stale garbage
        self.q = [torch.randn(n, HQ, D, generator=self.gen).to(dtype) for n in lengths]
        self.k = [torch.randn(n, H, D, generator=self.gen).to(dtype) for n in lengths]
        self.v = [torch.randn(n, H, D, generator=self.gen).to(dtype) for n in lengths]
        self.done = [0] * len(spans)

    def step(self, counts: dict[int, int]) -> float:
        """Advance the given requests by counts[r] tokens; returns the largest error against the naive reference."""
        rows = sorted(counts)
        qsl, seq_lens = [0], []
        for r in rows:
            qsl.append(qsl[-1] + counts[r])
            seq_lens.append(self.done[r] + counts[r])
        sl = [slice(self.done[r], self.done[r] + counts[r]) for r in rows]
        q = torch.cat([self.q[r][s] for r, s in zip(rows, sl)])
        k = torch.cat([self.k[r][s] for r, s in zip(rows, sl)])
        v = torch.cat([self.v[r][s] for r, s in zip(rows, sl)])
        batch = build_ring_batch(self.kernel_spans[rows], self.table[rows], qsl, seq_lens, self.sinks, BS)
        out = torch.zeros_like(q)
        ring_attention(q, k, v, self.cache, batch, self.sinks, SCALE, out, q_tile=3)
        err = 0.0
        for i, r in enumerate(rows):
            windows = torch.clamp(self.spans[r] - self.sinks, min=0)
            end = seq_lens[i]
            ref = naive(q[qsl[i] : qsl[i + 1]].float(), self.k[r][:end].float(), self.v[r][:end].float(),
                        torch.arange(self.done[r], end), windows, self.sinks)
            err = max(err, (out[qsl[i] : qsl[i + 1]].float() - ref).abs().max().item())
            self.done[r] = end
        return err


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 3e-2)])
def test_chunks_and_decodes_wrap_the_ring_many_times(dtype, tol):
    sinks = 3
    lengths = [60, 45, 9, 70]
    spans = [[10, 25], [7, 45], [9, 9], [5, 12]]  # windows 7/22, 4/42, 6/6 (span = N: never wraps), 2/9
    eng = Engine(spans, lengths, sinks, dtype, seed=0)
    schedule = [{0: 13, 1: 45, 2: 2}, {0: 20, 2: 1, 3: 30}, {0: 1, 2: 6, 3: 1}]
    errs = [eng.step(s) for s in schedule]
    while any(eng.done[r] < lengths[r] for r in range(4)):  # decode everything to the end
        errs.append(eng.step({r: 1 for r in range(4) if eng.done[r] < lengths[r]}))
    assert lengths[0] - sinks >= 4 * (spans[0][0] - sinks)  # request 0's ring wrapped more than 4 times
    assert max(errs) < tol


def test_chunk_size_does_not_change_the_output():
    sinks, n = 2, 50
    for chunk in (1, 7, 50):
        eng = Engine([[12, 30]], [n], sinks, torch.float32, seed=1)
        while eng.done[0] < n:
            assert eng.step({0: min(chunk, n - eng.done[0])}) < 1e-5


def test_off_by_one_window_is_caught():
    """The reference must be able to fail: a ring one slot too small breaks the equality."""
    sinks = 2
    eng = Engine([[9, 9]], [30], sinks, torch.float32, seed=2)
    eng.step({0: 20})
    eng.spans = eng.spans - 1  # the kernel now keeps one token fewer than the reference expects
    errs = [eng.step({0: 1}) for _ in range(10)]
    assert max(errs) > 1e-3


def test_plan_spans_matches_scalar_span_math():
    alphas = torch.tensor([0.0, -100.0, 300.5])
    betas = torch.tensor([0.5, 0.25, 0.0])
    n = torch.tensor([10, 333, 1000, 4096])
    got = plan_spans(alphas, betas, n, min_span=32)
    want = [[span_tokens(a, b, int(x), 32) for a, b in zip(alphas.tolist(), betas.tolist())] for x in n]
    assert got.tolist() == want


def test_ring_slot_scalar_form():
    assert [ring_slot(p, 2, 5) for p in range(9)] == [0, 1, 2, 3, 4, 2, 3, 4, 2]
    with pytest.raises(ValueError):
        ring_slot(4, 4, 4)  # a span of only sinks holds no later position
