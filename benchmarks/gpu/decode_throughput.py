"""Decode throughput on a GPU: moa plans against stock vLLM FLASH_ATTN, at equal KV budget and at equal batch.

Needs the vLLM GPU wheel (0.32.x) and a model folder (default: the embedded model, `moa-vllm model prepare`).
For each context length C (prompts of C random tokens, `--gen` tokens each, ignore_eos), one engine per
configuration at one pinned KV budget (`--kv-gib`):
  equal-batch   `--batch` requests, few enough that every configuration holds them all at once;
  equal-budget  `--requests` prompts submitted at once: the engine admits as many as fit (MoA: the plan's ring
                sizes; stock: C + gen tokens each), so the freed memory becomes concurrency.
Decode tok/s = requests x (gen - 1) / (T(gen) - T(1)), T(k) the wall time of the same prompts with max_tokens=k,
so prefill cancels out. The embedded model is trained to 8k positions; longer contexts extend
max_position_embeddings through hf_overrides (quality is irrelevant here, speed is not).

    python -m benchmarks.gpu.decode_throughput --out benchmarks/results/gpu/decode_throughput.json
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PLANS = REPO / "plans" / "SmolLM2-135M-Instruct"
STOCK = "stock-FLASH_ATTN"


def make_llm(model: str, config: str, max_len: int, kv_bytes: int, max_seqs: int, dtype: str, eager: bool):
    from vllm import LLM

    kwargs = dict(
        model=model,
        max_model_len=max_len,
        dtype=dtype,
        seed=0,
        kv_cache_memory_bytes=kv_bytes,
        max_num_seqs=max_seqs,
        enforce_eager=eager,
        hf_overrides={"max_position_embeddings": max(max_len, 8192)},
        enable_prefix_caching=False,
    )
    if config == STOCK:
        kwargs["attention_backend"] = "FLASH_ATTN"
    else:
        kwargs.update(attention_backend="moa", additional_config={"moa": {"plan": config}})
    return LLM(**kwargs)


def close(llm) -> None:
    import torch
    from vllm.distributed import cleanup_dist_env_and_memory

    del llm
    gc.collect()
    cleanup_dist_env_and_memory()
    torch.cuda.empty_cache()


def timed_generate(llm, prompts: list[list[int]], max_tokens: int) -> float:
    from vllm import SamplingParams

    params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
    start = time.perf_counter()
    llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    return time.perf_counter() - start


def measure(llm, prompts: list[list[int]], gen: int) -> dict:
    timed_generate(llm, prompts[:2], 4)  # warm-up (compilation, graphs)
    t1 = timed_generate(llm, prompts, 1)
    tg = timed_generate(llm, prompts, gen)
    return {
        "requests": len(prompts),
        "t_first_token_s": t1,
        "t_all_s": tg,
        "decode_tok_s": len(prompts) * (gen - 1) / max(tg - t1, 1e-9),
        "total_tok_s": len(prompts) * gen / tg,
    }


def random_prompts(count: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    import torch

    gen = torch.Generator().manual_seed(seed)
    return torch.randint(100, vocab - 100, (count, length), generator=gen).tolist()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="model folder (default: the embedded model)")
    ap.add_argument("--plans", nargs="+", default=[str(PLANS / "moa-d0.50.json"), str(PLANS / "moa-d0.25.json")])
    ap.add_argument("--contexts", nargs="+", type=int, default=[8192, 32768])
    ap.add_argument("--gen", type=int, default=128)
    ap.add_argument("--kv-gib", type=float, default=6.5, help="the pinned KV budget of every engine")
    ap.add_argument("--requests", type=int, nargs="+", default=[128, 40], help="equal-budget requests per context")
    ap.add_argument("--batch", type=int, default=8, help="equal-batch requests (must fit dense at the budget)")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--eager", action="store_true", help="no CUDA graphs (compare with the default)")
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks/results/gpu/decode_throughput.json")
    args = ap.parse_args(argv)
    if args.model is None:
        from moa_vllm.model import prepare_embedded_model

        args.model = str(prepare_embedded_model())
    from transformers import AutoConfig

    vocab = AutoConfig.from_pretrained(args.model).vocab_size
    kv_bytes = int(args.kv_gib * 2**30)
    rows = []
    for context, requests in zip(args.contexts, args.requests * len(args.contexts)):
        prompts = random_prompts(max(requests, args.batch), context, vocab, seed=context)
        for config in [STOCK, *args.plans]:
            llm = make_llm(
                args.model, config, context + args.gen, kv_bytes, max(requests, args.batch), args.dtype, args.eager
            )
            for mode, count in (("equal-batch", args.batch), ("equal-budget", requests)):
                row = {"context": context, "mode": mode, "config": Path(config).name, "kv_bytes": kv_bytes}
                row.update(measure(llm, prompts[:count], args.gen))
                rows.append(row)
                print(json.dumps(row), flush=True)
            close(llm)
    for row in rows:
        same = (row["context"], row["mode"])
        stock = next(r for r in rows if r["config"] == STOCK and (r["context"], r["mode"]) == same)
        row["decode_vs_stock"] = row["decode_tok_s"] / stock["decode_tok_s"]
    import torch

    result = {
        "command": " ".join(["python -m benchmarks.gpu.decode_throughput", *(argv or sys.argv[1:])]),
        "device": torch.cuda.get_device_name(),
        "dtype": args.dtype,
        "cuda_graphs": not args.eager,
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
