"""Where an engine step's time goes as the layer count grows: stock vLLM vs moa (dense plan, uniform 0.5 plan) on a
Llama-shaped model of tiny widths (hidden 128, 2 KV heads of 64, vLLM's dummy weights), so that compute is small
and per-step, per-layer overhead shows. CPU figures (float32, block size 128, eager, in-process engine).

Workload (the issue's): 128 requests of 600 random prompt tokens decoding 48 tokens each, all resident (8 GiB KV),
prefix caching at vLLM's default (on). Every configuration runs in its own process; figures are medians over the
decode steps (every running request scheduled one token). Per step, wall time of:
  step            EngineCore.step (schedule + execute + update)
  schedule        Scheduler.schedule, of which allocate = KVCacheManager.allocate_slots (the managers, hashing,
                  allocation of every group)
  update          Scheduler.update_from_output
  execute         the worker's execute_model, of which prepare = the runner's _prepare_inputs (block tables, slot
                  mapping, positions), metadata = _build_attention_metadata (every group's builder), attention = the
                  attention impls' forward summed over the layers (ring / page tables, writes, kernels)
  other           execute - prepare - metadata - attention (the rest of the model: linears, norms, sampling)

Usage: python -m benchmarks.step_overhead [--layers 16 32 80] [--configs stock dense uniform] [--rounds 1]
Result: benchmarks/results/step_overhead/step_overhead.json (+ step_overhead.png), with its command and host.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results" / "step_overhead"
CONFIGS = ("stock", "dense", "uniform")
REQUESTS, PROMPT, DECODE, KV_GIB, MAX_LEN = 128, 600, 48, 8.0, 1024
PARTS = ("step", "schedule", "allocate", "update", "execute", "prepare", "metadata", "attention")


def model_config(layers: int) -> dict:
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": 128,
        "intermediate_size": 256,
        "num_hidden_layers": layers,
        "num_attention_heads": 2,
        "num_key_value_heads": 2,
        "head_dim": 64,
        "vocab_size": 2048,
        "max_position_embeddings": 2048,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "tie_word_embeddings": False,
        "torch_dtype": "float32",
        "bos_token_id": 1,
        "eos_token_id": 2,
    }


def prepare(layers: int, work: Path) -> tuple[Path, dict[str, str]]:
    """The model folder (config.json only: vLLM's dummy loader makes the weights) and its dense / uniform plans."""
    from moa_vllm.plan import dense_plan, fingerprint_from_hf_config, save_plan, uniform_plan

    folder = work / f"tiny-{layers}"
    folder.mkdir(parents=True, exist_ok=True)
    config = model_config(layers)
    (folder / "config.json").write_text(json.dumps(config, indent=1))
    fp = fingerprint_from_hf_config(config)
    return folder, {
        "dense": str(save_plan(dense_plan(fp), folder / "dense.json")),
        "uniform": str(save_plan(uniform_plan(fp, 0.5), folder / "uniform-d0.5.json")),
    }


class Timers:
    """Wall-time accumulators around named methods, closed into one record per engine step."""

    def __init__(self) -> None:
        self.now: dict[str, float] = {}
        self.steps: list[dict] = []

    def wrap(self, owner, name: str, part: str) -> None:
        original = getattr(owner, name)
        timers = self

        def timed(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                timers.now[part] = timers.now.get(part, 0.0) + time.perf_counter() - t0

        setattr(owner, name, timed)


def run_one(model_dir: Path, plan: str | None) -> list[dict]:
    """One engine (stock when plan is None): the workload, a record per engine step."""
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")
    import numpy as np
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt
    from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackendImpl
    from vllm.v1.core.kv_cache_manager import KVCacheManager
    from vllm.v1.core.sched.scheduler import Scheduler
    from vllm.v1.engine.core import EngineCore
    from vllm.v1.worker.cpu_model_runner import CPUModelRunner

    import moa_vllm
    from benchmarks.real_shapes import STOCK, make_llm  # the dummy-weight engine of the real-shape harness

    moa_vllm.register()
    from moa_vllm.vllm_plugin.moa.backend import MoAImpl

    timers = Timers()
    timers.wrap(Scheduler, "schedule", "schedule")
    timers.wrap(Scheduler, "update_from_output", "update")
    timers.wrap(KVCacheManager, "allocate_slots", "allocate")
    timers.wrap(CPUModelRunner, "execute_model", "execute")
    timers.wrap(CPUModelRunner, "_prepare_inputs", "prepare")
    timers.wrap(CPUModelRunner, "_build_attention_metadata", "metadata")
    timers.wrap(MoAImpl, "forward", "attention")
    timers.wrap(CPUAttentionBackendImpl, "forward", "attention")
    original_step = EngineCore.step

    def step(self, *args, **kwargs):
        timers.now = {}
        t0 = time.perf_counter()
        out = original_step(self, *args, **kwargs)
        record = {"step": time.perf_counter() - t0, **timers.now}
        record["running"] = len(self.scheduler.running)
        record["tokens"] = getattr(self.scheduler, "_moa_bench_tokens", 0)
        timers.steps.append(record)
        return out

    original_schedule = Scheduler.schedule

    def schedule(self, *args, **kwargs):
        out = original_schedule(self, *args, **kwargs)
        self._moa_bench_tokens = (out.total_num_scheduled_tokens, len(out.num_scheduled_tokens))
        return out

    Scheduler.schedule = schedule
    EngineCore.step = step
    llm = make_llm(model_dir, plan or STOCK, KV_GIB, MAX_LEN, max_num_seqs=REQUESTS)
    rng = np.random.default_rng(0)
    prompts = [TokensPrompt(prompt_token_ids=rng.integers(3, 2000, PROMPT).tolist()) for _ in range(REQUESTS)]
    timers.steps.clear()
    llm.generate(prompts, SamplingParams(max_tokens=DECODE, ignore_eos=True, temperature=0.0), use_tqdm=False)
    return timers.steps


def decode_summary(steps: list[dict]) -> dict:
    """Medians over the steps that decode every request at once (one token each)."""
    decode = [s for s in steps if s["tokens"] and s["tokens"][0] == s["tokens"][1] == REQUESTS]
    out = {"decode_steps": len(decode)}
    for part in PARTS:
        out[part] = statistics.median(s.get(part, 0.0) for s in decode) if decode else None
    if decode:
        out["scheduler"] = statistics.median(s.get("schedule", 0.0) + s.get("update", 0.0) for s in decode)
        out["other"] = statistics.median(
            s.get("execute", 0.0) - s.get("prepare", 0.0) - s.get("metadata", 0.0) - s.get("attention", 0.0)
            for s in decode
        )
    return out


def child(args: list[str]) -> int:
    model_dir, plan, out = Path(args[0]), None if args[1] == "stock" else args[1], Path(args[2])
    steps = run_one(model_dir, plan)
    out.write_text(json.dumps(decode_summary(steps)))
    return 0


def host() -> dict:
    info = {"machine": platform.machine(), "cpus": os.cpu_count()}
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        for line in lscpu.splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "Model name":
                info["cpu"] = value.strip()
            if key.strip() == "Flags":
                flags = value.split()
                info["isa"] = [f for f in ("avx2", "avx512f", "amx_tile") if f in flags]
    except (OSError, subprocess.CalledProcessError):
        pass
    return info


def plot(doc: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = doc["results"]
    layers = sorted({r["layers"] for r in rows})
    configs = [c for c in CONFIGS if any(r["config"] == c for r in rows)]
    fig, axes = plt.subplots(1, len(layers), figsize=(4.2 * len(layers), 4), squeeze=False)
    parts = ("scheduler", "prepare", "metadata", "attention", "other")
    for ax, n in zip(axes[0], layers, strict=True):
        bottom = [0.0] * len(configs)
        for part in parts:
            values = [
                1e3 * next((r[part] or 0.0) for r in rows if r["layers"] == n and r["config"] == c) for c in configs
            ]
            ax.bar(configs, values, bottom=bottom, label=part)
            bottom = [b + v for b, v in zip(bottom, values, strict=True)]
        ax.set_title(f"{n} layers")
        ax.set_ylabel("median decode step (ms)")
    axes[0][0].legend(fontsize=8)
    fig.suptitle(f"Engine step by part, 128 x 600-token requests decoding, CPU ({doc['host'].get('cpu', '?')})",
                 fontsize=9)  # fmt: skip
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    return path


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--child"]:
        return child(argv[1:])
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=int, nargs="+", default=[16, 32, 80])
    p.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=CONFIGS)
    p.add_argument("--rounds", type=int, default=1, help="rotated rounds (each config once per round)")
    p.add_argument("--out", type=Path, default=RESULTS / "step_overhead.json")
    a = p.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="moa-step-overhead-"))
    rows = json.loads(a.out.read_text())["results"] if a.out.exists() else []
    keep = [r for r in rows if r["layers"] not in a.layers or r["config"] not in a.configs]
    rows = []
    for n in a.layers:
        folder, plans = prepare(n, work)
        runs: dict[str, list[dict]] = {c: [] for c in a.configs}
        for rnd in range(a.rounds):
            order = a.configs[rnd % len(a.configs) :] + a.configs[: rnd % len(a.configs)]
            for config in order:
                result = work / f"{n}-{config}-{rnd}.json"
                cmd = [sys.executable, "-m", "benchmarks.step_overhead", "--child", str(folder),
                       plans.get(config, "stock"), str(result)]  # fmt: skip
                subprocess.run(cmd, check=True, cwd=REPO, stdout=subprocess.DEVNULL)
                runs[config].append(json.loads(result.read_text()))
                print(f"{n} layers, {config}, round {rnd}: step {runs[config][-1]['step'] * 1e3:.1f} ms", flush=True)
        for config, results in runs.items():
            row = {"layers": n, "config": config, "rounds": results}
            for key in (*PARTS, "scheduler", "other"):
                row[key] = statistics.median(r[key] for r in results)
            rows.append(row)
        for config in a.configs:
            row = next(r for r in rows if r["layers"] == n and r["config"] == config)
            stock = next((r for r in rows if r["layers"] == n and r["config"] == "stock"), None)
            if stock:
                row["step_vs_stock"] = row["step"] / stock["step"]
                row["scheduler_vs_stock"] = row["scheduler"] / stock["scheduler"]
    doc = {
        "command": "python -m benchmarks.step_overhead " + " ".join(argv),
        "host": host(),
        "workload": {"requests": REQUESTS, "prompt": PROMPT, "decode": DECODE, "kv_gib": KV_GIB,
                     "max_model_len": MAX_LEN, "model": model_config(0) | {"num_hidden_layers": "per row"}},
        "note": "CPU, float32, eager, dummy weights; medians over decode steps (all 128 requests one token each), "
                "then over rounds; seconds",
        "results": sorted(keep + rows, key=lambda r: (r["layers"], CONFIGS.index(r["config"]))),
    }  # fmt: skip
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(doc, indent=1) + "\n")
    plot(doc, a.out.with_suffix(".png"))
    for r in doc["results"]:
        print(
            f"{r['layers']:3d} layers {r['config']:8s} step {r['step'] * 1e3:7.1f} ms"
            f" ({r.get('step_vs_stock', float('nan')):.2f}x stock); scheduler {r['scheduler'] * 1e3:6.2f} ms"
            f" ({r.get('scheduler_vs_stock', float('nan')):.2f}x); metadata {r['metadata'] * 1e3:6.2f} ms;"
            f" attention {r['attention'] * 1e3:7.1f} ms; other {r['other'] * 1e3:7.1f} ms"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
