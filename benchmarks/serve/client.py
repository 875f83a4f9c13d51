"""vLLM's own serving benchmark client (`vllm bench serve`) called from Python: the CPU wheel's console script is
broken, its module's add_cli_args + main work."""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

from benchmarks.serve.server import SERVED_NAME

KEEP = (
    "completed",
    "failed",
    "duration",
    "request_throughput",
    "output_throughput",
    "total_token_throughput",
    "max_concurrent_requests",
)


def dataset_argv(run: dict) -> list[str]:
    """vLLM's random dataset (the default), or its prefix_repetition one when the run names it."""
    if run.get("dataset") == "prefix_repetition":
        return [
            "--dataset-name", "prefix_repetition", "--prefix-repetition-prefix-len", str(run["prefix_len"]),
            "--prefix-repetition-suffix-len", str(run["suffix_len"]),
            "--prefix-repetition-num-prefixes", str(run["num_prefixes"]),
            "--prefix-repetition-output-len", str(run["output_len"]),
        ]  # fmt: skip
    return [
        "--dataset-name", "random", "--random-input-len", str(run["input_len"]),
        "--random-output-len", str(run["output_len"]), "--random-range-ratio", "0",
    ]  # fmt: skip


def bench_argv(port: int, tokenizer: str, run: dict, result: Path) -> list[str]:
    return [
        "--backend", "openai", "--base-url", f"http://127.0.0.1:{port}", "--endpoint", "/v1/completions",
        "--model", SERVED_NAME, "--tokenizer", tokenizer, *dataset_argv(run), "--num-prompts", str(run["num_prompts"]),
        "--max-concurrency", str(run["concurrency"]), "--ignore-eos", "--seed", str(run["seed"]),
        "--percentile-metrics", "ttft,tpot,itl,e2el", "--metric-percentiles", "50,90,99",
        "--save-result", "--result-dir", str(result.parent), "--result-filename", result.name,
        "--disable-tqdm",
    ]  # fmt: skip


def run_bench(port: int, tokenizer: str, run: dict, result: Path) -> dict:
    """One `bench serve` run; vLLM's full result JSON lands in `result`, the headline figures are returned."""
    from vllm.benchmarks.serve import add_cli_args
    from vllm.benchmarks.serve import main as bench_main
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = FlexibleArgumentParser()
    add_cli_args(parser)
    args = parser.parse_args(bench_argv(port, tokenizer, run, result))
    with contextlib.redirect_stdout(io.StringIO()):  # its own table; the harness prints a summary instead
        out = bench_main(args)
    keep = {k: out[k] for k in KEEP if k in out}
    keep |= {
        k: round(v, 2)
        for k, v in out.items()
        if k.startswith(("median_", "p90_", "p99_", "mean_")) and isinstance(v, float)
    }
    return keep
