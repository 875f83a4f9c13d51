"""The real OpenAI server under `vllm bench serve` load: stock vLLM vs the moa backend with shipped plans (CPU).

Each configuration's server (loopback, float32, max_model_len 8192, the same KV budget) is started, driven by vLLM's
own serving benchmark client (`vllm.benchmarks.serve`; the CPU wheel's `vllm bench` script is broken, its Python
entry works) with random prompts, fixed seed, --ignore-eos, and stopped. Results: TPOT / ITL / TTFT / e2e
percentiles, request and token throughput, per configuration, in benchmarks/results/serve_load.json.

Usage: python benchmarks/serve_load.py [--plans P ...] [--input-len 4096] [--output-len 128] [--concurrency 8]
       [--num-prompts 8] [--kv-gib 4]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PLANS = REPO / "plans" / "SmolLM2-135M-Instruct"
RESULTS = REPO / "benchmarks" / "results"
sys.path.insert(0, str(REPO))

from tests.server_process import free_port, stop, wait_ready  # noqa: E402  (the tests' loopback server helpers)

KEEP = (
    "completed",
    "failed",
    "duration",
    "request_throughput",
    "output_throughput",
    "total_token_throughput",
    "max_concurrent_requests",
)


def start_server(model: str, plan: str | None, port: int, kv_gib: float, log: Path) -> subprocess.Popen:
    common = ["--port", str(port), "--dtype", "float32", "--max-model-len", "8192", "--served-model-name", "smol"]
    if plan is None:  # stock vLLM: its own server and attention backend
        cmd = [
            sys.executable,
            "-m",
            "vllm.entrypoints.openai.api_server",
            "--model",
            model,
            "--host",
            "127.0.0.1",
            *common,
        ]
    else:
        cmd = [sys.executable, "-m", "moa_vllm.cli", "serve", model, "--plan", plan, *common]
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": str(kv_gib), "VLLM_CPU_NUM_OF_RESERVED_CPU": "0"}
    return subprocess.Popen(cmd, env=env, stdout=open(log, "w"), stderr=subprocess.STDOUT)


def bench(model: str, port: int, args, result_dir: Path, name: str) -> dict:
    from vllm.benchmarks.serve import add_cli_args
    from vllm.benchmarks.serve import main as bench_main
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = FlexibleArgumentParser()
    add_cli_args(parser)
    bench_args = parser.parse_args(
        [
            "--backend",
            "openai",
            "--base-url",
            f"http://127.0.0.1:{port}",
            "--endpoint",
            "/v1/completions",
            "--model",
            "smol",
            "--tokenizer",
            model,
            "--dataset-name",
            "random",
            "--random-input-len",
            str(args.input_len),
            "--random-output-len",
            str(args.output_len),
            "--num-prompts",
            str(args.num_prompts),
            "--max-concurrency",
            str(args.concurrency),
            "--ignore-eos",
            "--seed",
            "0",
            "--percentile-metrics",
            "ttft,tpot,itl,e2el",
            "--metric-percentiles",
            "50,90,99",
            "--save-result",
            "--result-dir",
            str(result_dir),
            "--result-filename",
            f"{name}.json",
        ]
    )
    result = bench_main(bench_args)
    keep = {k: result[k] for k in KEEP if k in result}
    keep |= {
        k: round(v, 2)
        for k, v in result.items()
        if k.startswith(("median_", "p90_", "p99_", "mean_")) and isinstance(v, float)
    }
    return keep


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--plans", nargs="*", default=[str(PLANS / "moa-d0.50.json"), str(PLANS / "moa-d0.25.json")])
    ap.add_argument("--input-len", type=int, default=4096)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--num-prompts", type=int, default=8)
    ap.add_argument("--kv-gib", type=float, default=4)
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    from moa_vllm.model import prepare_embedded_model

    model = str(prepare_embedded_model(progress=False))
    raw = args.out / "serve_load_raw"  # vLLM's own per-run result JSON
    raw.mkdir(parents=True, exist_ok=True)
    logs = Path(tempfile.mkdtemp(prefix="moa-serve-load-"))  # server logs stay out of the repository
    rows = []
    for plan in [None, *args.plans]:
        name = "stock" if plan is None else Path(plan).stem
        port = free_port()
        proc = start_server(model, plan, port, args.kv_gib, logs / f"{name}.log")
        try:
            wait_ready(proc, port, timeout_s=600)
            row = {"config": "stock vLLM (CPU_ATTN)" if plan is None else name} | bench(model, port, args, raw, name)
        finally:
            stop(proc)
        print(row, f"(server log: {logs / (name + '.log')})", flush=True)
        rows.append(row)
    meta = {
        "command": "python benchmarks/serve_load.py " + " ".join(argv),
        "device": f"CPU ({platform.machine()}, {os.cpu_count()} cores)",
        "dtype": "float32",
        "input_len": args.input_len,
        "output_len": args.output_len,
        "concurrency": args.concurrency,
        "num_prompts": args.num_prompts,
        "kv_gib": args.kv_gib,
    }
    (args.out / "serve_load.json").write_text(json.dumps(meta | {"results": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
