"""BST recall served by vLLM (CPU wheel): accuracy of the trained checkpoint vs its no-SSM ablation at the trained
length and at 2x, 4x and 8x it, what one request holds in vLLM's cache at 1k and 8k tokens, and the training wall
time recorded in each checkpoint.

Usage:
    python benchmarks/bst_recall.py --ssm DIR --no-ssm DIR [--samples 512] [--lengths 1024 8192] [--out FILE]
    python benchmarks/bst_recall.py --train-into DIR [...]   # first trains both with `moa-vllm bst train`

Accuracy: greedy answers from ``vllm.LLM`` on held-out prompts of the plain task (uniform noise, signal in the first
quarter) at each length, drawn with a benchmark seed (not the training or training-eval seed), next to the
reference decode's accuracy on the same prompts. Memory: one request of L prompt
tokens (task noise, query at the end) plus 16 generated tokens, its blocks read from vLLM's KV cache manager after
every engine step; the figure is what it holds during decode, per KV cache group.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path

os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # in-process engine core: its cache manager is readable
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")

import torch  # noqa: E402

from moa_vllm.bst.checkpoint import Checkpoint, load_checkpoint  # noqa: E402
from moa_vllm.bst.tasks import RecallTask  # noqa: E402
from moa_vllm.bst.train import answer_logits, evaluate  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
BENCH_SEED = 20261123
DECODE_TOKENS = 16
CHUNK = 512


# The shipped recipe: lengths 32-128 per batch, slow real S4D modes, a ReLU gate on the SSM input pruned by an L1
# penalty whose weight grows over the run (moa_vllm/bst/train.py, layer.py). The ablation gets fewer steps: with 2
# layers of window 32 its receptive field is 63 tokens, so a signal 96+ tokens back is out of its reach however
# long it trains.
SSM_TRAIN = [
    "--steps", "3000", "--batch-size", "16", "--seed", "0", "--ssm-lr", "0.003", "--min-seq-len", "32",
    "--ssm-init", "real", "--ssm-dt-min", "3e-5", "--ssm-dt-max", "3e-4", "--ssm-input-gate", "--gate-l1", "0.01",
]  # fmt: skip
ABLATION_TRAIN = ["--steps", "300", "--batch-size", "16", "--seed", "0", "--no-ssm"]


def train_commands(folder: Path) -> dict[str, list[str]]:
    base = ["moa-vllm", "bst", "train", "--task", "recall"]
    return {
        "ssm": [*base, "--out", str(folder / "recall-ssm"), *SSM_TRAIN],
        "no_ssm": [*base, "--out", str(folder / "recall-no-ssm"), *ABLATION_TRAIN],
    }


def train_both(folder: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for argv in train_commands(folder).values():
        print("$ " + shlex.join(argv), flush=True)
        subprocess.run(["nice", "-n", "5", *argv], check=True, env=env)


def long_prompt(ckpt: Checkpoint, length: int) -> list[int]:
    """A recall-style prompt of ``length`` tokens: noise with the signal early, query last."""
    task = ckpt.task
    g = torch.Generator().manual_seed(BENCH_SEED + length)
    ids = torch.randint(task.num_signals, task.query_token, (length,), generator=g)
    ids[int(torch.randint(0, length // 4, (1,), generator=g))] = int(
        torch.randint(0, task.num_signals, (1,), generator=g)
    )
    ids[-1] = task.query_token
    return ids.tolist()


def holding_trace(llm, prompt: list[int]) -> list[list[dict]]:
    from vllm import SamplingParams

    from moa_vllm.vllm_plugin.bst.memory import request_holdings

    engine = llm.llm_engine
    core = engine.engine_core.engine_core
    params = SamplingParams(max_tokens=DECODE_TOKENS, temperature=0, ignore_eos=True, detokenize=False)
    req = engine.add_request(f"mem{len(prompt)}", {"prompt_token_ids": prompt}, params)
    steps = []
    while engine.has_unfinished_requests():
        decoding = core.scheduler.requests[req].num_computed_tokens >= len(prompt)
        engine.step()
        if engine.has_unfinished_requests():
            steps.append({"decode": decoding, "groups": [h.__dict__ for h in request_holdings(core, req)]})
    return steps


def memory_at(llm, ckpt: Checkpoint, length: int) -> dict:
    steps = holding_trace(llm, long_prompt(ckpt, length))
    decode = [s["groups"] for s in steps if s["decode"]]
    prefill = [s["groups"] for s in steps if not s["decode"]]

    def total(step: list[dict], key: str) -> int:
        return sum(g[key] for g in step)

    config = ckpt.model.config
    full_kv = (
        2 * config.num_hidden_layers * config.attention_heads_total * config.head_dim * 4 * (length + DECODE_TOKENS)
    )
    return {
        "prompt_tokens": length,
        "decode_groups": decode[-1],
        "decode_bytes_allocated_max": max(total(s, "bytes_allocated") for s in decode),
        "decode_bytes_content_max": max(total(s, "bytes_content") for s in decode),
        "prefill_bytes_allocated_max": max(total(s, "bytes_allocated") for s in prefill),
        "full_attention_kv_bytes_same_model": full_kv,
        "engine_steps": {"prefill": len(prefill), "decode_traced": len(decode)},
    }


def recall_at(llm, ckpt: Checkpoint, task: RecallTask, samples: int) -> dict:
    """Served and reference recall on ``samples`` held-out prompts of ``task`` (seeded by the benchmark and length)."""
    from vllm import SamplingParams

    prompts, answers = task.sample(samples, torch.Generator().manual_seed(BENCH_SEED + task.seq_len))
    reference = evaluate(ckpt.model, prompts, answers)
    reference_tokens = torch.cat(
        [answer_logits(ckpt.model, prompts[a : a + 64], answers[a : a + 64]).argmax(-1) for a in range(0, samples, 64)]
    )
    params = SamplingParams(max_tokens=task.answer_length, temperature=0, ignore_eos=True, detokenize=False)
    start = time.perf_counter()
    outs = llm.generate([{"prompt_token_ids": p.tolist()} for p in prompts], params, use_tqdm=False)
    served = torch.tensor([list(o.outputs[0].token_ids) for o in outs])
    return {
        "seq_len": task.seq_len,
        "min_distance": task.min_distance,
        "vllm_accuracy": (served == answers).all(-1).float().mean().item(),
        "reference_accuracy": reference["exact_match"],
        "vllm_equals_reference_answers": (served == reference_tokens).all(-1).float().mean().item(),
        "generate_s": round(time.perf_counter() - start, 2),
    }


def serve_checkpoint(folder: Path, samples: int, lengths: list[int], eval_lengths: list[int]) -> dict:
    from vllm import LLM
    from vllm.distributed import cleanup_dist_env_and_memory

    ckpt = load_checkpoint(folder)
    task = ckpt.task.plain()  # the evaluation form: fixed length, uniform noise
    eval_lengths = sorted({task.seq_len, *eval_lengths})

    start = time.perf_counter()
    llm = LLM(
        model=str(folder),
        dtype="float32",
        enforce_eager=True,
        skip_tokenizer_init=True,
        enable_prefix_caching=False,
        max_model_len=max(*lengths, *eval_lengths) + 2 * DECODE_TOKENS,
        max_num_batched_tokens=CHUNK,
        max_num_seqs=32,
        seed=0,
    )
    startup = time.perf_counter() - start
    by_length = {str(n): recall_at(llm, ckpt, task.plain(n), samples) for n in eval_lengths}
    trained = by_length[str(task.seq_len)]
    memory = {str(n): memory_at(llm, ckpt, n) for n in lengths}
    llm.llm_engine.engine_core.shutdown()
    del llm
    gc.collect()
    cleanup_dist_env_and_memory()
    return {
        "checkpoint": str(folder),
        "use_ssm": ckpt.model.config.use_ssm,
        "parameters": sum(p.numel() for p in ckpt.model.parameters()),
        "task": task.to_dict(),
        "chance": task.chance,
        "samples": samples,
        "vllm_accuracy": trained["vllm_accuracy"],
        "reference_accuracy": trained["reference_accuracy"],
        "vllm_equals_reference_answers": trained["vllm_equals_reference_answers"],
        "recall_by_length": by_length,
        "engine_startup_s": round(startup, 1),
        "memory_per_request": memory,
        "training": {k: ckpt.metrics.get(k) for k in ("train_wall_s", "eval_accuracy", "settings", "command")},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ssm", type=Path, help="trained BST checkpoint")
    parser.add_argument("--no-ssm", type=Path, help="trained no-SSM ablation checkpoint")
    parser.add_argument("--train-into", type=Path, help="train both checkpoints into this folder first")
    parser.add_argument("--samples", type=int, default=512)
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 8192], help="memory per request at these")
    parser.add_argument(
        "--eval-lengths",
        type=int,
        nargs="+",
        default=[256, 512, 1024],
        help="recall accuracy at these prompt lengths too (the trained length always)",
    )
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "bst_recall.json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.train_into:
        train_both(args.train_into)
        args.ssm, args.no_ssm = args.train_into / "recall-ssm", args.train_into / "recall-no-ssm"
    if not (args.ssm and args.no_ssm):
        parser.error("give --ssm and --no-ssm, or --train-into")
    from vllm import __version__ as vllm_version

    results = {name: serve_checkpoint(folder, args.samples, args.lengths, args.eval_lengths) for name, folder in
               (("ssm", args.ssm), ("no_ssm", args.no_ssm))}  # fmt: skip
    report = {
        "command": shlex.join(["python", "benchmarks/bst_recall.py", *sys.argv[1:]]),
        "train_commands": {name: r["training"]["command"] for name, r in results.items()},
        "device": f"CPU ({os.cpu_count()} cores, shared with other jobs), float32, vllm {vllm_version}",
        "machine": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "results": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    for name, r in results.items():
        mem = {n: m["decode_bytes_allocated_max"] for n, m in r["memory_per_request"].items()}
        acc = ", ".join(f"{n}: {a['vllm_accuracy']:.3f} (ref {a['reference_accuracy']:.3f})"
                        for n, a in r["recall_by_length"].items())  # fmt: skip
        acc = f"recall by length {acc}, chance {r['chance']:.3f}"
        print(f"{name}: {acc}; decode bytes per request {mem}; train {r['training']['train_wall_s']} s")


if __name__ == "__main__":
    main()
