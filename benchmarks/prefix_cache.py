"""Prefix caching served: stock vLLM (its defaults, prefix caching on) vs the moa plans with caching on, and MoA
0.25 with caching off, each one OpenAI server at one pinned KV budget, side by side in one run.

Workloads per server, in this order:
  prefix   vLLM's `bench serve --dataset-name prefix_repetition` (a shared prefix, N distinct prefixes, unique
           suffixes): what RAG and system prompts look like
  random   vLLM's `bench serve --dataset-name random` (nothing shared): caching must not cost anything here
  chat     multi-turn chat through the OpenAI client (chat completions, streamed): conversations in parallel, each
           turn = the whole history + a new user message
plus the concurrency vLLM itself reports for max_model_len requests (its startup log) and its prefix-cache
counters from /metrics.

    python -m benchmarks.prefix_cache                      # all configurations and workloads (CPU: ~30 min)
    python -m benchmarks.prefix_cache --workloads prefix   # one workload

Results (resumable: a (config, workload) whose JSON exists is not run again):
  benchmarks/results/prefix_cache/runs/<config>/<workload>.json, summary.json, summary.md, prefix_cache.png
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

from benchmarks.serve.client import run_bench
from benchmarks.serve.harness import PLANS, REPO, _device
from benchmarks.serve.server import SERVED_NAME, Config, start
from moa_vllm.server_process import stop, wait_kv_idle

OUT = REPO / "benchmarks" / "results" / "prefix_cache"
WORKLOADS = ("prefix", "random", "chat")


def configs() -> list[Config]:
    return [
        Config("stock", None, prefix_caching=True),
        Config("moa-d0.25", str(PLANS / "moa-d0.25.json"), prefix_caching=True),
        Config("moa-d0.50", str(PLANS / "moa-d0.50.json"), prefix_caching=True),
        Config("moa-d0.25-nocache", str(PLANS / "moa-d0.25.json"), prefix_caching=False),
        # a conversation's spans held still: by the server (span_length) or by the client (moa_span_length)
        Config("moa-d0.25-span8192", str(PLANS / "moa-d0.25.json"), True, moa_settings=(("span_length", 8192),)),
        Config("moa-d0.25-hint8192", str(PLANS / "moa-d0.25.json"), True, span_hint=8192),
        Config("moa-d0.25-grid8", str(PLANS / "moa-d0.25.json"), True, moa_settings=(("span_grid", 8),)),
    ]


def prefix_cache_counters(port: int) -> dict[str, float]:
    """vLLM's own prefix-cache counters (tokens queried and hit) from /metrics."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        text = r.read().decode()
    out: dict[str, float] = {}
    for line in text.splitlines():
        for name in ("vllm:prefix_cache_queries_total", "vllm:prefix_cache_hits_total"):
            if line.startswith(name):
                out[name.split(":")[1]] = out.get(name.split(":")[1], 0.0) + float(line.rsplit(" ", 1)[1])
    return out


def _words(rng: random.Random, n: int) -> str:
    from moa_vllm.data.synthetic_text import SENTENCES

    return " ".join(rng.choice(SENTENCES) for _ in range(n))


def chat(port: int, conversations: int, turns: int, system_sentences: int, user_sentences: int, out_tokens: int,
         seed: int, span_hint: int | None = None) -> dict:  # fmt: skip
    """Conversations in parallel through the OpenAI client; per turn its time to first token (streamed)."""
    from openai import OpenAI

    client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none")
    records: list[dict] = []
    lock = threading.Lock()
    body: dict = {"ignore_eos": True}
    if span_hint is not None:
        body["vllm_xargs"] = {"moa_span_length": span_hint}

    def converse(c: int) -> None:
        rng = random.Random(seed * 1000 + c)
        messages = [{"role": "system", "content": _words(rng, system_sentences)}]
        for t in range(turns):
            messages.append({"role": "user", "content": _words(rng, user_sentences)})
            start = time.perf_counter()
            first, text, usage = None, [], None
            stream = client.chat.completions.create(
                model=SERVED_NAME, messages=messages, max_tokens=out_tokens, temperature=0, stream=True,
                stream_options={"include_usage": True}, extra_body=body,
            )  # fmt: skip
            for chunk in stream:
                if chunk.choices and chunk.choices[0].delta.content:
                    first = first or time.perf_counter()
                    text.append(chunk.choices[0].delta.content)
                if chunk.usage is not None:
                    usage = chunk.usage
            end = time.perf_counter()
            messages.append({"role": "assistant", "content": "".join(text)})
            record = {"conversation": c, "turn": t, "ttft_s": (first or end) - start, "e2e_s": end - start,
                      "prompt_tokens": usage.prompt_tokens, "output_tokens": usage.completion_tokens}  # fmt: skip
            with lock:
                records.append(record)

    begin = time.perf_counter()
    threads = [threading.Thread(target=converse, args=(c,)) for c in range(conversations)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    wall = time.perf_counter() - begin
    later = [r["ttft_s"] for r in records if r["turn"] > 0]
    return {
        "conversations": conversations,
        "turns": turns,
        "duration": wall,
        "output_throughput": sum(r["output_tokens"] for r in records) / wall,
        "median_ttft_ms": statistics.median(r["ttft_s"] for r in records) * 1e3,
        "median_ttft_later_turns_ms": statistics.median(later) * 1e3 if later else None,
        "prompt_tokens_last_turn": max(r["prompt_tokens"] for r in records),
        "records": sorted(records, key=lambda r: (r["conversation"], r["turn"])),
    }


def run_workload(name: str, port: int, model: str, args, result: Path, span_hint: int | None = None) -> dict:
    if name == "chat":
        return chat(port, args.chat_conversations, args.chat_turns, args.chat_system_sentences,
                    args.chat_user_sentences, args.output_len, args.seed, span_hint)  # fmt: skip
    if name == "prefix":
        run = dict(dataset="prefix_repetition", prefix_len=args.prefix_len, suffix_len=args.suffix_len,
                   num_prefixes=args.num_prefixes, output_len=args.output_len)  # fmt: skip
    else:
        run = dict(input_len=args.prefix_len + args.suffix_len, output_len=args.output_len)
    run |= dict(num_prompts=args.num_prompts, concurrency=args.concurrency, seed=args.seed)
    return run_bench(port, model, run, result)


def run_config(config: Config, model: str, args, logs: Path) -> dict[str, dict]:
    runs = args.out / "runs" / config.name
    todo = [w for w in args.workloads if not (runs / f"{w}.json").exists()]
    done = {w: json.loads((runs / f"{w}.json").read_text()) for w in args.workloads if w not in todo}
    if not todo:
        return done
    runs.mkdir(parents=True, exist_ok=True)
    server = start(model, config, int(args.kv_gib * 2**30), args.max_model_len, args.dtype, logs / f"{config.name}.log")
    try:
        capacity = server.capacity()
        for w in todo:
            print(f"{config.name}: {w}", flush=True)
            before = prefix_cache_counters(server.port)
            raw = runs / f"{w}.bench.json"
            figures = run_workload(w, server.port, model, args, raw, config.span_hint)
            after = prefix_cache_counters(server.port)
            row = {"config": config.name, "workload": w, "prefix_caching": config.prefix_caching, **capacity,
                   **{k: v for k, v in figures.items() if k != "records"},
                   **{f"{k}_delta": after.get(k, 0.0) - before.get(k, 0.0) for k in after},
                   "kv_usage_after": wait_kv_idle(server.port)}  # fmt: skip
            if "records" in figures:
                row["records"] = figures["records"]
            raw.unlink(missing_ok=True)
            (runs / f"{w}.json").write_text(json.dumps(row, indent=1))
            done[w] = row
    finally:
        stop(server.proc)
    return done


def summary_table(rows: list[dict]) -> str:
    head = "| config | workload | output tok/s | vs stock | TTFT p50 ms | vs stock | hit share | reported concurrency |"
    lines = [head, "|" + "---|" * 8]
    stock = {r["workload"]: r for r in rows if r["config"] == "stock"}
    for r in rows:
        s = stock.get(r["workload"])
        hit = r.get("prefix_cache_hits_total_delta", 0) / max(r.get("prefix_cache_queries_total_delta", 0), 1)
        ttft = r.get("median_ttft_ms")
        tput = r["output_throughput"]
        vs_tput = f"{tput / s['output_throughput']:.2f}x" if s else "-"
        vs_ttft = f"{ttft / s['median_ttft_ms']:.2f}x" if s else "-"
        lines.append(
            f"| {r['config']} | {r['workload']} | {tput:.2f} | {vs_tput} | {ttft:.0f} | {vs_ttft} | {hit:.2f} | "
            f"{r.get('reported_max_concurrency', '-')} |"
        )
    return "\n".join(lines)


def plot(rows: list[dict], path: Path, label: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(dict.fromkeys(r["config"] for r in rows))
    workloads = list(dict.fromkeys(r["workload"] for r in rows))
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    width = 0.8 / len(names)
    for i, name in enumerate(names):
        by = {r["workload"]: r for r in rows if r["config"] == name}
        xs = [j + i * width for j in range(len(workloads))]
        axes[0].bar(xs, [by[w]["output_throughput"] if w in by else 0 for w in workloads], width, label=name)
        axes[1].bar(xs, [by[w]["median_ttft_ms"] if w in by else 0 for w in workloads], width, label=name)
    for ax, title in zip(axes, ("output tok/s", "TTFT p50 (ms)"), strict=True):
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(workloads))], workloads)
        ax.set_title(title)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"prefix caching served ({label})")
    fig.tight_layout()
    fig.savefig(path, dpi=90)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="model folder (default: the embedded model)")
    ap.add_argument("--configs", nargs="*", default=None, help="names among " + ", ".join(c.name for c in configs()))
    ap.add_argument("--workloads", nargs="+", default=list(WORKLOADS), choices=WORKLOADS)
    ap.add_argument("--kv-gib", type=float, default=1.0)
    ap.add_argument("--max-model-len", type=int, default=8192)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--prefix-len", type=int, default=4096)
    ap.add_argument("--suffix-len", type=int, default=256)
    ap.add_argument("--num-prefixes", type=int, default=2)
    ap.add_argument("--output-len", type=int, default=64)
    ap.add_argument("--num-prompts", type=int, default=8)
    ap.add_argument("--concurrency", type=int, default=4)
    ap.add_argument("--chat-conversations", type=int, default=3)
    ap.add_argument("--chat-turns", type=int, default=4)
    ap.add_argument("--chat-system-sentences", type=int, default=120, help="~1.5k tokens")
    ap.add_argument("--chat-user-sentences", type=int, default=12, help="~150 tokens")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args(argv)
    if args.model is None:
        from moa_vllm.model import prepare_embedded_model

        args.model = str(prepare_embedded_model(progress=False))
    chosen = [c for c in configs() if args.configs is None or c.name in args.configs]
    logs = Path(tempfile.mkdtemp(prefix="moa-bench-prefix-"))
    rows = []
    for config in chosen:
        done = run_config(config, args.model, args, logs)
        rows += [done[w] for w in args.workloads if w in done]
    device = _device()
    meta = {"command": "python -m benchmarks.prefix_cache " + " ".join(argv), "device": device, "dtype": args.dtype,
            "kv_gib": args.kv_gib, "max_model_len": args.max_model_len, "server_logs": str(logs)}  # fmt: skip
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "summary.json").write_text(json.dumps({**meta, "rows": rows}, indent=1))
    table = summary_table(rows)
    (args.out / "summary.md").write_text(f"`{meta['command']}` ({device}, {args.dtype}, KV {args.kv_gib} GiB)\n\n"
                                         + table + "\n")  # fmt: skip
    plot(rows, args.out / "prefix_cache.png", f"{device}, KV {args.kv_gib} GiB")
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
