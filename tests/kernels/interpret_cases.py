"""The ring prefill kernel against its torch reference in Triton's interpreter, every case in one process.

Run by test_ring_prefill.py in a subprocess: TRITON_INTERPRET must be set before Triton is first imported, which a
pytest process that also starts vLLM engines cannot guarantee. Prints one JSON object {case: max abs error}.
"""

from __future__ import annotations

import json
import os
import random
import sys

os.environ["TRITON_INTERPRET"] = "1"

import torch  # noqa: E402

from moa_kernels import ring_prefill, ring_prefill_reference  # noqa: E402
from tests.kernels.rings import make_batch  # noqa: E402

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def random_rows(seed: int, sinks: int, heads: int) -> tuple[list[list[int]], list[int], list[int]]:
    """Three rows: a first chunk (empty ring), a ring that wrapped, a ring that wrapped many times; windows both
    smaller and larger than their chunk."""
    rnd = random.Random(seed)
    spans = [[rnd.randint(sinks + 3, 70) for _ in range(heads)] for _ in range(3)]
    computed = [0, rnd.randint(75, 110), rnd.randint(200, 260)]
    chunks = [rnd.randint(20, 60), rnd.randint(1, 40), rnd.randint(30, 90)]
    return spans, computed, chunks


def error(batch, rows=None, kernel_span_delta: int = 0, reference_window_delta: int = 0) -> float:
    got = torch.full_like(batch.query, 7.0)
    want = torch.full_like(batch.query, 7.0)
    args = batch.args(rows)
    if kernel_span_delta:
        args = (*args[:7], args[7] + kernel_span_delta, *args[8:])
    ring_prefill(*args, got, scales=batch.scales, cell_map=batch.cell_map)
    ring_prefill_reference(*batch.args(rows), want, window_delta=reference_window_delta, scales=batch.scales,
                           cell_map=batch.cell_map)  # fmt: skip
    return float((got.double() - want.double()).abs().max())


def cases() -> dict[str, float]:
    out: dict[str, float] = {}
    for dname, dtype in DTYPES.items():
        for group in (1, 3, 8):
            for sinks in (0, 4):
                seed = 100 * list(DTYPES).index(dname) + 10 * group + sinks
                spans, computed, chunks = random_rows(seed, sinks, heads=2)
                batch = make_batch(spans, computed, chunks, group=group, sinks=sinks, dtype=dtype, seed=seed)
                out[f"random-{dname}-g{group}-s{sinks}"] = error(batch)
    # The geometry of the models people serve: 8 KV heads of 128 dims, GQA 4 (Llama-3-8B) and 8 (Llama-3-70B).
    for group in (4, 8):
        spans, computed, chunks = random_rows(40 + group, 4, heads=8)
        batch = make_batch(spans, computed, chunks, group=group, head_dim=128, page=16, seed=40 + group)
        out[f"geometry-h8-g{group}-d128"] = error(batch)
    # fp8 cells (vLLM's fp8 KV cache): the ring holds float8 of value / scale, the fresh chunk comes in the queries'
    # dtype; stale pages stay NaN in both float8 types.
    for fp8 in (torch.float8_e4m3fn, torch.float8_e5m2):
        spans, computed, chunks = random_rows(60, 4, heads=2)
        batch = make_batch(spans, computed, chunks, group=3, dtype=torch.float16, seed=60)
        batch.cells = (batch.cells.float() / 0.5).to(fp8)  # fp8 ring values, x 0.5 when read
        batch.scales = (0.5, 0.5)
        out[f"fp8-{str(fp8).removeprefix('torch.')}"] = error(batch)
        batch.scales = (1.0, 1.0)  # a kernel (and reference) that forgets the scales must be caught
        got, want = torch.zeros_like(batch.query), torch.zeros_like(batch.query)
        ring_prefill(*batch.args(), got)
        ring_prefill_reference(*batch.args(), want, scales=(0.5, 0.5))
        out[f"mutation-fp8-unscaled-{str(fp8).removeprefix('torch.')}"] = float((got - want).abs().max())
    # The chunk starts below the sinks: sink keys come from the fresh K/V; one ring never wraps (span > seq).
    batch = make_batch([[40, 200]], [2], [60], group=3, sinks=8, seed=5)
    out["sinks-in-chunk"] = error(batch)
    # One layer of a group of 5 (all MoA layers in one KV cache group): its region after the earlier layers' pages,
    # cells through the layer-outer cell map.
    spans, computed, chunks = random_rows(70, 4, heads=2)
    batch = make_batch(spans, computed, chunks, group=3, seed=70, layers=5)
    out["group-of-5-layers"] = error(batch)
    # Head dim not a power of two (masked lanes), page larger than the ring.
    batch = make_batch([[24, 37]], [130], [45], group=2, head_dim=48, page=64, seed=6)
    out["head-dim-48"] = error(batch)
    # Only some rows computed: the others' outputs are left as they were (the sentinel 7 on both sides).
    spans, computed, chunks = random_rows(7, 4, heads=2)
    batch = make_batch(spans, computed, chunks, group=3, seed=7)
    out["row-subset"] = error(batch, rows=[1])
    untouched = torch.full_like(batch.query, 7.0)
    ring_prefill(*batch.args([1]), untouched)
    q0, q1 = batch.query_start_loc[1], batch.query_start_loc[2]
    out["row-subset-others-untouched"] = float(torch.cat([untouched[:q0], untouched[q1:]]).sub(7.0).abs().max())
    # Mutations that must be caught: the reference's windows one token narrower (same ring layout), and the
    # kernel given spans one token wider (its slot arithmetic then reads slots never written: NaN or wrong keys).
    spans, computed, chunks = random_rows(8, 4, heads=2)
    batch = make_batch(spans, computed, chunks, group=3, seed=8)
    out["mutation-reference-window-minus-one"] = error(batch, reference_window_delta=-1)
    out["mutation-kernel-span-plus-one"] = error(batch, kernel_span_delta=1)
    return out


if __name__ == "__main__":
    sys.stdout.write(json.dumps(cases()) + "\n")
