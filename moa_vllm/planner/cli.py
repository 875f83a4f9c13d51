"""`moa-plan`: the offline MoA planner. Steps calibrate, profile, optimize, validate; `run` does all of them.

Every step writes its artefact into --work-dir and skips itself when that artefact already matches its inputs, so
an interrupted run continues where it stopped and several densities share one calibration and profile.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from moa_vllm.planner.rules import DEFAULT_NUM_BETAS

STEPS = ("calibrate", "profile", "optimize", "validate", "run", "diagnose")


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in text.replace(",", " ").split())


def _floats(text: str) -> tuple[float, ...]:
    return tuple(float(x) for x in text.replace(",", " ").split())


def _level_counts(text: str) -> dict[int, int]:
    pairs = (item.split("=") for item in text.replace(",", " ").split())
    return {int(level): int(count) for level, count in pairs}


def common_options() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--model", default="embedded", help="HF model folder (llama/qwen2/mistral family) or 'embedded'")
    p.add_argument("--work-dir", type=Path, required=True, help="where artefacts go (keep it out of git)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu", help="torch device: cpu, cuda, cuda:1, ...")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1: the machine is shared)")
    p.add_argument("--lengths", type=_ints, default=(1024, 2048, 4096), help="profiled lengths, e.g. '1024 2048'")
    p.add_argument("--validation-length", type=int, default=3072, help="held-out length whose true loss picks the plan")
    p.add_argument("--validation-samples", type=int, default=4, help="held-out samples at the validation length")
    p.add_argument("--extension-lengths", type=_ints, default=(8192,), help="density-constrained, not profiled")
    p.add_argument("--samples-per-length", type=int, default=4)
    p.add_argument(
        "--profile-samples",
        type=_level_counts,
        default={},
        help="profile only the first N calibration samples of some levels, e.g. '3072=2 4096=2' (default: all)",
    )
    p.add_argument("--max-new-tokens", type=int, default=96, help="length of the dense model's greedy answers")
    p.add_argument("--answer-attempts", type=int, default=3, help="redraws of a sample the dense model answers wrong")
    p.add_argument("--keep-wrong-answers", action="store_true", help="keep samples whose dense answer is wrong")
    p.add_argument("--context-weight", type=float, default=1.0, help="loss = answer CE + this x context CE")
    p.add_argument("--sinks", type=int, default=64)
    p.add_argument("--min-span", type=int, default=128)
    p.add_argument(
        "--alphas",
        type=_floats,
        default=None,
        help="rule grid alphas, e.g. '-1024 0 1024' (default: -shortest .. longest profiled length, --alpha-step)",
    )
    p.add_argument("--alpha-step", type=int, default=None, help="step of the default alphas (shortest length / 2)")
    p.add_argument("--num-betas", type=int, default=DEFAULT_NUM_BETAS, help="betas evenly spaced over [0, 1]")
    p.add_argument(
        "--no-rule-filter",
        action="store_true",
        help="keep rules whose span is <= 0 at the shortest or > N at the longest profiled length",
    )
    p.add_argument(
        "--min-head-density", type=float, default=0.0, help="drop rules below this density at any constraint length"
    )
    p.add_argument("--max-rules-per-layer", type=int, default=2)
    p.add_argument("--time-limit", type=float, default=60.0, help="seconds per MILP solve")
    p.add_argument("--epsilon-points", type=int, default=5)
    p.add_argument("--density", type=_floats, default=(0.5,), help="density target(s), e.g. '0.5 0.25'")
    p.add_argument("--out-dir", type=Path, help="also copy plan + report here as moa-d{density}.json/-report/")
    p.add_argument(
        "--no-ship-gate",
        action="store_true",
        help="write the plan even when it loses to uniform on the held-out true loss (experiments only)",
    )
    p.add_argument(
        "--layer-correction",
        type=Path,
        default=None,
        help="a diagnose.json: rescale each layer's rule losses by its measured true / predicted ratio",
    )
    p.add_argument(
        "--retrieval-weights",
        type=_floats,
        default=(1.0,),
        help="extra candidate sets with loss = influence + w x retrieval loss, e.g. '0.25 1' ('' for none; "
        "the influence-only set is always a candidate)",
    )
    p.add_argument(
        "--hybrid-heads",
        type=_ints,
        default=(2, 4, 8, 12),
        help="hybrid candidates: the K heads of most retrieval mass at full span, the rest at one window, for each K "
        "('' for none)",
    )
    p.add_argument(
        "--fidelity-texts",
        type=int,
        default=2,
        help="held-out natural texts on which every candidate's top-1 agreement and KL to dense are measured and "
        "must beat uniform's (0: task loss only)",
    )
    p.add_argument("--fidelity-length", type=int, default=2048, help="tokens per held-out fidelity text")
    p.add_argument("--no-progress", action="store_true")
    return p


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="moa-plan", description=__doc__)
    sub = top.add_subparsers(dest="step", required=True)
    parent = common_options()
    helps = {
        "calibrate": "make calibration samples answered by the dense model",
        "profile": "attention influence per KV head at every length",
        "optimize": "Pareto set of rule assignments per density (OR-Tools)",
        "validate": "choose a Pareto plan at the validation length; write plan + report",
        "run": "all steps",
        "diagnose": "predicted vs true loss change of probe heads; held-out true loss of plans",
    }
    for step in STEPS:
        sp = sub.add_parser(step, parents=[parent], help=helps[step])
        if step == "diagnose":
            sp.add_argument("--probe-layers", type=int, default=10, help="layers probed (one KV head each)")
            sp.add_argument("--probe-spans", type=_floats, default=(0.125, 0.5), help="probe spans as fractions of N")
            sp.add_argument("--diagnose-samples", type=int, default=None, help="profiled samples per level used")
            sp.add_argument("--plans", type=Path, nargs="*", default=[], help="plan files whose held-out loss to add")
            sp.add_argument(
                "--ablation-heads",
                type=int,
                default=0,
                help="also cut groups of this many heads at once (most retrieval mass / most influence / least "
                "retrieval mass) to the first probe span and measure the held-out loss change",
            )
    return top


def resolve_model(name: str) -> Path:
    if name == "embedded":
        from moa_vllm.model import prepare_embedded_model

        return prepare_embedded_model(progress=False)
    path = Path(name)
    if not (path / "config.json").is_file():
        raise SystemExit(f"moa-plan: {path} is not a HF model folder (no config.json)")
    return path


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    import torch

    from moa_vllm.planner.pipeline import Pipeline, PlannerConfig, ShipGateError

    torch.set_num_threads(args.threads)
    config = PlannerConfig(
        model=resolve_model(args.model),
        work_dir=args.work_dir,
        lengths=args.lengths,
        validation_length=args.validation_length,
        extension_lengths=args.extension_lengths,
        samples_per_length=args.samples_per_length,
        profile_samples=args.profile_samples,
        validation_samples=args.validation_samples,
        max_new_tokens=args.max_new_tokens,
        answer_attempts=args.answer_attempts,
        check_answers=not args.keep_wrong_answers,
        context_weight=args.context_weight,
        ship_gate=not args.no_ship_gate,
        layer_correction=args.layer_correction,
        retrieval_weights=args.retrieval_weights,
        hybrid_heads=args.hybrid_heads,
        fidelity_texts=args.fidelity_texts,
        fidelity_length=args.fidelity_length,
        seed=args.seed,
        device=args.device,
        sinks=args.sinks,
        min_span=args.min_span,
        alphas=args.alphas,
        alpha_step=args.alpha_step,
        rule_filter=not args.no_rule_filter,
        min_head_density=args.min_head_density,
        num_betas=args.num_betas,
        max_rules_per_layer=args.max_rules_per_layer,
        time_limit_s=args.time_limit,
        epsilon_points=args.epsilon_points,
        progress=not args.no_progress,
    )
    pipe = Pipeline(config)
    refused = run_step(pipe, args, ShipGateError)
    print(f"timings: {pipe.timings.path}")
    return 3 if refused else 0


def run_step(pipe, args: argparse.Namespace, gate_error: type[Exception]) -> int:
    """Run the step; returns how many densities the ship gate refused (each is reported, the others still run)."""
    if args.step == "diagnose":
        from moa_vllm.planner.diagnosis_step import run_diagnosis

        out = run_diagnosis(
            pipe,
            args.probe_layers,
            args.probe_spans,
            args.diagnose_samples,
            args.density,
            tuple(args.plans),
            args.ablation_heads,
        )
        print(f"diagnosis: {out}")
    elif args.step == "calibrate":
        pipe.calibrate()
    elif args.step == "profile":
        pipe.profile()
        if pipe.config.retrieval_weights:
            pipe.retrieval()
    elif args.step == "optimize":
        for d in args.density:
            pipe.optimize_all(d)
    else:  # validate and run: validate pulls every earlier step it needs
        refused = 0
        for d in args.density:
            try:
                plan = pipe.validate(d)
            except gate_error as err:
                print(err, file=sys.stderr)
                refused += 1
                continue
            print(f"plan for density {d}: {plan}")
            if args.out_dir:
                print(f"exported: {pipe.export(d, args.out_dir)}")
        return refused
    return 0


if __name__ == "__main__":
    sys.exit(main())
