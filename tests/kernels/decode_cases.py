"""The ring decode kernel against its torch reference in Triton's interpreter, every case in one process.

Run by test_ring_decode.py in a subprocess (TRITON_INTERPRET must be set before Triton is first imported). Prints
one JSON object {case: max abs error}.
"""

from __future__ import annotations

import json
import os
import random
import sys

os.environ["TRITON_INTERPRET"] = "1"

import torch  # noqa: E402

from moa_kernels import ring_decode, ring_decode_reference, split_scratch  # noqa: E402
from tests.kernels.rings import make_decode_batch  # noqa: E402

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def random_rows(seed: int, heads: int) -> tuple[list[list[int]], list[int]]:
    """Four rows: unequal spans (packed rings), equal spans (interleaved), a short request whose rings are not
    full, a padding row (no ring)."""
    rnd = random.Random(seed)
    unequal = [rnd.randint(5, 90) for _ in range(heads)]
    unequal[0] = unequal[-1] + 17  # never all equal
    equal = [rnd.randint(20, 80)] * heads
    short = [rnd.randint(40, 90) for _ in range(heads)]
    return [unequal, equal, short, [0] * heads], [200, 150, 23, 0]


def error(batch, segments: int = 1, mutate=None) -> float:
    got = torch.full_like(batch.query, 7.0)
    want = torch.full_like(batch.query, 7.0)
    args = batch.args()
    if mutate:
        args = mutate(args)
    rings = batch.visible.shape[0]
    scratch = split_scratch(rings, segments, batch.query.shape[1] // batch.base.shape[1], batch.query.shape[2],
                            "cpu") if segments > 1 else None  # fmt: skip
    ring_decode(*args, got, segments=segments, scratch=scratch, scales=batch.scales, cell_map=batch.cell_map)
    ring_decode_reference(*batch.args(), want, scales=batch.scales, cell_map=batch.cell_map)
    return float((got.double() - want.double()).abs().max())


def cases() -> dict[str, float]:
    out: dict[str, float] = {}
    for dname, dtype in DTYPES.items():
        for group in (1, 3, 4):
            seed = 10 * list(DTYPES).index(dname) + group
            spans, seq = random_rows(seed, heads=3)
            batch = make_decode_batch(spans, seq, group=group, dtype=dtype, seed=seed)
            out[f"random-{dname}-g{group}"] = error(batch)
            out[f"random-{dname}-g{group}-split4"] = error(batch, segments=4)
    # The geometry of the models people serve: 8 KV heads of 128 dims, GQA 4 and 8; split-KV over 16 segments.
    for group in (4, 8):
        spans, seq = random_rows(40 + group, heads=8)
        batch = make_decode_batch(spans, seq, group=group, head_dim=128, seed=40 + group)
        out[f"geometry-h8-g{group}-d128"] = error(batch, segments=16)
    # The rings of one layer of a group of 5 (all MoA layers in one KV cache group): a block holds a page per layer,
    # the layer's region starts after the earlier layers' pages (cell map of vLLM's layer-outer allocation).
    spans, seq = random_rows(70, heads=3)
    batch = make_decode_batch(spans, seq, group=3, seed=70, layers=5)
    out["group-of-5-layers"] = error(batch)
    out["group-of-5-layers-split4"] = error(batch, segments=4)
    cell_map = batch.cell_map
    batch.cell_map = None  # read as if each block held one layer page: other cells than the rings'
    got, want = torch.full_like(batch.query, 7.0), torch.full_like(batch.query, 7.0)
    ring_decode(*batch.args(), got)
    ring_decode_reference(*batch.args(), want, cell_map=cell_map)
    out["mutation-group-read-without-cell-map"] = float((got.double() - want.double()).abs().max())
    # Head dim not a power of two, a page larger than most rings.
    spans, seq = random_rows(6, heads=2)
    out["head-dim-48"] = error(make_decode_batch(spans, seq, group=2, head_dim=48, page=64, seed=6))
    # fp8 cells: float8 of value / scale, read times the scales.
    for fp8 in (torch.float8_e4m3fn, torch.float8_e5m2):
        spans, seq = random_rows(60, heads=3)
        batch = make_decode_batch(spans, seq, group=3, dtype=torch.float16, seed=60)
        batch.cells = (batch.cells.float() / 0.5).to(fp8)
        batch.scales = (0.5, 0.5)
        name = str(fp8).removeprefix("torch.")
        out[f"fp8-{name}"] = error(batch)
        got, want = torch.zeros_like(batch.query), torch.zeros_like(batch.query)
        ring_decode(*batch.args(), got)  # the scales forgotten must be caught
        ring_decode_reference(*batch.args(), want, scales=(0.5, 0.5))
        out[f"mutation-fp8-unscaled-{name}"] = float((got - want).abs().max())
    # Mutations that must be caught: a ring's pages one entry further on in the flat list, a packed row read as
    # interleaved, one key more than the ring holds (a never-written slot: NaN).
    spans, seq = random_rows(8, heads=3)
    batch = make_decode_batch(spans, seq, group=3, seed=8)
    out["mutation-base-plus-one"] = error(batch, mutate=lambda a: (*a[:3], a[3] + 1, *a[4:]))
    interleaved = torch.arange(3, dtype=torch.int32).expand(4, 3).contiguous()
    out["mutation-packed-read-interleaved"] = error(
        batch, mutate=lambda a: (*a[:3], interleaved, torch.full_like(a[4], 3), *a[5:])
    )
    out["mutation-visible-plus-one"] = error(batch, mutate=lambda a: (*a[:5], a[5] + (a[5] > 0).int(), a[6]))
    return out


if __name__ == "__main__":
    sys.stdout.write(json.dumps(cases()) + "\n")
