"""moa_kernels' ring prefill at real shapes: error against the torch reference and time against dense attention.

For each model shape (KV heads, GQA group, head dim), dtype, context and chunk: rings of a MoA-like mix of spans
(a quarter of the heads dense, the rest between N/16 and N/2) filled as a real prefill would leave them, pages
shuffled through a NaN-filled pool; one chunk of fresh queries after `context` tokens. Reports the largest error
against `ring_prefill_reference` (float64) and, on a GPU, the kernel's median time next to the same kernel with
every head dense and to torch's SDPA over the dense context with a mask (16-bit only): the prefill speed-up a
sparse chunk buys.

    python -m benchmarks.gpu.kernel_check --out benchmarks/results/gpu/kernel_check.json  # on a GPU
    TRITON_INTERPRET=1 python -m benchmarks.gpu.kernel_check --smoke --out /tmp/k.json  # CPU, tiny shapes
"""

from __future__ import annotations

import argparse
import functools
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

SHAPES = {  # name: (KV heads, query heads per KV head, head dim)
    "SmolLM2-135M": (3, 3, 64),
    "Llama-3-8B": (8, 4, 128),
}


def mixed_spans(heads: int, length: int, seed: int, dense: bool = False) -> list[int]:
    if dense:
        return [length] * heads
    gen = torch.Generator().manual_seed(seed)
    spans = []
    for h in range(heads):
        if h % 4 == 0:
            spans.append(length)
        else:
            spans.append(int(length * (1 / 16 + float(torch.rand(1, generator=gen)) * (1 / 2 - 1 / 16))))
    return spans


def build(shape, dtype, context: int, chunk: int, page: int, sinks: int, device, seed: int = 0, dense: bool = False):
    """One row: rings after `context` tokens, a chunk of `chunk` fresh tokens (N = context + chunk)."""
    from moa_kernels.ring_prefill_ref import slot_owners

    heads, group, head_dim = shape
    gen = torch.Generator().manual_seed(seed)
    spans = mixed_spans(heads, context + chunk, seed, dense)
    pages = [-(-s // page) for s in spans]
    # The row's rings in vLLM blocks as the plugin lays them out: interleaved where every head has the same pages
    # (page j of head h at flat j * H + h), else packed head after head; flat page f is cell f % H of block f // H.
    equal = len(set(pages)) == 1
    base = torch.tensor([[h if equal else sum(pages[:h]) for h in range(heads)]], dtype=torch.int32)
    stride = torch.tensor([[heads if equal else 1] * heads], dtype=torch.int32)
    blocks = -(-sum(pages) // heads)
    table = (torch.randperm(blocks + 4, generator=gen)[:blocks] + 1).to(torch.int32)[None]
    cells = torch.full(((blocks + 5) * heads, 2 * page, head_dim), float("nan"), dtype=dtype)
    for h in range(heads):
        owners = torch.tensor(slot_owners(context, spans[h], sinks))
        slots = (owners >= 0).nonzero()[:, 0]
        flat = int(base[0, h]) + (slots // page) * int(stride[0, h])
        ids = table[0, flat // heads].long() * heads + flat % heads
        cells[ids, slots % page] = torch.randn(len(slots), head_dim, generator=gen).to(dtype)
        cells[ids, page + slots % page] = torch.randn(len(slots), head_dim, generator=gen).to(dtype)
    q = torch.randn(chunk, heads * group, head_dim, generator=gen).to(dtype)
    k = torch.randn(chunk, heads, head_dim, generator=gen).to(dtype)
    v = torch.randn(chunk, heads, head_dim, generator=gen).to(dtype)
    to = lambda x: x.to(device)  # noqa: E731
    args = (to(q), to(k), to(v), to(cells), to(table), to(base), to(stride), to(torch.tensor([spans])), [context],
            [0, chunk], [0])  # fmt: skip
    return args, spans


def median_ms(fn, repeats: int) -> float:
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    fn()
    sync()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        sync()
        times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def dense_sdpa(shape, dtype, context: int, chunk: int, device):
    """Dense attention of the same chunk over context + chunk keys: torch SDPA, queries bottom-right aligned."""
    heads, group, head_dim = shape
    q = torch.randn(1, heads * group, chunk, head_dim, dtype=dtype, device=device)
    k = torch.randn(1, heads * group, context + chunk, head_dim, dtype=dtype, device=device)
    v = torch.randn_like(k)
    mask = torch.ones(chunk, context + chunk, dtype=torch.bool, device=device).tril(diagonal=context)
    return lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def run(smoke: bool, repeats: int) -> dict:
    from moa_kernels import pick_blocks, ring_prefill, ring_prefill_reference
    from moa_kernels.ring_prefill import interpreting

    device = torch.device("cuda" if torch.cuda.is_available() and not interpreting() else "cpu")
    if smoke:
        grid = [("SmolLM2-135M", d, 200, 48, 16) for d in (torch.float32, torch.float16, torch.bfloat16)]
    else:
        grid = [
            (name, dtype, context, chunk, 16)
            for name in SHAPES
            for dtype in (torch.bfloat16, torch.float16, torch.float32)
            for context in (8192, 16384, 32768)
            for chunk in (512, 2048)
        ]
    rows = []
    for name, dtype, context, chunk, page in grid:
        shape = SHAPES[name]
        sinks = 4 if smoke else 64
        args, spans = build(shape, dtype, context, chunk, page, sinks, device)
        scale = shape[2] ** -0.5
        got = torch.empty_like(args[0])
        handle = ring_prefill(*args, sinks, scale, got)
        want = torch.empty_like(args[0])
        ring_prefill_reference(*args, sinks, scale, want)
        err = float((got.double() - want.double()).abs().max())
        row = {
            "shape": name,
            "dtype": str(dtype).removeprefix("torch."),
            "context": context,
            "chunk": chunk,
            "page": page,
            "spans": spans,
            "density": sum(spans) / (len(spans) * (context + chunk)),
            "blocks": vars(pick_blocks(shape[2], shape[1], interpret=interpreting())),
            "max_abs_err": err,
            "n_regs": getattr(handle, "n_regs", None),  # compiled kernels only
            "n_spills": getattr(handle, "n_spills", None),
        }
        if device.type == "cuda" and not smoke:
            row["kernel_ms"] = median_ms(functools.partial(ring_prefill, *args, sinks, scale, got), repeats)
            dense_args, _ = build(shape, dtype, context, chunk, page, sinks, device, dense=True)
            row["dense_kernel_ms"] = median_ms(functools.partial(ring_prefill, *dense_args, sinks, scale, got), repeats)
            row["speedup_vs_dense_kernel"] = row["dense_kernel_ms"] / row["kernel_ms"]
            if dtype != torch.float32:
                row["dense_sdpa_ms"] = median_ms(dense_sdpa(shape, dtype, context, chunk, device), repeats)
                row["speedup_vs_dense_sdpa"] = row["dense_sdpa_ms"] / row["kernel_ms"]
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if k not in ("spans", "blocks")}), flush=True)
    return {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else f"cpu ({platform.processor()})",
        "interpreter": interpreting(),
        "torch": torch.__version__,
        "rows": rows,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/gpu/kernel_check.json"))
    ap.add_argument("--smoke", action="store_true", help="tiny shapes (CPU / interpreter)")
    ap.add_argument("--repeats", type=int, default=20)
    args = ap.parse_args(argv)
    result = {
        "command": " ".join(["python -m benchmarks.gpu.kernel_check", *(argv or sys.argv[1:])]),
        **run(args.smoke, args.repeats),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    tol = {"float32": 1e-4, "float16": 5e-3, "bfloat16": 4e-2}
    bad = [r for r in result["rows"] if not r["max_abs_err"] < tol[r["dtype"]]]
    for r in bad:
        print(f"FAIL {r['shape']} {r['dtype']} context {r['context']} chunk {r['chunk']}: {r['max_abs_err']:.3e}")
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
