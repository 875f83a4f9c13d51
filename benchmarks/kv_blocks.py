"""Live KV blocks of one request, read from vLLM's own KV cache manager after every engine step (CPU wheel).

Usage: python benchmarks/kv_blocks.py [--prompt-tokens 4096] [--max-tokens 256] [--plans P ...] [--out FILE]
The result JSON records the command, per-plan traces and the peak/final blocks and bytes held by the request.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import sys
import time
from pathlib import Path

os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # in-process engine core: its scheduler is readable
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")

REPO = Path(__file__).resolve().parents[1]
PLANS = REPO / "plans" / "SmolLM2-135M-Instruct"
DEFAULT_PLANS = [PLANS / "dense.json", PLANS / "uniform-d0.50.json", PLANS / "uniform-d0.25.json"]


def held(core, req_id: str) -> tuple[int, int]:
    """(blocks, bytes) the request holds across all KV cache groups."""
    kv = core.scheduler.kv_cache_manager
    config = core.scheduler.kv_cache_config
    blocks = nbytes = 0
    for group, manager in zip(config.kv_cache_groups, kv.coordinator.single_type_managers):
        live = sum(not b.is_null for b in manager.req_to_blocks.get(req_id, []))
        blocks += live
        nbytes += live * group.kv_cache_spec.page_size_bytes * len(group.layer_names)
    return blocks, nbytes


def trace_plan(model_dir: Path, plan: Path, prompt: list[int], max_tokens: int, max_model_len: int) -> dict:
    from vllm import LLM, SamplingParams
    from vllm.distributed import cleanup_dist_env_and_memory

    llm = LLM(
        model=str(model_dir),
        max_model_len=max_model_len,
        dtype="float32",
        enforce_eager=True,
        attention_backend="moa",
        additional_config={"moa": {"plan": str(plan)}},
        max_num_seqs=4,
    )
    core = llm.llm_engine.engine_core.engine_core
    engine = llm.llm_engine
    params = SamplingParams(max_tokens=max_tokens, ignore_eos=True)
    req_id = engine.add_request("r", {"prompt_token_ids": prompt}, params)  # vLLM's internal id
    steps, start = [], time.perf_counter()
    while engine.has_unfinished_requests():
        engine.step()
        if engine.has_unfinished_requests():
            steps.append(held(core, req_id))
    elapsed = time.perf_counter() - start
    free_after = core.scheduler.kv_cache_manager.block_pool.get_num_free_blocks()
    total = core.scheduler.kv_cache_config.num_blocks
    block_size = core.scheduler.kv_cache_config.kv_cache_groups[0].kv_cache_spec.block_size
    llm.llm_engine.engine_core.shutdown()
    del llm, core, engine
    gc.collect()
    cleanup_dist_env_and_memory()
    blocks = [b for b, _ in steps]
    return {
        "plan": str(plan.relative_to(REPO)),
        "block_size": block_size,
        "blocks_after_prefill": blocks[0],
        "blocks_peak": max(blocks),
        "blocks_final": blocks[-1],
        "bytes_peak": max(b for _, b in steps),
        "bytes_final": steps[-1][1],
        "free_blocks_after_finish": free_after,
        "usable_blocks": total - 1,  # block 0 is vLLM's null block
        "generation_s": round(elapsed, 2),
        "trace_blocks": blocks,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--prompt-tokens", type=int, default=4096)
    ap.add_argument("--max-tokens", type=int, default=256)
    ap.add_argument("--plans", nargs="*", type=Path, default=DEFAULT_PLANS)
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "kv_blocks.json")
    args = ap.parse_args()

    from transformers import AutoTokenizer

    from moa_vllm.data import natural_prompt
    from moa_vllm.model import prepare_embedded_model
    from moa_vllm.plan import load_plan

    model_dir = prepare_embedded_model()
    prompt = natural_prompt(AutoTokenizer.from_pretrained(model_dir), args.prompt_tokens, seed=0)
    n = args.prompt_tokens + args.max_tokens
    results = []
    for plan in args.plans:
        res = trace_plan(model_dir, plan.resolve(), prompt, args.max_tokens, max_model_len=n)
        res["plan_kv_tokens_per_layer_head"] = max(s for layer in load_plan(plan).spans(n) for s in layer)
        results.append(res)
        print(
            f"{res['plan']}: blocks after prefill {res['blocks_after_prefill']}, peak {res['blocks_peak']}, "
            f"final {res['blocks_final']}, bytes peak {res['bytes_peak'] / 2**20:.1f} MiB",
            flush=True,
        )
    out = {
        "command": "python " + " ".join([os.path.relpath(sys.argv[0], REPO), *sys.argv[1:]]),
        "device": f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)",
        "prompt_tokens": args.prompt_tokens,
        "max_tokens": args.max_tokens,
        "max_model_len": n,
        "results": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
