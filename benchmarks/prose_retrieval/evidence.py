"""Where a plan loses answers dense finds: for every prompt of a finished run, the dense model's attention mass from
the last prompt position (which predicts the answer's first token) onto the facts, per (layer, KV head), and how
much of it falls on heads whose span under the plan cannot see the facts.

`python -m benchmarks.prose_retrieval.evidence --plan moa-d0.50` (a shipped plan's name, or a plan file) reads
RESULTS/dense.json and RESULTS/<plan>.json, rebuilds their prompts (same grid), runs the HF model once per prompt
(float32, no vLLM) and writes RESULTS/evidence-<plan>.json: per prompt the mass the plan cuts and whether each plan
answered, and per head the mean needle mass with the share of prompts whose facts it can see under the plan. The
dense masses do not depend on the plan: they are kept in RESULTS/needle-mass.json by prompt, so the next plan's
evidence on the same grid costs seconds, not a forward pass per prompt."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from benchmarks.prose_retrieval import corpora as corpora_
from benchmarks.prose_retrieval.cli import PLANS, REPO
from benchmarks.prose_retrieval.results import SPAN_GRID, answer_key
from benchmarks.prose_retrieval.tasks import DEFAULT_PAIRS, ProseCase, build_grid
from moa_vllm.plan import Plan, load_plan, visible
from moa_vllm.plan.span import served_length
from moa_vllm.planner import profile as prof


def needle_mass(model, case: ProseCase) -> np.ndarray:
    """[layers, kv_heads]: attention mass of the last prompt position on the facts' tokens, summed over each KV
    head's query group (so a KV head's value is in [0, group])."""
    prof.use_capture_attention(model)
    with torch.no_grad(), prof.capturing() as capture:
        model(input_ids=torch.tensor([case.prompt_ids]), use_cache=False, logits_to_keep=1)  # attention only
    query = case.prompt_tokens - 1
    keys = torch.tensor([k for a, b in case.fact_spans for k in range(a, b)])
    out = []
    for layer in range(len(capture.layers)):
        rec = capture.layers.pop(layer)
        out.append(_per_kv_head(rec, query, keys, rec.q.shape[0] // rec.k.shape[0]))
    return np.stack(out)


def _per_kv_head(rec, query: int, keys: torch.Tensor, group: int) -> np.ndarray:
    mass = np.zeros(rec.k.shape[0])
    for h in range(rec.q.shape[0]):
        scores = (rec.q[h, query].float() @ rec.k[h // group, : query + 1].float().T) * rec.scaling
        mass[h // group] += float(scores.softmax(-1)[keys].sum())
    return mass


def sees(plan: Plan, case: ProseCase, max_model_len: int) -> np.ndarray:
    """[layers, kv_heads] bool: the head's span lets the last prompt position see a token of every fact."""
    n, cap = served_length(case.prompt_tokens, case.max_tokens, max_model_len, SPAN_GRID)
    query = case.prompt_tokens - 1
    return np.array(
        [
            [
                all(any(visible(query, k, plan.sink_tokens, w) for k in range(a, b)) for a, b in case.fact_spans)
                for w in layer
            ]
            for layer in plan.windows(n, cap)
        ]
    )


def plan_path(plan: str) -> Path:
    """A shipped plan's name (plans/<model>/<name>.json) or a plan file."""
    return Path(plan) if plan.endswith(".json") else PLANS / f"{plan}.json"


def load_masses(path: Path, model: str) -> dict[str, np.ndarray]:
    doc = json.loads(path.read_text()) if path.exists() else {}
    if doc and doc.get("model") != model:
        raise SystemExit(f"{path} holds the needle masses of {doc.get('model')}, not {model}: move it away")
    return {k: np.array(v) for k, v in doc.get("masses", {}).items()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.prose_retrieval.evidence", description=__doc__)
    p.add_argument("--plan", default="moa-d0.50", help="a shipped plan's name or a plan file (its stem names results)")
    p.add_argument("--results", type=Path, default=REPO / "benchmarks" / "results" / "prose_retrieval")
    p.add_argument("--limit", type=int, default=None, help="at most this many prompts (longest last)")
    args = p.parse_args(argv)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from moa_vllm.model import prepare_embedded_model

    torch.set_num_threads(2)
    path = plan_path(args.plan)
    dense, run = (json.loads((args.results / f"{n}.json").read_text()) for n in ("dense", path.stem))
    plan = load_plan(path)
    model_dir = prepare_embedded_model(progress=False)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    grid, settings = run["grid"], run["settings"]
    cases = build_grid(tokenizer, [corpora_.load(c) for c in grid["corpora"]], grid["lengths"], tuple(grid["depths"]),
                       DEFAULT_PAIRS, grid["seeds"], settings["answer_tokens"])  # fmt: skip
    by_prompt = {
        n: {(r["prompt_sha"], r["max_tokens"]): r for r in doc["cases"]} for n, doc in (("dense", dense), ("plan", run))
    }
    keys = [answer_key(c) for c in cases]
    missing = [n for n, recs in by_prompt.items() for k in keys if k not in recs]
    if missing:
        raise SystemExit(f"{len(missing)} rebuilt prompts are not in the results ({sorted(set(missing))}): rerun them")
    cache_path = args.results / "needle-mass.json"
    cache = load_masses(cache_path, model_dir.name)
    model = None
    order = sorted(range(len(cases)), key=lambda i: cases[i].prompt_tokens)[: args.limit]
    prompts, masses, seen = [], [], []
    for i in order:
        case, key = cases[i], keys[i]
        if key[0] not in cache:
            if model is None:
                model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
            cache[key[0]] = needle_mass(model, case)
            cache_path.write_text(
                json.dumps({"model": model_dir.name, "masses": {k: np.round(v, 6).tolist() for k, v in cache.items()}})
                + "\n"
            )
        mass, visible_ = cache[key[0]], sees(plan, case, settings["max_model_len"])
        masses.append(mass)
        seen.append(visible_)
        prompts.append(
            {
                "form": case.form,
                "corpus": case.corpus,
                "length": case.length,
                "depths": list(case.depths),
                "dense_correct": by_prompt["dense"][key]["correct"],
                "plan_correct": by_prompt["plan"][key]["correct"],
                "needle_mass": round(float(mass.sum()), 4),
                "cut_mass_share": round(float(mass[~visible_].sum() / max(mass.sum(), 1e-12)), 4),
                "heads_seeing": round(float(visible_.mean()), 4),
            }
        )
        print(json.dumps(prompts[-1]), flush=True)
    mass, seen_ = np.stack(masses), np.stack(seen)
    heads = [
        {
            "layer": layer,
            "kv_head": h,
            "mean_needle_mass": round(float(mass[:, layer, h].mean()), 4),
            "sees_share": round(float(seen_[:, layer, h].mean()), 4),
        }  # fmt: skip
        for layer in range(mass.shape[1])
        for h in range(mass.shape[2])
    ]
    heads.sort(key=lambda x: -x["mean_needle_mass"])

    def group(rows: list[dict]) -> dict:
        if not rows:
            return {"prompts": 0}
        return {"prompts": len(rows), "cut_mass_share": round(float(np.mean([r["cut_mass_share"] for r in rows])), 4),
                "heads_seeing": round(float(np.mean([r["heads_seeing"] for r in rows])), 4)}  # fmt: skip

    lost = [r for r in prompts if r["dense_correct"] and not r["plan_correct"]]
    kept = [r for r in prompts if r["dense_correct"] and r["plan_correct"]]
    doc = {"plan": path.stem, "lost": group(lost), "kept": group(kept), "prompts": prompts, "heads": heads}
    out = args.results / f"evidence-{path.stem}.json"
    out.write_text(json.dumps(doc, indent=1) + "\n")
    print(json.dumps({"lost": doc["lost"], "kept": doc["kept"], "top_heads": heads[:8]}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
