"""The grid: for each configuration one server at the pinned KV budget; for each (input, output) length a
concurrency sweep up to that configuration's own maximum at that length; `bench serve` for each point.

    python -m benchmarks.serve --plans plans/SmolLM2-135M-Instruct/uniform-d0.25.json \\
        plans/SmolLM2-135M-Instruct/moa-d0.25.json --input-lens 1024 4096 8000 --output-lens 64 --kv-gib 1

Results (resumable: a point whose JSON exists is not run again):
  <out>/runs/<config>/in<I>-out<O>-c<C>.json   vLLM's full bench result + the harness's fields
  <out>/summary.json, summary.md, throughput_vs_concurrency.png, tpot_vs_context.png
Progress is shown per point (rich). Servers bind to 127.0.0.1; every run is followed by a check that vLLM's KV
usage comes back to 0.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
from pathlib import Path

from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from benchmarks.serve import capacity, report
from benchmarks.serve.client import run_bench
from benchmarks.serve.server import Config, UsageSampler, start
from moa_vllm.server_process import stop, wait_kv_idle

REPO = Path(__file__).resolve().parents[2]
PLANS = REPO / "plans" / "SmolLM2-135M-Instruct"
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


def configs(plans: list[str], stock: bool, stock_fp8: bool = False, kv_cache_dtype: str = "auto") -> list[Config]:
    """Stock vLLM dense (its own backend), stock with an fp8 KV cache (what a user short of memory picks instead),
    then each plan; the plans' caches in kv_cache_dtype (their names say so when it is not auto)."""
    out = [Config("stock-dense", None)] if stock else []
    out += [Config("stock-dense-fp8", None, kv_cache_dtype="fp8")] if stock_fp8 else []
    suffix = "" if kv_cache_dtype == "auto" else f"-{kv_cache_dtype}"
    return out + [Config(Path(p).stem + suffix, p, kv_cache_dtype=kv_cache_dtype) for p in plans]


def cache_bytes(config: Config, dtype: str) -> int:
    """Bytes of one cached K or V value: one for an fp8 cache, else the model dtype's."""
    return 1 if config.kv_cache_dtype.startswith("fp8") else DTYPE_BYTES[dtype]


def plan_points(args, config: Config, model: str) -> list[dict]:
    per_token, layer_heads = capacity.token_bytes(model, cache_bytes(config, args.dtype))
    budget = int(args.kv_gib * 2**30)
    points = []
    for n_in in args.input_lens:
        for n_out in args.output_lens:
            most = capacity.max_requests(budget, config.plan, n_in + n_out, per_token, layer_heads, args.block)
            most = min(most, args.max_concurrency)
            for c in capacity.sweep(most, args.concurrency):
                points.append(
                    dict(input_len=n_in, output_len=n_out, concurrency=c, max_for_budget=most,
                         num_prompts=max(args.min_prompts, c * args.prompts_per_slot), seed=args.seed)
                )  # fmt: skip
    return points


def run_config(args, config: Config, model: str, runs_dir: Path, logs: Path, progress, task) -> list[dict]:
    points = plan_points(args, config, model)
    todo = [p for p in points if not _result_path(runs_dir, config, p).exists()]
    rows = [json.loads(_result_path(runs_dir, config, p).read_text())["harness"] for p in points if p not in todo]
    progress.update(task, advance=len(points) - len(todo))
    if not todo:
        return rows
    server = start(model, config, int(args.kv_gib * 2**30), args.max_model_len, args.dtype, logs / f"{config.name}.log")
    try:
        cap = server.capacity()
        for point in todo:
            progress.update(task, description=f"{config.name} in={point['input_len']} c={point['concurrency']}")
            result = _result_path(runs_dir, config, point)
            result.parent.mkdir(parents=True, exist_ok=True)
            with UsageSampler(server.port) as usage:
                figures = run_bench(server.port, model, point, result)
            row = {"config": config.name, **point, **figures, **cap, "kv_usage_peak": usage.peak,
                   "kv_usage_after": wait_kv_idle(server.port)}  # fmt: skip
            full = json.loads(result.read_text())
            result.write_text(json.dumps({**full, "harness": row}, indent=1))
            rows.append(row)
            progress.update(task, advance=1)
    finally:
        stop(server.proc)
    return rows


def _result_path(runs_dir: Path, config: Config, point: dict) -> Path:
    name = f"in{point['input_len']}-out{point['output_len']}-c{point['concurrency']}.json"
    return runs_dir / config.name / name


def _device() -> str:
    """What the servers ran on (they use this machine's accelerator if it has one)."""
    import torch

    if torch.cuda.is_available():
        return f"GPU ({torch.cuda.get_device_name()})"
    return f"CPU ({platform.machine()}, {os.cpu_count()} cores)"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="model folder (default: the embedded model)")
    ap.add_argument("--plans", nargs="*", default=[str(PLANS / "uniform-d0.25.json"), str(PLANS / "moa-d0.25.json")])
    ap.add_argument("--no-stock", action="store_true", help="skip the stock vLLM dense baseline")
    ap.add_argument("--stock-fp8", action="store_true", help="add stock vLLM dense with --kv-cache-dtype fp8")
    ap.add_argument(
        "--kv-cache-dtype", default="auto", choices=["auto", "fp8", "fp8_e4m3", "fp8_e5m2"],
        help="the plans' KV cache dtype (fp8: CPU with AVX-512 or AMX)",
    )  # fmt: skip
    ap.add_argument("--input-lens", nargs="+", type=int, default=[1024, 4096, 8000])
    ap.add_argument("--output-lens", nargs="+", type=int, default=[64])
    ap.add_argument("--concurrency", nargs="*", type=int, default=None, help="levels (default: 1, 2, 4, ..., max)")
    ap.add_argument("--max-concurrency", type=int, default=64, help="cap on any sweep")
    ap.add_argument("--prompts-per-slot", type=int, default=2, help="prompts per concurrency level = this x level")
    ap.add_argument("--min-prompts", type=int, default=2)
    ap.add_argument("--kv-gib", type=float, default=1.0, help="the pinned KV budget of every server")
    ap.add_argument("--max-model-len", type=int, default=8192)
    ap.add_argument("--block", type=int, default=32, help="KV block size (tokens) of the budget arithmetic")
    ap.add_argument("--dtype", default="float32", choices=sorted(DTYPE_BYTES))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "serve")
    args = ap.parse_args(argv)
    if args.model is None:
        from moa_vllm.model import prepare_embedded_model

        args.model = str(prepare_embedded_model(progress=False))
    runs_dir = args.out / "runs"
    logs = Path(tempfile.mkdtemp(prefix="moa-bench-serve-"))  # server logs stay out of the repository
    chosen = configs(args.plans, not args.no_stock, args.stock_fp8, args.kv_cache_dtype)
    total = sum(len(plan_points(args, c, args.model)) for c in chosen)
    rows: list[dict] = []
    columns = [TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
               TimeElapsedColumn()]  # fmt: skip
    with Progress(*columns) as progress:
        task = progress.add_task("bench serve", total=total)
        for config in chosen:
            rows += run_config(args, config, args.model, runs_dir, logs, progress, task)
    device = _device()
    meta = {"command": "python -m benchmarks.serve " + " ".join(argv), "device": device, "dtype": args.dtype,
            "kv_gib": args.kv_gib, "max_model_len": args.max_model_len, "server_logs": str(logs)}  # fmt: skip
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "summary.json").write_text(json.dumps({**meta, "rows": rows}, indent=1))
    (args.out / "summary.md").write_text(f"`{meta['command']}` ({device}, {args.dtype}, KV {args.kv_gib} GiB)\n\n"
                                         + report.table(rows) + "\n")  # fmt: skip
    report.plot(rows, args.out, f"{device}, KV {args.kv_gib} GiB")
    print(report.table(rows))
    return 0
