"""Real model shapes on CPU with vLLM's dummy weights (no download, token-id prompts): stock vLLM vs a model's MoA
reference plan vs the uniform plan of the same density (CPU figures; float32; block size 128).

Shapes (model folders with a config.json only, built under --work):
  llama-3.2-1b   Llama-3.2-1B-Instruct's real config (plans/Llama-3.2-1B-Instruct/config.json): 16 layers, 32 query
                 heads, 8 KV heads, head dim 64, MLP 8192; its reference plan plans/.../moa-reference.json.
  8b-attention   Llama-3-8B's attention geometry (32 query heads, 8 KV heads, head dim 128, hidden 4096) in 4 layers
                 with a 1024-wide MLP and a 32000-token vocabulary (so that it runs here); its plan is the
                 Llama-3-8B-Instruct-262k reference's layers 0, 10, 21, 31 (their rules unchanged).

Parts (each writes benchmarks/results/real_shapes/<part>.json with its command):
  concurrency  vLLM's reported max concurrency at a fixed KV budget for max_model_len 8k and 32k (engine start only),
               beside the plan's own arithmetic (blocks per request from the ring formula).
  decode       requests of max_model_len tokens submitted at once at the fixed budget: the most running, decode
               step time and tok/s at that many (ring_cache.measure_concurrency), and a decode step at equal batch.
  attention    one layer's decode attention per step at the shape (decode_speed's engine-free harness): stock
               CPU_ATTN vs the moa path over the same bytes (dense plan) and with the reference plan's own
               per-head spans (its bytes), every layer of the shape in turn; --rounds rotated rounds, the median
               of their side-by-side ratios reported.
  prefill      one prompt's prefill alone (time to first token), tok/s.
  plot         real_shapes.png from the JSON the other parts wrote (every figure as a ratio to stock).

Usage: python -m benchmarks.real_shapes {concurrency,decode,attention,prefill,plot} [--shape S ...] [--kv-gib G]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from functools import partial
from pathlib import Path

os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
RESULTS = REPO / "benchmarks" / "results" / "real_shapes"
BLOCK = 128
STOCK = "stock"
EIGHT_B_LAYERS = (0, 10, 21, 31)


def shape_config(shape: str) -> dict:
    """The config.json of a benchmark shape (architecture facts only; vLLM's dummy loader makes the weights)."""
    if shape == "llama-3.2-1b":
        config = json.loads((REPO / "plans" / "Llama-3.2-1B-Instruct" / "config.json").read_text())
    elif shape == "8b-attention":
        config = json.loads((REPO / "plans" / "Llama-3-8B-Instruct-262k" / "config.json").read_text())
        config |= {"num_hidden_layers": len(EIGHT_B_LAYERS), "intermediate_size": 1024, "vocab_size": 32000}
    else:
        raise ValueError(f"unknown shape {shape!r}")
    config = {k: v for k, v in config.items() if not k.startswith("_")}
    return config | {"torch_dtype": "float32", "bos_token_id": 1, "eos_token_id": 2}


def reference_plan(shape: str, out: Path) -> Path:
    """The shape's MoA reference plan as a file that fits the shape's model folder."""
    from moa_vllm.plan import load_plan, save_plan

    if shape == "llama-3.2-1b":
        return REPO / "plans" / "Llama-3.2-1B-Instruct" / "moa-reference.json"
    plan = load_plan(REPO / "plans" / "Llama-3-8B-Instruct-262k" / "moa-reference.json")
    rules = [plan.rules[i] for i in EIGHT_B_LAYERS]
    model = plan.model.model_copy(update={"num_layers": len(rules)})
    notes = f"layers {list(EIGHT_B_LAYERS)} of plans/Llama-3-8B-Instruct-262k/moa-reference.json, rules unchanged"
    meta = plan.metadata.model_copy(update={"notes": notes})
    return save_plan(plan.model_copy(update={"model": model, "rules": rules, "metadata": meta}), out)


def density_at(plan_path: Path, n: int) -> float:
    from moa_vllm.plan import load_plan

    plan = load_plan(plan_path)
    spans = [r.span(n, plan.min_span) for layer in plan.rules for r in layer]
    return sum(spans) / (len(spans) * n)


def reference_spans(plan_path: Path, n: int):
    """The plan's spans [layers, KV heads] for a request of n tokens (its heterogeneous per-head rings)."""
    import torch

    from moa_vllm.plan import load_plan

    plan = load_plan(plan_path)
    return torch.tensor([[r.span(n, plan.min_span) for r in layer] for layer in plan.rules])


def prepare(shape: str, work: Path) -> tuple[Path, dict[str, str]]:
    """The shape's model folder and its plans: reference, and uniform at the reference's density at 8k."""
    from moa_vllm.plan import fingerprint_from_hf_config, save_plan, uniform_plan

    folder = work / shape
    folder.mkdir(parents=True, exist_ok=True)
    config = shape_config(shape)
    (folder / "config.json").write_text(json.dumps(config, indent=1))
    ref = reference_plan(shape, folder / "moa-reference.json")
    density = round(density_at(ref, 8192), 3)
    uniform = save_plan(uniform_plan(fingerprint_from_hf_config(config), density), folder / f"uniform-d{density}.json")
    return folder, {"reference": str(ref), "uniform": str(uniform)}


def make_llm(model_dir: Path, plan: str, kv_gib: float, max_model_len: int, **kwargs):
    from vllm import LLM

    moa = {} if plan == STOCK else {"attention_backend": "moa", "additional_config": {"moa": {"plan": plan}}}
    return LLM(
        model=str(model_dir),
        load_format="dummy",
        skip_tokenizer_init=True,
        max_model_len=max_model_len,
        dtype="float32",
        enforce_eager=True,
        block_size=BLOCK,
        seed=0,
        kv_cache_memory_bytes=int(kv_gib * 2**30),
        **moa,
        **kwargs,
    )


def _label(name: str, plan: str) -> str:
    return "stock vLLM (CPU_ATTN)" if plan == STOCK else f"{name} ({Path(plan).name})"


def plan_concurrency(plan_path: str, config: dict, n: int, budget: int) -> dict:
    """The ring formula's blocks per request of N tokens and the concurrency the budget gives at that."""
    from moa_vllm.plan import load_plan
    from moa_vllm.plan.ring import group_blocks, layer_blocks

    plan = load_plan(plan_path)
    heads, dim = (
        config["num_key_value_heads"],
        config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"],
    )
    layers = len(plan.rules)
    block_bytes = layers * heads * BLOCK * 2 * dim * 4  # one block of the MoA group: a layer page per layer, fp32
    blocks = group_blocks(
        [layer_blocks([r.alpha for r in rules], [r.beta for r in rules], n, plan.min_span, BLOCK, heads)
         for rules in plan.rules],
        layers,
    )  # fmt: skip
    pages = sum(-(-r.span(n, plan.min_span) // BLOCK) for layer in plan.rules for r in layer)
    tokens = sum(r.span(n, plan.min_span) for layer in plan.rules for r in layer)
    return {
        "blocks_per_request": blocks,
        "pages_per_request": pages,
        "pages_if_unaligned": tokens / BLOCK,
        "concurrency": budget // block_bytes / blocks,
    }


def concurrency_part(shapes: list[str], work: Path, kv_gib: float, lengths: list[int]) -> list[dict]:
    from vllm.v1.core.kv_cache_utils import get_max_concurrency_for_kv_cache_config

    from benchmarks.ring_cache import close, core_of

    rows = []
    for shape in shapes:
        folder, plans = prepare(shape, work)
        config = shape_config(shape)
        layers, heads = config["num_hidden_layers"], config["num_key_value_heads"]
        dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
        stock_per_request = {n: layers * -(-n // BLOCK) * heads * BLOCK * 2 * dim * 4 for n in lengths}
        for n in lengths:
            base = None
            for name, plan in (("stock", STOCK), *plans.items()):
                t0 = time.perf_counter()
                try:
                    llm = make_llm(folder, plan, kv_gib, n, max_num_seqs=256, max_num_batched_tokens=2048)
                except (ValueError, RuntimeError) as err:  # vLLM refuses a budget below one request: a result
                    row = {"shape": shape, "max_model_len": n, "config": _label(name, plan), "kv_gib": kv_gib}
                    rows.append(row | {"vllm_max_concurrency": 0.0, "refused": str(err).splitlines()[-1][:300]})
                    print(rows[-1], flush=True)
                    base = base if plan != STOCK else None
                    continue
                core = core_of(llm)
                reported = get_max_concurrency_for_kv_cache_config(core.vllm_config, core.scheduler.kv_cache_config)
                num_blocks = core.scheduler.kv_cache_config.num_blocks
                close(llm)
                row = {
                    "shape": shape,
                    "max_model_len": n,
                    "config": _label(name, plan),
                    "kv_gib": kv_gib,
                    "num_blocks": num_blocks,
                    "vllm_max_concurrency": round(reported, 3),
                    "startup_s": round(time.perf_counter() - t0, 1),
                }
                if plan == STOCK:
                    base = reported
                    row["arithmetic_concurrency"] = round(int(kv_gib * 2**30) / stock_per_request[n], 3)
                else:
                    arith = plan_concurrency(plan, config, n, int(kv_gib * 2**30))
                    density = density_at(Path(plan), n)
                    row |= {
                        "density": round(density, 4),
                        "arithmetic": arith,
                        "arithmetic_concurrency": round(arith["concurrency"], 3),
                        "vs_stock": round(reported / base, 3) if base else None,
                        "density_arithmetic_vs_stock": round(1 / density, 3),
                        # the acceptance's tolerance: one page per head, per request (alignment)
                        "alignment_pages_per_request": arith["pages_per_request"] - arith["pages_if_unaligned"],
                        "pages_per_request_if_density_exact": round(density * n * layers * heads / BLOCK, 1),
                    }
                print(row, flush=True)
                rows.append(row)
    return rows


def decode_part(
    shapes: list[str], work: Path, kv_gib: float, n: int, gen: int, requests: int, rounds: int = 1
) -> list[dict]:
    """The fixed budget filled with N-token requests (prompt N - gen, gen decoded), as ring_cache does, in `rounds`
    rounds that each run every configuration once in a rotated order: the machine drifts by up to 2x between runs
    minutes apart, so a plan's ratio to stock is taken within each round and the median over rounds reported (every
    round's row is kept in the result)."""
    from benchmarks import ring_cache

    rows = []
    for shape in shapes:
        folder, plans = prepare(shape, work)
        configs = [("stock", STOCK), *plans.items()]
        runs: dict[str, list[dict]] = {name: [] for name, _ in configs}
        for i in range(rounds):
            for name, plan in configs[i % len(configs) :] + configs[: i % len(configs)]:
                make = partial(make_llm, max_model_len=n)
                run = ring_cache.measure_concurrency(
                    folder, plan, kv_gib, requests, n - gen, gen, make=make, stop_at_peak=rounds > 1
                )
                print({"shape": shape, "round": i, "config": name} | run, flush=True)
                runs[name].append(run)
        for name, plan in configs:
            rows.append(_decode_row(shape, name, plan, n, runs[name], runs["stock"]))
            print(rows[-1], flush=True)
    return rows


def _decode_row(shape: str, name: str, plan: str, n: int, runs: list[dict], stock: list[dict]) -> dict:
    """One configuration's row: its first round's fields, medians over rounds of step time and tok/s, and (plans)
    the median of the rounds' tok/s ratios to stock beside the acceptance's target 0.8 x the running ratio."""
    import statistics

    row = dict(runs[0]) | {"shape": shape, "config": _label(name, plan), "max_model_len": n, "rounds": len(runs)}
    measured = [r for r in runs if r.get("decode_tok_s_at_max")]
    if measured:
        row["decode_step_s_median"] = round(statistics.median(r["decode_step_s_median"] for r in measured), 4)
        row["decode_tok_s_at_max"] = round(statistics.median(r["decode_tok_s_at_max"] for r in measured), 2)
    if len(runs) > 1:
        row["rounds_detail"] = [
            {k: r.get(k) for k in ("max_running_observed", "decode_step_s_median", "decode_tok_s_at_max", "wall_s")}
            for r in runs
        ]
    if plan == STOCK:
        return row
    both = zip(runs, stock, strict=True)
    pairs = [(r, s) for r, s in both if r.get("decode_tok_s_at_max") and s.get("decode_tok_s_at_max")]
    if pairs:
        ratio = statistics.median(r["max_running_observed"] / s["max_running_observed"] for r, s in pairs)
        tok = [r["decode_tok_s_at_max"] / s["decode_tok_s_at_max"] for r, s in pairs]
        row["concurrency_vs_stock"] = round(ratio, 3)
        row["decode_tok_s_vs_stock"] = round(statistics.median(tok), 3)
        row["decode_tok_s_vs_stock_rounds"] = [round(t, 3) for t in tok]
        row["target_0.8x_concurrency_ratio"] = round(0.8 * ratio, 3)
        row["target_0.8x_reported_concurrency_ratio"] = round(
            0.8 * row["vllm_max_concurrency"] / stock[0]["vllm_max_concurrency"], 3
        )
    return row


def attention_part(
    shapes: list[str], work: Path, contexts: list[int], requests: int, repeats: int, rounds: int = 1
) -> list[dict]:
    from benchmarks.decode_speed import AttentionShape, attention_rows

    rows = []
    for shape in shapes:
        config = shape_config(shape)
        _, plans = prepare(shape, work)
        heads = config["num_key_value_heads"]
        dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
        geometry = AttentionShape(heads, config["num_attention_heads"] // heads, dim, BLOCK)
        plan_spans = {ctx: reference_spans(Path(plans["reference"]), ctx + 1) for ctx in contexts}
        for row in attention_rows(
            geometry, contexts, requests, repeats, config["num_hidden_layers"], plan_spans, rounds=rounds
        ):
            rows.append({"shape": shape} | row)
    return rows


def prefill_part(shapes: list[str], work: Path, lengths: list[int], repeats: int, batched: int) -> list[dict]:
    from benchmarks.prefill_speed import prefill_times

    rows = []
    for shape in shapes:
        folder, plans = prepare(shape, work)
        n = max(lengths) + 16
        base = None
        for name, plan in (("stock", STOCK), *plans.items()):
            times = prefill_times(folder, plan, lengths, repeats, batched, make=partial(make_llm, max_model_len=n))
            row = {"shape": shape, "config": _label(name, plan)}
            for length, t in times.items():
                row[f"prefill_{length}_s"] = round(t, 3)
                row[f"prefill_{length}_tok_s"] = round(length / t, 1)
                if base:
                    row[f"prefill_{length}_vs_stock"] = round(base[f"prefill_{length}_s"] / t, 3)
            base = base or row
            print(row, flush=True)
            rows.append(row)
    return rows


def plot(results: Path) -> Path:
    """One figure, four panels, each figure a ratio to stock vLLM on the same shape: reported concurrency at the
    budget, decode tok/s at the budget, attention per layer per decode step, prefill tok/s."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def rows(part: str) -> list[dict]:
        return [r for f in sorted(results.glob(f"{part}*.json")) for r in json.loads(f.read_text())["results"]]

    fig, axes = plt.subplots(1, 4, figsize=(16, 4))
    bars: list[list[tuple[str, float]]] = [
        [(f"{r['shape']}\n{r['max_model_len'] // 1024}k {r['config'].split(' ')[0]}", r["vs_stock"])
         for r in rows("concurrency") if r.get("vs_stock")],
        [(f"{r['shape']}\n{r['max_model_len'] // 1024}k {r['kv_gib']:g} GiB {r['config'].split(' ')[0]}",
          r["decode_tok_s_vs_stock"]) for r in rows("decode") if r.get("decode_tok_s_vs_stock")],
        [(f"{r['shape']}\n{r['context'] // 1024}k {kind}", 1 / r[f"ratio_{kind}_bytes"])
         for r in rows("attention") for kind in ("same", "plan")],
        [(f"{r['shape']}\n{k.split('_')[1]} {r['config'].split(' ')[0]}", r[k])
         for r in rows("prefill") for k in r if k.endswith("_vs_stock")],
    ]  # fmt: skip
    titles = ["reported max concurrency", "decode tok/s (KV budget in GiB)", "attention speed per layer (1 / time)",
              "prefill tok/s"]  # fmt: skip
    for ax, data, title in zip(axes, bars, titles):
        ax.barh(range(len(data)), [v for _, v in data], color="tab:blue")
        ax.set_yticks(range(len(data)), [label for label, _ in data], fontsize=6)
        ax.axvline(1.0, color="k", lw=0.8)
        ax.set_title(f"{title}\nx stock vLLM", fontsize=9)
        ax.invert_yaxis()
    fig.suptitle("MoA reference plans vs stock vLLM at real shapes, CPU (2 cores), fp32, dummy weights", fontsize=10)
    fig.tight_layout()
    out = results / "real_shapes.png"
    fig.savefig(out, dpi=100)
    return out


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("part", choices=["concurrency", "decode", "attention", "prefill", "plot"])
    ap.add_argument("--shape", nargs="+", default=["llama-3.2-1b", "8b-attention"])
    ap.add_argument("--kv-gib", type=float, default=2.0)
    ap.add_argument("--lengths", type=int, nargs="+", default=None)
    ap.add_argument("--gen", type=int, default=32)
    ap.add_argument("--requests", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--rounds", type=int, default=7, help="attention: rounds of every configuration, rotated")
    ap.add_argument("--decode-rounds", dest="rounds_decode", type=int, default=1, help="decode: rounds, rotated")
    ap.add_argument("--max-num-batched-tokens", type=int, default=2048)
    ap.add_argument("--work", type=Path, default=Path("/tmp/moa-real-shapes"))
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--tag", default="", help="appended to the result's file name (<part>-<tag>.json)")
    a = ap.parse_args(argv)
    if a.part == "plot":
        print(plot(a.out))
        return 0
    meta = {
        "command": "python -m benchmarks.real_shapes " + " ".join(argv),
        "device": f"CPU ({platform.machine()}, {os.cpu_count()} cores); all figures are CPU figures",
        "dtype": "float32",
        "block_size": BLOCK,
        "weights": "vLLM dummy weights (--load-format dummy); prompts are token ids",
        "shapes": {s: shape_config(s) for s in a.shape},
    }
    if a.part == "concurrency":
        rows = concurrency_part(a.shape, a.work, a.kv_gib, a.lengths or [8192, 32768])
    elif a.part == "decode":
        n = (a.lengths or [8192])[0]
        rows = decode_part(a.shape, a.work, a.kv_gib, n, a.gen, a.requests, a.rounds_decode)
    elif a.part == "attention":
        rows = attention_part(a.shape, a.work, a.lengths or [2048, 8192, 32768], 4, a.repeats or 10, a.rounds)
    else:
        rows = prefill_part(a.shape, a.work, a.lengths or [2048, 8000], a.repeats or 1, a.max_num_batched_tokens)
    meta["kv_gib"] = a.kv_gib
    a.out.mkdir(parents=True, exist_ok=True)
    path = a.out / f"{a.part}{'-' + a.tag if a.tag else ''}.json"
    path.write_text(json.dumps(meta | {"results": rows}, indent=1) + "\n")
    print(f"wrote {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
