"""A small simulated engine for the ring paths: the plugin's RingState + ring_forward + the real kernels, no vLLM
engine. Each request's blocks (one KV cache group for all layers, as in the plugin: a block holds one layer page
per layer, in one backing allocation laid out layer-outer as vLLM does) are taken once from a shuffled pool (stale
pages hold a huge value); every step
runs decode rows first, then prefill chunks, and is checked against the token-exact reference over the full history.
"""

from __future__ import annotations

from types import SimpleNamespace

import torch

from moa_vllm.ops.page_format import region_cells
from moa_vllm.ops.reference import reference_attention
from moa_vllm.ops.ring_layout import blocks_needed, ring_spans
from moa_vllm.vllm_plugin.moa.backend import ring_forward
from moa_vllm.vllm_plugin.moa.engine_context import EngineContext
from moa_vllm.vllm_plugin.moa.ring_state import RingState


class RingSim:
    def __init__(
        self, kernels, alphas, betas, lengths, *, sinks, min_span, page, g, d, dtype, seed, max_len=4096, scale=0.125
    ):
        """dtype: the model's (q/k/v); the cache holds it too, or fp8 bytes where the kernels quantize
        (kernels.quant): then stale pages hold fp8 NaN and the reference sees K/V as the cache gives them back."""
        self.gen = torch.Generator().manual_seed(seed)
        self.kernels, self.sinks, self.page, self.g, self.d, self.dtype, self.scale = (
            kernels,
            sinks,
            page,
            g,
            d,
            dtype,
            scale,
        )
        self.alphas, self.betas = alphas, betas
        self.layers, self.h = alphas.shape
        self.lengths = lengths  # N of each request = tokens it will ever hold
        self.req_ids = [f"r{i}" for i in range(len(lengths))]
        self.spans = ring_spans(alphas, betas, torch.tensor(lengths), min_span)  # [L, R, H]
        layer_pages = blocks_needed(self.spans, page, self.h)  # [L, R]
        need = -(-layer_pages.sum(0) // self.layers)  # [R] blocks of the group (plan/ring.group_blocks)
        width = int(need.max()) + 2
        total = int(need.sum())
        pool = torch.randperm(total + 7, generator=self.gen) + 1  # block 0 is the null block
        self.tables = torch.zeros(len(lengths), width, dtype=torch.int32)
        used = 0
        for r in range(len(lengths)):
            n = int(need[r])
            self.tables[r, :n] = pool[used : used + n]
            used += n
        # Stale pages hold a huge finite value (STALE): a slot read as if it held a key dominates its query's scores
        # and its value the output, far past any tolerance. Not NaN: a page's tail past the ring's last key is read
        # by CPU_ATTN's tiles with weight exactly 0, as stock vLLM reads its last block's stale tail (0 x NaN = NaN).
        quant = getattr(kernels, "quant", None)
        shape = (self.layers, total + 8, self.h, page, 2 * d)
        backing = (
            torch.full(shape, STALE_FP8_BYTE, dtype=torch.uint8) if quant is not None
            else torch.full(shape, STALE, dtype=dtype)
        )  # fmt: skip
        self.caches = list(backing.unbind(0))  # each layer's view of the one allocation
        self.region, self.cell_map = region_cells(self.caches)
        hq = self.h * g
        self.q = [[torch.randn(n, hq, d, generator=self.gen).to(dtype) for n in lengths] for _ in range(self.layers)]
        self.k = [
            [torch.randn(n, self.h, d, generator=self.gen).to(dtype) for n in lengths] for _ in range(self.layers)
        ]
        self.v = [
            [torch.randn(n, self.h, d, generator=self.gen).to(dtype) for n in lengths] for _ in range(self.layers)
        ]
        # what the reference attends over: K/V as the cache gives them back (fp8: quantized at the kernels' scales)
        self.k_seen = [[kernels.as_cached(k, k)[0] for k in layer] for layer in self.k]
        self.v_seen = [[kernels.as_cached(v, v)[1] for v in layer] for layer in self.v]
        self.done = [0] * len(lengths)
        self.state = RingState(  # the kernels' own choice: CUDA's read vLLM's block table, no page tables
            alphas, betas, min_span, sinks, page, max_len, torch.device("cpu"), page_tables=kernels.page_tables
        )
        self.context = EngineContext()  # what the runner patches publish into
        self.reference_window_delta = 0  # mutation hook: the reference's windows off by this many tokens

    def step(self, counts: dict[int, int]) -> float:
        """Advance requests by counts[r] tokens (decodes first); the largest error against the reference."""
        rows = [r for r in sorted(counts) if counts[r] == 1] + [r for r in sorted(counts) if counts[r] != 1]
        qsl, seq_lens = [0], []
        for r in rows:
            qsl.append(qsl[-1] + counts[r])
            seq_lens.append(self.done[r] + counts[r])
        batch = self.context.publish([self.req_ids[r] for r in rows], [self.lengths[r] for r in rows])
        common = SimpleNamespace(
            num_reqs=len(rows),
            query_start_loc_cpu=torch.tensor(qsl),
            seq_lens=torch.tensor(seq_lens, dtype=torch.int32),
        )
        err = 0.0
        self.state.step_for(common, batch)  # what the group's metadata builder does
        self.state.fill(self.tables[rows])
        for layer in range(self.layers):
            sl = [slice(self.done[r], self.done[r] + counts[r]) for r in rows]
            q = torch.cat([self.q[layer][r][s] for r, s in zip(rows, sl)])
            k = torch.cat([self.k[layer][r][s] for r, s in zip(rows, sl)])
            v = torch.cat([self.v[layer][r][s] for r, s in zip(rows, sl)])
            out = torch.zeros_like(q)
            ring_forward(q, k, v, out, self.region, self.cell_map, self.page, self.kernels, self.state.step, layer,
                         self.sinks, self.scale)  # fmt: skip
            for i, r in enumerate(rows):
                end = seq_lens[i]
                windows = self.spans[layer, r] - self.sinks + self.reference_window_delta
                ref = reference_attention(
                    self.q[layer][r][self.done[r] : end],
                    torch.arange(self.done[r], end),
                    self.k_seen[layer][r][:end].transpose(0, 1),
                    self.v_seen[layer][r][:end].transpose(0, 1),
                    windows,
                    self.sinks,
                    self.scale,
                )
                got = out[qsl[i] : qsl[i + 1]].double()
                # NaN (a read of a stale page) counts as infinitely wrong: max() with a NaN would drop it
                err = max(err, float(torch.nan_to_num((got - ref).abs(), nan=float("inf")).max()))
        for r in rows:
            self.done[r] += counts[r]
        return err


STALE = 1e3
STALE_FP8_BYTE = 0x7B  # 352 in e4m3fn, 57344 in e5m2 (x the scale): finite in both
PAGE, D = 32, 64  # page tokens (CPU_ATTN needs multiples of 32) and head dim of the simulated layers


def rules(layers: int, heads: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Random per-head rules: alpha 0..59 tokens, beta 0..0.5."""
    gen = torch.Generator().manual_seed(seed)
    alphas = torch.randint(0, 60, (layers, heads), generator=gen).double()
    betas = torch.rand(layers, heads, generator=gen).double() * 0.5
    return alphas, betas


def make_sim(
    kernels_cls, dtype, alphas, betas, lengths, *, seed, sinks=4, min_span=20, g=3, d=D, scale=0.125, kv="auto"
) -> RingSim:
    """A RingSim with kernels of this class; rules [L, H] give the KV heads, g the query heads per KV head; kv an
    fp8 cache dtype for quantized rings (dtype is then the model's)."""
    return RingSim(
        kernels_cls(dtype, PAGE, d, kv_cache_dtype=kv) if kv != "auto" else kernels_cls(dtype, PAGE, d),
        alphas,
        betas,
        lengths,
        sinks=sinks,
        min_span=min_span,
        page=PAGE,
        g=g,
        d=d,
        dtype=dtype,
        seed=seed,
        scale=scale,
    )


def drive(sim: RingSim, chunk: int, tail: int = 90) -> float:
    """Prompts (N - tail tokens) in chunks, interleaved with other requests' decodes, until every request reaches N;
    the largest error of any step against the reference."""
    prompts = [n - tail for n in sim.lengths]
    err = 0.0
    while any(sim.done[r] < sim.lengths[r] for r in range(len(sim.lengths))):
        counts = {}
        for r in range(len(sim.lengths)):
            if sim.done[r] < prompts[r]:
                counts[r] = min(chunk, prompts[r] - sim.done[r])
            elif sim.done[r] < sim.lengths[r]:
                counts[r] = 1
        err = max(err, sim.step(counts))
    return err
