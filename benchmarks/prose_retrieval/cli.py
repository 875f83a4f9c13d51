"""`python -m benchmarks.prose_retrieval`: needle retrieval in natural prose for a list of plans, one engine per
plan, every plan on the same prompts; results per plan (resumable per prompt: an answer stored for the same plan
file, prompt ids, answer budget and engine settings is kept, only the other prompts run), a summary with each
plan's accuracy relative to the reference plan, and figures."""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shlex
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

from benchmarks.accuracy.engine import EngineSettings, run_plan
from benchmarks.prose_retrieval import corpora as corpora_
from benchmarks.prose_retrieval.plots import plot_cells, plot_forms
from benchmarks.prose_retrieval.results import SPAN_GRID, answer_key, case_record, ratios_by, summary
from benchmarks.prose_retrieval.tasks import DEFAULT_DEPTHS, DEFAULT_PAIRS, ProseCase, build_grid
from moa_vllm.plan import load_plan

REPO = Path(__file__).resolve().parents[2]
PLANS = REPO / "plans" / "SmolLM2-135M-Instruct"
DEFAULT_PLANS = [PLANS / f"{n}.json" for n in ("dense", "uniform-d0.50", "moa-d0.50", "uniform-d0.25", "moa-d0.25")]
RESULT_KIND = "moa-vllm prose retrieval v1"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.prose_retrieval", description=__doc__)
    p.add_argument("--plans", nargs="+", type=Path, default=DEFAULT_PLANS, help="plan files (one engine each)")
    p.add_argument("--reference", type=Path, default=PLANS / "dense.json", help="the ratio's baseline plan")
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "prose_retrieval")
    p.add_argument("--model", type=Path, default=None, help="HF folder (default: the embedded model)")
    p.add_argument("--corpora", nargs="+", default=list(corpora_.LOADERS), choices=list(corpora_.LOADERS))
    p.add_argument("--lengths", nargs="+", type=int, default=[1024, 2048, 4096, 8192])
    p.add_argument("--depths", nargs="+", type=float, default=list(DEFAULT_DEPTHS))
    p.add_argument("--seeds", type=int, default=1, help="prompts per cell")
    p.add_argument("--answer-tokens", type=int, default=24,
                   help="answer budget per value asked for (the model often restates the question first)")  # fmt: skip
    p.add_argument("--max-model-len", type=int, default=8192)
    p.add_argument("--summary-only", action="store_true", help="rebuild summary + figures from the results in --out")
    return p.parse_args(argv)


def grid_digest(cases: list[ProseCase]) -> str:
    return hashlib.sha256(json.dumps([[c.prompt_ids, c.max_tokens] for c in cases]).encode()).hexdigest()[:16]


def stored_answers(old: dict, plan_sha: str, model: str, max_model_len: int) -> dict[tuple[str, int], dict]:
    """Records of an earlier result that still hold: same plan file, model and engine settings; keyed by what
    generated each answer (prompt ids, answer budget)."""
    same = (
        old.get("kind") == RESULT_KIND
        and old.get("plan", {}).get("sha256") == plan_sha
        and old.get("model") == model
        and old.get("settings", {}).get("max_model_len") == max_model_len
        and old.get("settings", {}).get("span_grid") == SPAN_GRID
    )
    return {(r["prompt_sha"], r["max_tokens"]): r for r in old.get("cases", []) if same and "prompt_sha" in r}


def evaluate(args, settings: EngineSettings, path: Path, cases: list[ProseCase], digest: str, old: dict) -> dict:
    import vllm

    plan = load_plan(path)
    plan_sha = hashlib.sha256(path.read_bytes()).hexdigest()
    stored = stored_answers(old, plan_sha, settings.model_dir.name, args.max_model_len)
    todo = [c for c in cases if answer_key(c) not in stored]
    wall = {"engine_start": 0.0, "generate": 0.0}
    if todo:
        run = run_plan(settings, path, [c.prompt_ids for c in todo], [c.max_tokens for c in todo], [])
        wall = {"engine_start": run.engine_start_s, "generate": run.generate_s}
        for c, a in zip(todo, run.answers):
            stored[answer_key(c)] = case_record(c, a, plan, args.max_model_len)
    records = [stored[answer_key(c)] for c in cases]
    return {
        "kind": RESULT_KIND,
        "command": "python -m benchmarks.prose_retrieval " + shlex.join(sys.argv[1:]),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "device": f"CPU ({os.cpu_count()} cores, {platform.machine()})",
        "vllm_version": vllm.__version__,
        "model": settings.model_dir.name,
        "plan": {"name": path.stem, "sha256": plan_sha},
        "grid": {
            "digest": digest,
            "lengths": args.lengths,
            "depths": args.depths,
            "pairs": DEFAULT_PAIRS,
            "seeds": args.seeds,
            "corpora": args.corpora,
            "prompts": len(cases),
        },
        "settings": {
            "answer_tokens": args.answer_tokens,  # per value asked for; each case's budget is in its record
            "max_model_len": args.max_model_len,
            "dtype": "float32",
            "span_grid": SPAN_GRID,  # prefix caching on, as served
            "sampling": "greedy",
        },
        "wall_s": wall,  # of this invocation's prompts only
        "prompts_run": len(todo),
        "prompts_reused": len(cases) - len(todo),
        "summary": summary(records),
        "cases": records,
    }


def render(results: dict[str, dict], ratios: dict[str, dict], reference: str) -> str:
    forms = list(next(iter(results.values()))["summary"]["by_form"])
    head = "| plan | all | " + " | ".join(forms) + f" | all / {reference} (95% CI) |"
    lines = [head, "|" + "---|" * (len(forms) + 3)]

    def cell(p: dict) -> str:
        return f"{p['accuracy']:.2f} [{p['ci95'][0]:.2f}, {p['ci95'][1]:.2f}]"

    for name, r in results.items():
        s, q = r["summary"], ratios[name]["all"]
        ratio = "-" if q["ratio"] is None else f"{q['ratio']:.2f} [{q['ci95'][0]:.2f}, {q['ci95'][1]:.2f}]"
        lines.append(
            f"| {name} | {cell(s['all'])} | " + " | ".join(cell(s["by_form"][f]) for f in forms) + f" | {ratio} |"
        )
    return "\n".join(lines) + "\n"


def write_summary(out: Path, reference: str) -> dict:
    results = {}
    for path in sorted(out.glob("*.json")):
        doc = json.loads(path.read_text())
        if doc.get("kind") == RESULT_KIND:
            results[doc["plan"]["name"]] = doc
    if reference not in results:
        raise SystemExit(f"no result for the reference plan {reference} in {out}")
    groups = [("form", lambda r: r["form"]), ("corpus", lambda r: r["corpus"]), ("length", lambda r: r["length"])]
    ratios = {n: ratios_by(r["cases"], results[reference]["cases"], groups) for n, r in results.items()}
    doc = {"reference": reference, "plans": {n: r["summary"] for n, r in results.items()}, "ratio_to_reference": ratios}
    (out / "summary.json").write_text(json.dumps(doc, indent=1) + "\n")
    (out / "summary.md").write_text(render(results, ratios, reference))
    first = next(iter(results.values()))
    plot_forms(results, out / "forms.png")
    plot_cells(results, first["grid"]["lengths"], first["grid"]["depths"], out / "cells.png")
    return doc


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    if not args.summary_only:
        from transformers import AutoTokenizer

        from moa_vllm.model import prepare_embedded_model

        model = args.model or prepare_embedded_model(progress=False)
        tokenizer = AutoTokenizer.from_pretrained(model)
        corpora = [corpora_.load(name) for name in args.corpora]
        cases = build_grid(tokenizer, corpora, args.lengths, tuple(args.depths), DEFAULT_PAIRS, args.seeds,
                           args.answer_tokens)  # fmt: skip
        digest = grid_digest(cases)
        settings = EngineSettings(model_dir=Path(model), max_model_len=args.max_model_len)
        print(f"{len(cases)} prompts, {sum(c.prompt_tokens for c in cases)} prompt tokens per plan", flush=True)
        for path in args.plans:
            target = args.out / f"{path.stem}.json"
            old = json.loads(target.read_text()) if target.exists() else {}
            if (
                old.get("grid", {}).get("digest") == digest
                and old.get("plan", {}).get("sha256") == hashlib.sha256(path.read_bytes()).hexdigest()
            ):
                print(f"{path.stem}: up to date, skipped", flush=True)
                continue
            start = time.perf_counter()
            result = evaluate(args, settings, path.resolve(), cases, digest, old)
            target.write_text(json.dumps(result, indent=1) + "\n")
            acc = result["summary"]["all"]
            print(
                f"{path.stem}: {acc['accuracy']:.3f} {acc['ci95']} ({result['prompts_run']} prompts run, "
                f"{result['prompts_reused']} kept) in {time.perf_counter() - start:.0f} s",
                flush=True,
            )
    doc = write_summary(args.out, args.reference.stem)
    print((args.out / "summary.md").read_text())
    return 0 if doc else 1
