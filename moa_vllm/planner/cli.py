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

from moa_vllm.planner.rules import DEFAULT_ALPHAS, DEFAULT_NUM_BETAS

STEPS = ("calibrate", "profile", "optimize", "validate", "run")


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
    p.add_argument("--validation-length", type=int, default=3072, help="unprofiled length that picks the plan")
    p.add_argument("--extension-lengths", type=_ints, default=(8192,), help="density-constrained, not profiled")
    p.add_argument("--samples-per-length", type=int, default=4)
    p.add_argument(
        "--profile-samples",
        type=_level_counts,
        default={},
        help="profile only the first N calibration samples of some levels, e.g. '3072=2 4096=2' (default: all)",
    )
    p.add_argument("--max-new-tokens", type=int, default=24, help="length of the dense model's greedy answers")
    p.add_argument("--sinks", type=int, default=64)
    p.add_argument("--min-span", type=int, default=128)
    p.add_argument("--alphas", type=_floats, default=DEFAULT_ALPHAS, help="rule grid alphas, e.g. '-1024 0 1024'")
    p.add_argument("--num-betas", type=int, default=DEFAULT_NUM_BETAS, help="betas evenly spaced over [0, 1]")
    p.add_argument("--max-rules-per-layer", type=int, default=2)
    p.add_argument("--time-limit", type=float, default=60.0, help="seconds per MILP solve")
    p.add_argument("--epsilon-points", type=int, default=5)
    p.add_argument("--density", type=_floats, default=(0.5,), help="density target(s), e.g. '0.5 0.25'")
    p.add_argument("--out-dir", type=Path, help="also copy plan + report here as moa-d{density}.json/-report/")
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
    }
    for step in STEPS:
        sub.add_parser(step, parents=[parent], help=helps[step])
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

    from moa_vllm.planner.pipeline import Pipeline, PlannerConfig

    torch.set_num_threads(args.threads)
    config = PlannerConfig(
        model=resolve_model(args.model),
        work_dir=args.work_dir,
        lengths=args.lengths,
        validation_length=args.validation_length,
        extension_lengths=args.extension_lengths,
        samples_per_length=args.samples_per_length,
        profile_samples=args.profile_samples,
        max_new_tokens=args.max_new_tokens,
        seed=args.seed,
        device=args.device,
        sinks=args.sinks,
        min_span=args.min_span,
        alphas=args.alphas,
        num_betas=args.num_betas,
        max_rules_per_layer=args.max_rules_per_layer,
        time_limit_s=args.time_limit,
        epsilon_points=args.epsilon_points,
        progress=not args.no_progress,
    )
    pipe = Pipeline(config)
    if args.step == "calibrate":
        pipe.calibrate()
    elif args.step == "profile":
        pipe.profile()
    elif args.step == "optimize":
        for d in args.density:
            pipe.optimize(d)
    else:  # validate and run: validate pulls every earlier step it needs
        for d in args.density:
            plan = pipe.validate(d)
            print(f"plan for density {d}: {plan}")
            if args.out_dir:
                print(f"exported: {pipe.export(d, args.out_dir)}")
    print(f"timings: {pipe.timings.path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
