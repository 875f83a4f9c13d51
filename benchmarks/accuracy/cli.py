"""`python -m benchmarks.accuracy`: passkey grid + fidelity to dense for a list of plans, one engine per plan."""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shlex
import sys
import time
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path
from statistics import mean

from benchmarks.accuracy.engine import EngineSettings, PlanRun, run_plan
from benchmarks.accuracy.fidelity import TopK, compare, fidelity_texts, load_topks, save_topks
from benchmarks.accuracy.plots import plot_heatmap
from benchmarks.accuracy.results import case_record, cells, passkey_summary
from benchmarks.accuracy.summary import RESULT_KIND, load_results, render
from benchmarks.accuracy.tasks import PasskeyCase, build_grid
from moa_vllm.plan import Plan, load_plan

REPO = Path(__file__).resolve().parents[2]
PLANS = REPO / "plans" / "SmolLM2-135M-Instruct"
CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "moa-vllm" / "accuracy"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.accuracy", description=__doc__)
    p.add_argument("--plans", nargs="+", type=Path, default=[], help="plan files, run in order (one engine each)")
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "accuracy")
    p.add_argument("--reference", type=Path, default=PLANS / "dense.json", help="fidelity and ratio baseline")
    p.add_argument(
        "--uniform",
        nargs="*",
        type=Path,
        default=[PLANS / "uniform-d0.50.json", PLANS / "uniform-d0.25.json"],
        help="plans whose window decides 'key outside the uniform window'",
    )
    p.add_argument("--model", type=Path, default=None, help="HF folder (default: the embedded model)")
    p.add_argument("--lengths", nargs="+", type=int, default=[1024, 2048, 4096])
    p.add_argument("--depths", nargs="+", type=float, default=[0.1, 0.35, 0.6, 0.85])
    p.add_argument("--seeds", type=int, default=1, help="prompts per (length, depth) cell")
    p.add_argument("--seeds-at", nargs="*", default=[], metavar="LEN=K", help="per-length override of --seeds")
    p.add_argument("--format", dest="prompt_format", choices=["chat", "plain"], default="chat")
    p.add_argument("--answer-tokens", type=int, default=16)
    p.add_argument("--fidelity-tokens", type=int, default=2048)
    p.add_argument("--fidelity-texts", type=int, default=2)
    p.add_argument("--topk", type=int, default=20)
    p.add_argument("--max-model-len", type=int, default=8192)
    p.add_argument(
        "--kv-cache-dtype",
        default="auto",
        choices=["auto", "fp8", "fp8_e4m3", "fp8_e5m2"],
        help="the listed plans' KV cache dtype (results named <plan>-<dtype>); the reference's logprobs stay "
        "unquantized",
    )
    p.add_argument(
        "--stock", action="store_true", help="also run stock vLLM (its own backend; records as the reference plan)"
    )
    p.add_argument("--summary-only", action="store_true", help="only rebuild summary.md from the JSON in --out")
    return p.parse_args(argv)


def seeds_per_length(args: argparse.Namespace) -> dict[int, int]:
    seeds = dict.fromkeys(args.lengths, args.seeds)
    for item in args.seeds_at:
        length, count = item.split("=")
        seeds[int(length)] = int(count)
    return seeds


def reference_cache(reference: Path, texts: list[list[int]], topk: int) -> Path:
    """Where the reference plan's top-k logprobs are kept, keyed by plan content, texts and k."""
    digest = hashlib.sha256(reference.read_bytes())
    digest.update(json.dumps([texts, topk]).encode())
    return CACHE / f"reference-{digest.hexdigest()[:16]}.npz"


def run_order(plans: list[Path], reference: Path, cached: bool) -> list[Path]:
    """The reference first when its logprobs are needed and not cached; every plan once."""
    plans = [p.resolve() for p in plans]
    reference = reference.resolve()
    ordered = list(dict.fromkeys(plans))
    if reference in ordered:
        ordered.remove(reference)
        return [reference, *ordered]
    return ordered if cached else [reference, *ordered]


STOCK = None  # a job's plan path for stock vLLM


def jobs(
    plans: list[Path], reference: Path, cached: bool, kv_cache_dtype: str = "auto", stock: bool = False
) -> list[tuple[Path | None, str]]:
    """(plan or STOCK, KV cache dtype) per engine. Unquantized: run_order. Quantized: the reference first,
    unquantized, when its logprobs are not cached (they are the fidelity baseline), then every listed plan."""
    extra = [(STOCK, kv_cache_dtype)] if stock else []
    if kv_cache_dtype == "auto":
        return [(p, "auto") for p in run_order(plans, reference, cached)] + extra
    first = [] if cached else [(reference.resolve(), "auto")]
    return first + extra + [(p, kv_cache_dtype) for p in dict.fromkeys(p.resolve() for p in plans)]


def fidelity_record(ref: list[TopK], run: list[TopK], sources: list[str], tail_from: int) -> dict:
    per_text = [{"source": s, **compare(r, o, tail_from)} for s, r, o in zip(sources, ref, run)]
    keys = [k for k, v in per_text[0].items() if isinstance(v, float)]
    return {"texts": per_text, "mean": {"tail_from": tail_from, **{k: mean(t[k] for t in per_text) for k in keys}}}


def result_name(path: Path | None, kv_cache_dtype: str) -> str:
    return ("stock-vllm" if path is STOCK else path.stem) + ("" if kv_cache_dtype == "auto" else f"-{kv_cache_dtype}")


def plan_record(path: Path, plan: Plan, lengths: list[int], name: str | None = None) -> dict:
    return {
        "name": name or path.stem,
        "path": str(path.relative_to(REPO)) if path.is_relative_to(REPO) else str(path),
        "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
        "method": plan.metadata.method,
        "density_targets": plan.metadata.density_targets,
        "density_at": {str(n): round(plan.density(n), 4) for n in lengths},
    }


def device_label() -> str:
    return f"CPU ({os.cpu_count()} cores, {platform.machine()}), shared machine"


def evaluate_plan(
    args: argparse.Namespace,
    settings: EngineSettings,
    path: Path | None,
    cases: list[PasskeyCase],
    texts: list[tuple[str, list[int]]],
    uniform: dict[str, Plan],
    cache: Path,
) -> dict:
    """Run one plan (or STOCK: vLLM's own backend, recorded with the reference plan's spans) through the engine and
    turn its outputs into the plan's result record."""
    import vllm

    plan_path = args.reference.resolve() if path is STOCK else path
    plan = load_plan(plan_path)
    start = time.perf_counter()
    prompts = [c.prompt_ids for c in cases]
    run: PlanRun = run_plan(settings, path, prompts, args.answer_tokens, [t for _, t in texts])
    total = time.perf_counter() - start
    if path == args.reference.resolve() and settings.kv_cache_dtype == "auto":
        save_topks(cache, run.topks)
    records = [
        case_record(c, a, plan, uniform, args.answer_tokens, args.max_model_len) for c, a in zip(cases, run.answers)
    ]
    tail_from = args.fidelity_tokens // 2
    return {
        "kind": RESULT_KIND,
        "command": "python -m benchmarks.accuracy " + shlex.join(sys.argv[1:]),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "device": device_label(),
        "vllm_version": vllm.__version__,
        "model": settings.model_dir.name,
        "plan": plan_record(plan_path, plan, args.lengths, result_name(path, settings.kv_cache_dtype)),
        "settings": {
            "prompt_format": args.prompt_format,
            "answer_tokens": args.answer_tokens,
            "fidelity_tokens": args.fidelity_tokens,
            "topk": args.topk,
            "max_model_len": args.max_model_len,
            "max_num_batched_tokens": settings.max_num_batched_tokens,
            "max_num_seqs": settings.max_num_seqs,
            "dtype": "float32",
            "kv_cache_dtype": settings.kv_cache_dtype,
            "backend": "vLLM's own" if path is STOCK else "moa",
            "sampling": "greedy",
        },
        "wall_s": {"engine_start": run.engine_start_s, "generate": run.generate_s, "total": round(total, 2)},
        "grid": {"lengths": args.lengths, "depths": args.depths, "seeds": seeds_per_length(args)},
        "passkey": passkey_summary(records),
        "cells": cells(records),
        "fidelity": {
            "reference": args.reference.stem,
            **fidelity_record(load_topks(cache), run.topks, [s for s, _ in texts], tail_from),
        },
        "cases": records,
    }


def write_summary(out: Path, reference: str) -> Path:
    results = load_results(out)
    path = out / "summary.md"
    if results:
        path.write_text(render(results, reference))
    return path


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.summary_only:
        print(write_summary(args.out, args.reference.stem))
        return
    from transformers import AutoTokenizer

    from moa_vllm.model import prepare_embedded_model

    model_dir = args.model or prepare_embedded_model(progress=False)
    settings = EngineSettings(model_dir=Path(model_dir), max_model_len=args.max_model_len, topk=args.topk)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    cases = build_grid(
        tokenizer, args.lengths, args.depths, seeds_per_length(args), args.answer_tokens, args.prompt_format
    )
    texts = fidelity_texts(tokenizer, args.fidelity_tokens, args.fidelity_texts)
    uniform = {p.stem: load_plan(p) for p in args.uniform}
    cache = reference_cache(args.reference, [t for _, t in texts], args.topk)
    for path, kv in jobs(args.plans, args.reference, cache.is_file(), args.kv_cache_dtype, args.stock):
        result = evaluate_plan(args, replace(settings, kv_cache_dtype=kv), path, cases, texts, uniform, cache)
        name = result["plan"]["name"]
        (args.out / f"{name}.json").write_text(json.dumps(result, indent=1) + "\n")
        plot_heatmap(result, args.out / f"{name}.png")
        print(
            f"{name}: passkey {result['passkey']['accuracy']:.3f}, top-1 "
            f"{result['fidelity']['mean']['top1_agreement']:.3f}, {result['wall_s']['total']:.0f} s",
            flush=True,
        )
    print(write_summary(args.out, args.reference.stem))
