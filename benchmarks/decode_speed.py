"""Decode speed of the moa backend against stock vLLM (CPU wheel; all figures are CPU figures). Prefill speed:
benchmarks/prefill_speed.py.

Parts (each writes benchmarks/results/decode_speed_<part>.json with its command, + a PNG where it plots):
  attention    one layer's decode attention per step, the moa path (ring write + per-KV-head virtual sequences
               through CPU_ATTN) vs stock CPU_ATTN (cache write + attention) over the same bytes, 1k-8k context;
               no engine. Also the moa path at a quarter of the bytes (spans = context / 4).
  equal-batch  8 requests of 4k tokens decoding together, no memory pressure: median decode step time of stock
               vLLM, the dense plan and the d0.25 plans, one engine at a time.

Usage: python benchmarks/decode_speed.py {attention,equal-batch} [--plans P ...] [--repeats N]
Run on an otherwise idle machine: every engine is started and measured one after another in this process.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
PLANS = REPO / "plans" / "SmolLM2-135M-Instruct"
RESULTS = REPO / "benchmarks" / "results"

from benchmarks.ring_cache import STOCK, close, core_of, make_llm  # noqa: E402

if TYPE_CHECKING:
    import torch


def _meta(part: str, argv: list[str]) -> dict:
    return {
        "command": "python benchmarks/decode_speed.py " + " ".join(argv),
        "part": part,
        "device": f"CPU ({platform.machine()}, {os.cpu_count()} cores)",
        "torch_threads": _threads(),
    }


def _threads() -> int:
    import torch

    return torch.get_num_threads()


# ---- attention (no engine) ------------------------------------------------------------------------------------------
def _time(fn, repeats: int) -> float:
    for _ in range(3):
        fn()
    samples = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t0)
    return statistics.median(samples)


@dataclass(frozen=True)
class AttentionShape:
    """One attention layer's geometry: KV heads, query heads per KV head, head dim, page (block) size, sinks."""

    heads: int
    group: int
    head_dim: int
    page: int = 128  # vLLM's CPU block size
    sinks: int = 64


EMBEDDED = AttentionShape(3, 3, 64)  # the embedded model's attention shapes


def _stock_step(shape: AttentionShape, requests: int, ctx: int):
    """Stock CPU_ATTN for one layer's decode step: cache write + scheduler metadata + attention, dense cache."""
    import torch
    from vllm import _custom_ops as ops
    from vllm import envs
    from vllm.v1.attention.backends.cpu_attn import _get_attn_isa

    h, g, d, page = shape.heads, shape.group, shape.head_dim, shape.page
    isa = _get_attn_isa(torch.float32, page, d)
    split = bool(envs.VLLM_CPU_ATTN_SPLIT_KV)
    q, k, v = torch.randn(requests, h * g, d), torch.randn(requests, h, d), torch.randn(requests, h, d)
    out = torch.empty_like(q)
    blocks = -(-(ctx + 1) // page)
    cache = torch.randn(requests * blocks + 1, h, page, 2 * d)
    kc, vc = cache.view(cache.shape[0], h, 2 * page, d).chunk(2, dim=2)
    table = torch.arange(1, requests * blocks + 1, dtype=torch.int32).view(requests, blocks)
    seq = torch.full((requests,), ctx + 1, dtype=torch.int32)
    qsl = torch.arange(requests + 1, dtype=torch.int32)
    slots = table[:, -1].long() * page + ctx % page

    def step() -> None:
        ops.cpu_attn_reshape_and_cache(k, v, kc, vc, slots, isa)
        md = ops.cpu_attn_get_scheduler_metadata(
            num_reqs=requests,
            num_heads=h * g,
            num_kv_heads=h,
            head_dim=d,
            seq_lens=seq,
            dtype=torch.float32,
            query_start_loc=qsl,
            causal=True,
            sliding_window_size=-1,
            isa=isa,
            enable_kv_split=split,
        )
        ops.cpu_attention_with_kv_cache(
            query=q,
            key_cache=kc,
            value_cache=vc,
            output=out,
            query_start_loc=qsl,
            seq_lens=seq,
            scale=d**-0.5,
            causal=True,
            alibi_slopes=None,
            sliding_window=-1,
            block_table=table,
            softcap=0.0,
            scheduler_metadata=md,
            s_aux=None,
        )

    return step


def _moa_step(shape: AttentionShape, requests: int, ctx: int, spans: torch.Tensor):
    """The moa path for one layer's decode step (ring write + attention: virtual sequences, or one H-head sequence
    per request where a layer's heads share a span; the layer's page tables derived from its block table), cycling
    through the layers of spans [layers, H] (every request's), the per-step metadata of all layers charged 1/layers
    to each layer as in the engine. The layers' pages alias one another here (the cell map's layer stride is one
    layer page, not the whole cache's): the addresses and bytes read are the engine's, the memory is one layer's."""
    from types import SimpleNamespace

    import torch

    from moa_vllm.ops.page_format import cells
    from moa_vllm.ops.ring_layout import CellMap, blocks_needed
    from moa_vllm.vllm_plugin.moa.backend import ring_forward
    from moa_vllm.vllm_plugin.moa.engine_context import EngineContext
    from moa_vllm.vllm_plugin.moa.kernels_cpu import CpuRingKernels
    from moa_vllm.vllm_plugin.moa.ring_state import RingState

    h, g, d, page, sinks = shape.heads, shape.group, shape.head_dim, shape.page, shape.sinks
    layers = spans.shape[0]
    kernels = CpuRingKernels(torch.float32, page, d)
    q, k, v = torch.randn(requests, h * g, d), torch.randn(requests, h, d), torch.randn(requests, h, d)
    out = torch.empty_like(q)
    alphas = spans.double()  # beta 0: span = alpha whatever N
    state = RingState(
        alphas, torch.zeros(layers, h).double(), sinks, sinks, page, 1 << 20, torch.device("cpu"), max_rows=requests
    )
    blocks = -(-int(blocks_needed(spans.long(), page, h).sum(0).max()) // layers)  # the group's blocks per request
    cell_map = CellMap(h, layers, h, h)  # block b's layer page j at layer page b + j: layers alias (docstring)
    cache = cells(torch.randn(requests * blocks + layers + 1, h, page, 2 * d))
    table = torch.arange(1, requests * blocks + 1, dtype=torch.int32).view(requests, blocks)
    batch = EngineContext().publish([f"r{i}" for i in range(requests)], [1 << 19] * requests)
    common = SimpleNamespace(
        num_reqs=requests,
        query_start_loc_cpu=torch.arange(requests + 1),
        seq_lens=torch.full((requests,), ctx + 1, dtype=torch.int32),
    )
    state.step_for(common, batch)
    state.fill(table)
    calls = [0]

    def step() -> None:
        if calls[0] % layers == 0:  # a new engine step: the all-layer part of the metadata again
            state.step.visible = None
        ring_forward(q, k, v, out, cache, cell_map, page, kernels, state.step, calls[0] % layers, sinks, d**-0.5)
        calls[0] += 1

    return step


def attention_rows(
    shape: AttentionShape,
    contexts: list[int],
    requests: int,
    repeats: int,
    layers: int,
    plan_spans: dict[int, torch.Tensor],
    label: str = "plan",
    rounds: int = 1,
) -> list[dict]:
    """Per-layer decode attention of `requests` rows at each context: stock, the moa path over the same bytes (every
    head's span = context + 1: a dense plan), and the moa path with a plan's spans plan_spans[context] [layers, H]
    (at least 2 x sinks)."""
    import torch

    rows = []
    for ctx in contexts:
        row = {
            "context": ctx,
            "requests": requests,
            "kv_heads": shape.heads,
            "group": shape.group,
            "head_dim": shape.head_dim,
            "rounds": rounds,
        }
        dense = torch.full((layers, shape.heads), ctx + 1)
        names = ("moa_same_bytes", f"moa_{label}_bytes")
        steps = {"stock": (_stock_step(shape, requests, ctx), repeats)}
        for name, spans in zip(names, (dense, plan_spans[ctx])):
            spans = torch.clamp(spans, min=2 * shape.sinks)
            steps[name] = (_moa_step(shape, requests, ctx, spans), repeats * layers)
            row[f"{name}_tokens_per_head"] = round(float(spans.double().mean()), 1)
        # Rounds, each timing every configuration once in a rotated order: the machine drifts by up to 30% between
        # runs, so each round's ratios are taken side by side and the medians over rounds reported.
        medians: dict[str, list[float]] = {key: [] for key in steps}
        order = list(steps)
        for i in range(rounds):
            for key in order[i % len(order) :] + order[: i % len(order)]:
                fn, n = steps[key]
                medians[key].append(_time(fn, n))
        row["stock_ms"] = round(statistics.median(medians["stock"]) * 1e3, 4)
        for name, kind in zip(names, ("same", label)):
            row[f"{name}_ms"] = round(statistics.median(medians[name]) * 1e3, 4)
            ratios = [m / s for m, s in zip(medians[name], medians["stock"])]
            row[f"ratio_{kind}_bytes"] = round(statistics.median(ratios), 3)
            row[f"ratio_{kind}_bytes_rounds"] = [round(r, 3) for r in ratios]
        print(row, flush=True)
        rows.append(row)
    return rows


def attention_part(contexts: list[int], requests: int, repeats: int, layers: int = 30) -> list[dict]:
    """Per-layer decode attention at the embedded model's shapes (3 KV heads, 9 query heads, head_dim 64, fp32,
    page 128), the moa path at the same bytes and at a quarter of them."""
    import torch

    quarter = {c: torch.full((layers, EMBEDDED.heads), int((c + 1) * 0.25)) for c in contexts}
    return attention_rows(EMBEDDED, contexts, requests, repeats, layers, quarter, "quarter")


# ---- engine parts ---------------------------------------------------------------------------------------------------
def _label(plan: str) -> str:
    return "stock vLLM (CPU_ATTN)" if plan == STOCK else Path(plan).stem


def equal_batch(model_dir: Path, plan: str, requests: int, context: int, gen: int) -> dict:
    from vllm import SamplingParams

    llm = make_llm(
        model_dir, plan, kv_gib=4, max_num_seqs=requests, max_num_batched_tokens=2048, enable_chunked_prefill=True
    )
    core, engine = core_of(llm), llm.llm_engine
    prompt = context - gen
    for i in range(requests):
        engine.add_request(
            f"e{i}",
            {"prompt_token_ids": [1000 + (i * 7 + j) % 5000 for j in range(prompt)]},
            SamplingParams(max_tokens=gen, ignore_eos=True),
        )
    steps = []
    while engine.has_unfinished_requests():
        running = list(core.scheduler.running)
        decoding = len(running) == requests and all(r.num_computed_tokens >= r.num_prompt_tokens for r in running)
        t0 = time.perf_counter()
        engine.step()
        if decoding:
            steps.append(time.perf_counter() - t0)
    close(llm)
    median = statistics.median(steps)
    return {
        "config": _label(plan),
        "requests": requests,
        "context": context,
        "decode_steps": len(steps),
        "decode_step_s_median": round(median, 5),
        "decode_tok_s": round(requests / median, 2),
    }


def main(argv: list[str] | None = None) -> int:
    import json

    argv = sys.argv[1:] if argv is None else argv
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("part", choices=["attention", "equal-batch"])
    ap.add_argument("--plans", nargs="*", default=None)
    ap.add_argument("--contexts", type=int, nargs="*", default=[1024, 2048, 4096, 8192])
    ap.add_argument("--requests", type=int, default=None)
    ap.add_argument("--context", type=int, default=4096)
    ap.add_argument("--gen", type=int, default=48)
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    meta = _meta(args.part, argv)
    if args.part == "attention":
        rows = attention_part(args.contexts, args.requests or 4, args.repeats or 50)
    else:
        from moa_vllm.model import prepare_embedded_model

        model_dir = prepare_embedded_model(progress=False)
        plans = (
            args.plans
            if args.plans is not None
            else [str(PLANS / f"{n}.json") for n in ("dense", "uniform-d0.25", "moa-d0.25")]
        )
        rows = []
        for plan in [STOCK, *plans]:
            rows.append(equal_batch(model_dir, plan, args.requests or 8, args.context, args.gen))
            print(rows[-1], flush=True)
        base = rows[0]
        for row in rows[1:]:
            row["step_vs_stock"] = round(row["decode_step_s_median"] / base["decode_step_s_median"], 3)
        meta |= {"dtype": "float32", "block_size": 128, "max_model_len": 8192}
    name = f"decode_speed_{args.part.replace('-', '_')}.json"
    (args.out / name).write_text(json.dumps(meta | {"results": rows}, indent=1))
    print(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
