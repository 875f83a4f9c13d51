"""The ring KV cache in the real vLLM engine (CPU wheel): bytes held per request against the plan's formula, and
max concurrency plus decode throughput of 8k-token requests at a fixed KV budget (--kv-cache-memory-bytes, which
the CPU worker takes instead of VLLM_CPU_KVCACHE_SPACE).

Usage:
  python benchmarks/ring_cache.py bytes [--plans P ...] [--prompt-lengths 1024 2048 4096 7936]
  python benchmarks/ring_cache.py concurrency [--plans P ...] [--kv-gib 0.4] [--requests 6] [--max-tokens 64]
Results: benchmarks/results/ring_cache_{bytes,concurrency}.json (+ ring_cache_bytes.png), each with its command.
"dense" in the concurrency part is stock vLLM (its own CPU attention backend, full KV cache), the baseline users have.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import sys
import time
from functools import partial
from pathlib import Path

os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # in-process engine core: its scheduler is readable
os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")

REPO = Path(__file__).resolve().parents[1]
PLANS = REPO / "plans" / "SmolLM2-135M-Instruct"
RESULTS = REPO / "benchmarks" / "results"
MAX_MODEL_LEN = 8192
BLOCK = 128  # vLLM's default block size on CPU; --block-size overrides
STOCK = "stock"  # plan name for stock vLLM without the plugin's backend


def default_plans() -> list[str]:
    names = ["dense", "uniform-d0.50", "uniform-d0.25", "moa-d0.50", "moa-d0.25"]
    return [str(PLANS / f"{n}.json") for n in names if (PLANS / f"{n}.json").exists()]


def make_llm(model_dir: Path, plan: str, kv_gib: float, **kwargs):
    from vllm import LLM

    moa = {} if plan == STOCK else {"attention_backend": "moa", "additional_config": {"moa": {"plan": plan}}}
    return LLM(
        model=str(model_dir),
        max_model_len=MAX_MODEL_LEN,
        dtype="float32",
        enforce_eager=True,
        block_size=BLOCK,
        seed=0,
        kv_cache_memory_bytes=int(kv_gib * 2**30),
        **moa,
        **kwargs,
    )


def close(llm) -> None:
    from vllm.distributed import cleanup_dist_env_and_memory

    llm.llm_engine.engine_core.shutdown()
    del llm
    gc.collect()
    cleanup_dist_env_and_memory()


def core_of(llm):
    return llm.llm_engine.engine_core.engine_core


def held_bytes(core, req_id: str) -> int:
    """Bytes a request holds: its blocks in every KV cache group times that group's bytes per block."""
    kv = core.scheduler.kv_cache_manager
    total = 0
    for group, manager in zip(core.scheduler.kv_cache_config.kv_cache_groups, kv.coordinator.single_type_managers):
        blocks = sum(not b.is_null for b in manager.req_to_blocks.get(req_id, []))
        total += blocks * group.kv_cache_spec.page_size_bytes * len(group.layer_names)
    return total


def plan_formula_bytes(plan_path: str, n: int, token_bytes: int) -> int:
    """The plan's own count: sum over (layer, KV head) of span tokens, times bytes per token per head."""
    from moa_vllm.plan import load_plan

    return load_plan(plan_path).kv_tokens(n) * token_bytes


def measure_bytes(model_dir: Path, plans: list[str], lengths: list[int], max_tokens: int) -> list[dict]:
    from vllm import SamplingParams

    rows = []
    for plan in plans:
        llm = make_llm(model_dir, plan, kv_gib=4, max_num_batched_tokens=256, enable_chunked_prefill=True)
        core, engine = core_of(llm), llm.llm_engine
        spec = core.scheduler.kv_cache_config.kv_cache_groups[0].kv_cache_spec
        token_bytes = 2 * spec.head_size * spec.dtype.itemsize  # K and V of one token of one head
        heads = spec.num_kv_heads * 30
        free0 = core.scheduler.kv_cache_manager.block_pool.get_num_free_blocks()
        for length in lengths:
            rid = engine.add_request(
                f"b{length}",
                {"prompt_token_ids": [1000 + i % 5000 for i in range(length)]},
                SamplingParams(max_tokens=max_tokens, ignore_eos=True),
            )
            engine.step()  # admission + the first 256-token chunk
            held = held_bytes(core, rid)
            engine.abort_request([rid], internal=True)  # add_request returns the internal (suffixed) id
            engine.step() if engine.has_unfinished_requests() else None
            n = min(length + max_tokens, MAX_MODEL_LEN)
            formula = plan_formula_bytes(plan, n, token_bytes)
            page_bytes = BLOCK * token_bytes
            rows.append(
                {
                    "plan": Path(plan).stem,
                    "prompt_tokens": length,
                    "n": n,
                    "held_bytes": held,
                    "formula_bytes": formula,
                    "excess_pages_per_head": round((held - formula) / page_bytes / heads, 3),
                    "free_blocks_restored": core.scheduler.kv_cache_manager.block_pool.get_num_free_blocks() == free0,
                }
            )
            print(rows[-1], flush=True)
        close(llm)
    return rows


def plot_bytes(rows: list[dict], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for plan in dict.fromkeys(r["plan"] for r in rows):
        pts = [r for r in rows if r["plan"] == plan]
        ax.plot([r["prompt_tokens"] for r in pts], [r["held_bytes"] / 2**20 for r in pts], "o-", label=f"{plan} held")
        ax.plot([r["prompt_tokens"] for r in pts], [r["formula_bytes"] / 2**20 for r in pts], "k:", lw=0.8)
    ax.set_xlabel("prompt tokens (+256 max_tokens)")
    ax.set_ylabel("KV MiB held per request")
    ax.set_title("Ring KV cache per request, SmolLM2-135M fp32 (CPU)\ndotted: the plan's formula", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)


def measure_concurrency(
    model_dir: Path, plan: str, kv_gib: float, requests: int, prompt: int, gen: int, make=None, stop_at_peak=False
) -> dict:
    """Submit `requests` 8k-token requests at once; record vLLM's own max-concurrency figure, the most requests
    it actually ran at once, and decode throughput while that many were decoding. `make` builds the engine
    (default: make_llm, the embedded model's settings). `stop_at_peak`: abort what is left once the peak's decode
    steps are measured and a request finished (the one extra request's prefill and decode measure nothing; the
    figures are the same, wall_s is shorter)."""
    from vllm import SamplingParams
    from vllm.v1.core.kv_cache_utils import get_max_concurrency_for_kv_cache_config

    llm = (make or make_llm)(
        model_dir,
        plan,
        kv_gib=kv_gib,
        max_num_seqs=max(requests, 1),
        max_num_batched_tokens=2048,
        enable_chunked_prefill=True,
    )
    core, engine = core_of(llm), llm.llm_engine
    sched = core.scheduler
    reported = get_max_concurrency_for_kv_cache_config(core.vllm_config, sched.kv_cache_config)
    requests = min(requests, int(reported) + 1)  # one more than fits: the cap shows without prefilling extras
    ids = [
        engine.add_request(
            f"c{i}",
            {"prompt_token_ids": [1000 + (i * 7 + j) % 5000 for j in range(prompt)]},
            SamplingParams(max_tokens=gen, ignore_eos=True),
        )
        for i in range(requests)
    ]
    max_running, decode_steps, preemptions = 0, [], 0
    start = time.perf_counter()
    while engine.has_unfinished_requests():
        running = list(sched.running)
        all_decoding = running and all(r.num_computed_tokens >= r.num_prompt_tokens for r in running)
        t0 = time.perf_counter()
        engine.step()
        dt = time.perf_counter() - t0
        max_running = max(max_running, len(running))
        if all_decoding and len(running) == max_running:
            decode_steps.append((len(running), dt))
        preemptions = max(preemptions, sum(getattr(r, "num_preemptions", 0) for r in running))
        if stop_at_peak and len(sched.running) < max_running and any(n == max_running for n, _ in decode_steps):
            engine.abort_request([f"c{i}" for i in range(requests)])
            break
    wall = time.perf_counter() - start
    peak = [dt for n, dt in decode_steps if n == max_running]
    close(llm)
    del ids
    return {
        "plan": Path(plan).stem if plan != STOCK else "dense (stock vLLM)",
        "kv_gib": kv_gib,
        "num_blocks": sched.kv_cache_config.num_blocks,
        "requests_submitted": requests,
        "vllm_max_concurrency": round(reported, 3),
        "max_running_observed": max_running,
        "decode_step_s_median": round(statistics.median(peak), 4) if peak else None,
        "decode_tok_s_at_max": round(max_running / statistics.median(peak), 2) if peak else None,
        "decode_steps_measured": len(peak),
        "preemptions": preemptions,
        "wall_s": round(wall, 1),
    }


def main(argv: list[str] | None = None) -> int:
    global BLOCK  # --block-size sets the block size every engine of this run uses
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("part", choices=["bytes", "concurrency"])
    ap.add_argument("--plans", nargs="*", default=None)
    ap.add_argument("--prompt-lengths", type=int, nargs="*", default=[1024, 2048, 4096, 7936])
    ap.add_argument("--max-tokens", type=int, default=256)
    ap.add_argument("--kv-gib", type=float, default=0.4)
    ap.add_argument("--requests", type=int, default=6, help="at most this many, and one more than vLLM says fit")
    ap.add_argument("--block-size", type=int, default=BLOCK)
    ap.add_argument(
        "--kv-cache-dtype",
        nargs="+",
        default=["auto"],
        help="concurrency: run every configuration at each of these (auto, fp8, fp8_e4m3, fp8_e5m2); "
        "--requests 0 reports vLLM's max concurrency only",
    )
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    BLOCK = args.block_size
    from moa_vllm.model import prepare_embedded_model

    model_dir = prepare_embedded_model(progress=False)
    plans = args.plans if args.plans is not None else default_plans()
    meta = {
        "command": "python benchmarks/ring_cache.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "device": f"CPU ({platform.machine()}, {os.cpu_count()} cores)",
        "dtype": "float32",
        "block_size": BLOCK,
        "max_model_len": MAX_MODEL_LEN,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    if args.part == "bytes":
        rows = measure_bytes(model_dir, plans, args.prompt_lengths, args.max_tokens)
        name = "ring_cache_bytes" if BLOCK == 128 else f"ring_cache_bytes_block{BLOCK}"
        (args.out / f"{name}.json").write_text(json.dumps(meta | {"results": rows}, indent=1))
        plot_bytes(rows, args.out / f"{name}.png")
    else:
        prompt = MAX_MODEL_LEN - args.max_tokens
        rows = []
        for kv in args.kv_cache_dtype:
            make = partial(make_llm, kv_cache_dtype=kv)
            for plan in [STOCK, *plans]:
                row = measure_concurrency(model_dir, plan, args.kv_gib, args.requests, prompt, args.max_tokens, make)
                rows.append(row | {"kv_cache_dtype": kv})
                print(rows[-1], flush=True)
        meta |= {"prompt_tokens": prompt, "max_tokens": args.max_tokens}
        name = "ring_cache_concurrency" + ("" if args.kv_cache_dtype == ["auto"] else "_kv_dtypes")
        (args.out / f"{name}.json").write_text(json.dumps(meta | {"results": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
