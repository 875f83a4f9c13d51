"""Prefill speed of the moa backend against stock vLLM, beside the ceiling the plans' spans allow (CPU figures).

Parts (each writes benchmarks/results/prefill_speed_<part>.json with its command; `alone` and `chunk` a PNG too):
  kernels  one layer's prefill attention of one 2048-token chunk per KV head (embedded model's shapes, fp32), no
           engine: the torch ring prefill at spans 128-2048, first chunk and a chunk after 6144 tokens (wrapped
           rings), against torch's fused causal flash attention and vLLM's CPU_ATTN over the dense chunk. GFLOP/s
           count only the keys each query attends (sum of min(p + 1, span)).
  alone    one prompt alone (2k / 4k / 8k token ids, max_tokens 1): prefill tok/s of stock vLLM, the dense plan and
           the shipped plans, one engine after another in this process; each plan's attention-work fraction and
           the ideal ratio to stock it allows (see `ceiling`).
  chunk    prefill tok/s of one 8k prompt against max_num_batched_tokens (512-8192), stock vs moa-d0.25.

The ceiling. Per prompt token the linear layers cost 2 x (non-embedding parameters) FLOP and dense causal attention
layers x query heads x 4 x head_dim x (P + 1) / 2 on average over a P-token prompt. A plan attends
sum_h sum_p min(p + 1, span_h) keys, a fraction f of dense. `ideal_flop` is (lin + att) / (lin + f att), the ratio at
equal kernel efficiency; `ideal_stock_rates` fits stock's own measured seconds per token at the lengths run,
t/P = a + b (P + 1) / 2, and gives (a + b (P+1)/2) / (a + f b (P+1)/2): the ratio if moa's attention ran at
stock's attention speed and everything else cost what stock's does.

Usage: python -m benchmarks.prefill_speed {kernels,alone,chunk} [--plans P ...] [--lengths ...] [--repeats N]
Run on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable as a script too
# ring_cache sets vLLM's in-process engine environment on import, before anything imports vLLM
from benchmarks.ring_cache import PLANS, REPO, RESULTS, STOCK, close, make_llm  # noqa: E402

H, G, D, PAGE, SINKS = 3, 3, 64, 128, 64  # the embedded model's attention shapes, vLLM's CPU block size
WARMUP = 512  # tokens of the uncounted first prompt
DEFAULT_PLANS = ("dense", "moa-d0.50", "uniform-d0.25", "moa-d0.25")


def _meta(part: str, argv: list[str]) -> dict:
    import torch

    return {
        "command": "python -m benchmarks.prefill_speed " + " ".join(argv),
        "part": part,
        "device": f"CPU ({platform.machine()}, {os.cpu_count()} cores, {torch.backends.cpu.get_cpu_capability()})",
        "torch_threads": torch.get_num_threads(),
    }


def _median_time(fn, repeats: int) -> float:
    fn()
    samples = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t0)
    return statistics.median(samples)


# ---- the ceiling -----------------------------------------------------------------------------------------------------
def attention_fraction(plan_path: str, prompt: int, max_tokens: int = 1) -> float:
    """Keys a plan attends over a `prompt`-token prefill, as a fraction of dense causal attention."""
    from moa_vllm.plan.io import load_plan
    from moa_vllm.plan.span import request_length, span_tokens

    plan = load_plan(plan_path)
    n = request_length(prompt, max_tokens, 1 << 30)
    dense = prompt * (prompt + 1) // 2
    kept = []
    for layer in plan.rules:
        for rule in layer:
            s = span_tokens(rule.alpha, rule.beta, n, plan.min_span)
            kept.append(s * (s + 1) // 2 + s * max(prompt - s, 0) if s < prompt else dense)
    return sum(kept) / (len(kept) * dense)


def model_flops(model_dir: Path) -> tuple[float, float]:
    """(linear FLOP per token, dense attention FLOP per token per key of average context) of the model."""
    config = json.loads((Path(model_dir) / "config.json").read_text())
    hidden, layers, inter = config["hidden_size"], config["num_hidden_layers"], config["intermediate_size"]
    heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
    head_dim = config.get("head_dim") or hidden // heads
    per_layer = hidden * head_dim * (heads + 2 * kv_heads) + heads * head_dim * hidden + 3 * hidden * inter
    return 2.0 * layers * per_layer, float(layers * heads * 4 * head_dim)


def ideal_flop(lin: float, att_per_key: float, prompt: int, fraction: float) -> float:
    att = att_per_key * (prompt + 1) / 2
    return (lin + att) / (lin + fraction * att)


def fit_stock(stock: dict[int, float]) -> tuple[float, float]:
    """Least squares t/P = a + b (P + 1) / 2 over stock's measured seconds per prompt."""
    xs = [(p + 1) / 2 for p in stock]
    ys = [t / p for p, t in stock.items()]
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sum((x - mx) ** 2 for x in xs)
    return my - b * mx, b


# ---- kernels (no engine) --------------------------------------------------------------------------------------------
def _kernel_rows(n: int, spans: list[int], computed: int, repeats: int, tiles: list[int]) -> list[dict]:
    import torch

    from moa_vllm.ops import ring_prefill
    from moa_vllm.ops.ring_layout import slot_positions

    torch.manual_seed(0)
    q, k, v = torch.randn(n, H * G, D), torch.randn(n, H, D), torch.randn(n, H, D)
    out = torch.empty_like(q)
    rows = []
    for span in spans:
        keys = sum(min(computed + p + 1, span) for p in range(n))
        flop = 4 * D * H * G * keys
        spans_t = torch.full((H,), span)
        ring = (None, None, None)
        if computed:
            held = min(span, computed)
            ring = (
                torch.randn(H, held, D),
                torch.randn(H, held, D),
                slot_positions(torch.tensor([computed]), spans_t[None], SINKS, held)[0],
            )
        dense_keys = n * (computed + (n + 1) / 2)
        row = {"span": span, "computed": computed, "chunk": n, "keys_fraction": round(keys / dense_keys, 4)}
        for tile in tiles:
            t = _median_time(
                lambda tile=tile, ring=ring, spans_t=spans_t: ring_prefill.prefill_attention(
                    q, k, v, *ring, computed, spans_t - SINKS, SINKS, 0.125, out, q_tile=tile
                ),
                repeats,
            )
            row[f"ring_T{tile}_ms"] = round(t * 1e3, 2)
            row[f"ring_T{tile}_gflops"] = round(flop / t / 1e9, 1)
        rows.append(row)
        print(row, flush=True)
    return rows


def _dense_rows(n: int, repeats: int) -> dict:
    """The dense chunk (computed 0) through torch's causal flash attention and through vLLM's CPU_ATTN."""
    import torch
    from vllm import _custom_ops as ops
    from vllm.v1.attention.backends.cpu_attn import _get_attn_isa

    q, k, v = torch.randn(n, H * G, D), torch.randn(n, H, D), torch.randn(n, H, D)
    flop = 4 * D * H * G * n * (n + 1) / 2
    qh = q.view(n, H, G, D).permute(1, 2, 0, 3).reshape(1, H * G, n, D)
    kh = k.permute(1, 0, 2)[None].repeat_interleave(G, 1)
    vh = v.permute(1, 0, 2)[None].repeat_interleave(G, 1)
    t_flash = _median_time(
        lambda: torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(qh, kh, vh, 0.0, True, scale=0.125),
        repeats,
    )
    isa = _get_attn_isa(torch.float32, PAGE, D)
    blocks = -(-n // PAGE)
    cache = torch.zeros(blocks + 1, H, PAGE, 2 * D)
    kc, vc = cache.view(blocks + 1, H, 2 * PAGE, D).chunk(2, dim=2)
    table = torch.arange(1, blocks + 1, dtype=torch.int32)[None]
    qsl, sl = torch.tensor([0, n], dtype=torch.int32), torch.tensor([n], dtype=torch.int32)
    out = torch.empty_like(q)

    def cpu_attn() -> None:
        ops.cpu_attn_reshape_and_cache(k, v, kc, vc, torch.arange(PAGE, PAGE + n), isa)
        md = ops.cpu_attn_get_scheduler_metadata(
            num_reqs=1, num_heads=H * G, num_kv_heads=H, head_dim=D, seq_lens=sl, dtype=torch.float32,
            query_start_loc=qsl, causal=True, sliding_window_size=-1, isa=isa, enable_kv_split=False,
        )  # fmt: skip
        ops.cpu_attention_with_kv_cache(
            query=q, key_cache=kc, value_cache=vc, output=out, query_start_loc=qsl, seq_lens=sl, scale=0.125,
            causal=True, alibi_slopes=None, sliding_window=-1, block_table=table, softcap=0.0,
            scheduler_metadata=md, s_aux=None,
        )  # fmt: skip

    t_cpu = _median_time(cpu_attn, repeats)
    return {
        "chunk": n,
        "torch_flash_causal_ms": round(t_flash * 1e3, 2),
        "torch_flash_causal_gflops": round(flop / t_flash / 1e9, 1),
        "cpu_attn_causal_ms": round(t_cpu * 1e3, 2),
        "cpu_attn_causal_gflops": round(flop / t_cpu / 1e9, 1),
        "cpu_attn_isa": isa,
    }


def kernels_part(repeats: int) -> dict:
    spans = [128, 256, 512, 1024, 2048]
    tiles = [64, 128, 256, 512]
    dense = _dense_rows(2048, repeats)
    print(dense, flush=True)
    rows = _kernel_rows(2048, spans, 0, repeats, tiles) + _kernel_rows(2048, spans, 6144, repeats, tiles)
    return {"dense_chunk": dense, "ring_prefill": rows}


# ---- engine parts ----------------------------------------------------------------------------------------------------
def _label(plan: str) -> str:
    return "stock vLLM (CPU_ATTN)" if plan == STOCK else Path(plan).stem


def prefill_times(
    model_dir: Path, plan: str, lengths: list[int], repeats: int, batched: int, make=None
) -> dict[int, float]:
    """Median seconds to prefill one prompt alone (time to its first token), per length. `make` builds the engine
    (default: ring_cache.make_llm, the embedded model's settings)."""
    from vllm import SamplingParams

    llm = (make or make_llm)(
        model_dir, plan, kv_gib=4, max_num_seqs=1, max_num_batched_tokens=batched, enable_chunked_prefill=True
    )
    engine = llm.llm_engine
    run, result = 0, {}
    for length in [WARMUP, *lengths]:  # the first run warms the engine up and is not counted
        times = []
        for _ in range(repeats if length != WARMUP or WARMUP in lengths else 1):
            run += 1  # a different prompt every run: stock vLLM's prefix cache must not hit
            engine.add_request(
                f"p{run}",
                {"prompt_token_ids": [1000 + (j * 13 + run * 101) % 5000 for j in range(length)]},
                SamplingParams(max_tokens=1, ignore_eos=True),
            )
            t0 = time.perf_counter()
            while engine.has_unfinished_requests():
                engine.step()
            times.append(time.perf_counter() - t0)
        if length != WARMUP or WARMUP in lengths:
            result[length] = statistics.median(times)
    close(llm)
    return result


def alone_part(model_dir: Path, plans: list[str], lengths: list[int], repeats: int, batched: int) -> list[dict]:
    measured = {}
    for plan in [STOCK, *plans]:
        measured[plan] = prefill_times(model_dir, plan, lengths, repeats, batched)
        print(_label(plan), measured[plan], flush=True)
    return derive(measured, lengths, *model_flops(model_dir))


def derive(measured: dict[str, dict[int, float]], lengths: list[int], lin: float, att: float) -> list[dict]:
    """Rows of measured seconds per config, with ratios to stock and to the dense plan (when one was run) and the
    ceilings beside them: at equal FLOP efficiency, at stock's fitted rates and at the dense plan's fitted rates
    (the same kernels as the sparse plans, so that ratio is the sparsity alone)."""
    a, b = fit_stock(measured[STOCK])
    dense = next((p for p in measured if p != STOCK and all(attention_fraction(p, n) == 1.0 for n in lengths)), None)
    a_d, b_d = fit_stock(measured[dense]) if dense else (None, None)
    rows = []
    for plan, times in measured.items():
        row = {"config": _label(plan), "plan": None if plan == STOCK else _relative(plan)}
        for p in lengths:
            row[f"prefill_{p}_s"] = round(times[p], 3)
            row[f"prefill_{p}_tok_s"] = round(p / times[p], 1)
            if plan == STOCK:
                continue
            f = attention_fraction(plan, p)
            ctx = (p + 1) / 2
            row[f"prefill_{p}_vs_stock"] = round(measured[STOCK][p] / times[p], 3)
            row[f"attention_fraction_{p}"] = round(f, 4)
            row[f"ideal_flop_{p}"] = round(ideal_flop(lin, att, p, f), 3)
            row[f"ideal_stock_rates_{p}"] = round((a + b * ctx) / (a + f * b * ctx), 3)
            if dense:
                row[f"prefill_{p}_vs_dense_plan"] = round(measured[dense][p] / times[p], 3)
                row[f"ideal_dense_plan_rates_{p}"] = round((a_d + b_d * ctx) / (a_d + f * b_d * ctx), 3)
        rows.append(row)
    return rows


def _relative(plan: str) -> str:
    path = Path(plan).resolve()
    return str(path.relative_to(REPO)) if path.is_relative_to(REPO) else str(path)


def rederive(path: Path, model_dir: Path) -> dict:
    """The derived columns of an `alone` result recomputed from its measured seconds (no engine is run)."""
    result = json.loads(path.read_text())
    lengths = [int(k.split("_")[1]) for k in result["results"][0] if k.startswith("prefill_") and k.endswith("_s")]
    measured = {}
    for row in result["results"]:
        plan = STOCK if row["config"].startswith("stock") else str(REPO / (row.get("plan") or PLANS / row["config"]))
        if plan != STOCK and not plan.endswith(".json"):
            plan += ".json"
        measured[plan] = {p: row[f"prefill_{p}_s"] for p in lengths}
    result["results"] = derive(measured, lengths, *model_flops(model_dir))
    result["rederived_by"] = f"python -m benchmarks.prefill_speed alone --rederive {_relative(str(path))}"
    return result


def chunk_part(model_dir: Path, plans: list[str], length: int, sizes: list[int], repeats: int) -> list[dict]:
    rows = []
    for plan in [STOCK, *plans]:
        for size in sizes:
            t = prefill_times(model_dir, plan, [length], repeats, size)[length]
            row = {"config": _label(plan), "max_num_batched_tokens": size, "prefill_tok_s": round(length / t, 1)}
            rows.append(row)
            print(rows[-1], flush=True)
    return rows


def _plot(part: str, rows: list[dict], lengths: list[int], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    if part == "alone":
        configs = [r for r in rows if "vs_stock" in " ".join(r)]
        width = 0.8 / max(len(configs), 1)
        for i, row in enumerate(configs):
            xs = [j + i * width for j in range(len(lengths))]
            ax.bar(xs, [row[f"prefill_{p}_vs_stock"] for p in lengths], width, label=row["config"])
            ax.scatter(xs, [row[f"ideal_stock_rates_{p}"] for p in lengths], marker="_", s=200, color="black")
        ax.axhline(1.0, color="grey", lw=0.8)
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(lengths))], [f"{p} tokens" for p in lengths])
        ax.set_ylabel("prefill tok/s vs stock (bars); ceiling at stock's rates (-)")
    else:
        for config in dict.fromkeys(r["config"] for r in rows):
            pts = [r for r in rows if r["config"] == config]
            ax.plot([r["max_num_batched_tokens"] for r in pts], [r["prefill_tok_s"] for r in pts], "o-", label=config)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("max_num_batched_tokens")
        ax.set_ylabel("prefill tok/s (one 8k prompt)")
    ax.set_title(f"prefill, CPU ({os.cpu_count()} cores), embedded model, fp32")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("part", choices=["kernels", "alone", "chunk"])
    ap.add_argument("--plans", nargs="*", default=None)
    ap.add_argument("--lengths", type=int, nargs="*", default=[2048, 4096, 8000])
    ap.add_argument("--sizes", type=int, nargs="*", default=[512, 1024, 2048, 4096, 8192])
    ap.add_argument("--max-num-batched-tokens", type=int, default=2048)
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--rederive", type=Path, default=None, help="alone: recompute an existing result's derived columns")
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    meta = _meta(args.part, argv)
    name = args.out / f"prefill_speed_{args.part}"
    if args.part == "kernels":
        result = meta | kernels_part(args.repeats or 5)
    else:
        from moa_vllm.model import prepare_embedded_model

        model_dir = prepare_embedded_model(progress=False)
        meta |= {"dtype": "float32", "block_size": 128, "max_model_len": 8192}
        if args.part == "alone" and args.rederive:
            result = rederive(args.rederive, model_dir)
            args.rederive.write_text(json.dumps(result, indent=1))
            _plot("alone", result["results"], args.lengths, args.rederive.with_suffix(".png"))
            print(json.dumps(result["results"], indent=1))
            return 0
        if args.part == "alone":
            names = args.plans if args.plans is not None else [str(PLANS / f"{n}.json") for n in DEFAULT_PLANS]
            rows = alone_part(model_dir, names, args.lengths, args.repeats or 1, args.max_num_batched_tokens)
            meta |= {"max_num_batched_tokens": args.max_num_batched_tokens}
        else:
            names = args.plans if args.plans is not None else [str(PLANS / "moa-d0.25.json")]
            rows = chunk_part(model_dir, names, max(args.lengths), args.sizes, args.repeats or 1)
        _plot(args.part, rows, args.lengths, name.with_suffix(".png"))
        result = meta | {"results": rows}
    name.with_suffix(".json").write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
