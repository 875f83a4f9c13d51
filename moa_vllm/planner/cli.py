"""`moa-plan`: the offline MoA planner. Steps calibrate, profile, optimize, validate; `run` does all of them.

Every step writes its artefact into --work-dir and skips itself when that artefact already matches its inputs, so
an interrupted run continues where it stopped and several densities share one calibration and profile.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
import types
import typing
from pathlib import Path
from typing import Any

from moa_vllm.planner.config import STEPS, PlannerConfig

HELPS = {
    "calibrate": "make calibration samples answered by the dense model",
    "profile": "attention influence per KV head at every length",
    "optimize": "Pareto set of rule assignments per density (OR-Tools)",
    "validate": "choose a Pareto plan at the validation length; write plan + report",
    "run": "all steps",
    "diagnose": "predicted vs true loss change of probe heads; held-out true loss of plans",
}


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in text.replace(",", " ").split())


def _floats(text: str) -> tuple[float, ...]:
    return tuple(float(x) for x in text.replace(",", " ").split())


def _words(text: str) -> tuple[str, ...]:
    return tuple(text.replace(",", " ").split())


def _level_counts(text: str) -> dict[int, int]:
    pairs = (item.split("=") for item in text.replace(",", " ").split())
    return {int(level): int(count) for level, count in pairs}


_PARSERS: dict[Any, Any] = {
    int: int,
    float: float,
    str: str,
    Path: Path,
    tuple[int, ...]: _ints,
    tuple[float, ...]: _floats,
    tuple[str, ...]: _words,
    dict[int, int]: _level_counts,
}


def _value_parser(hint: Any) -> Any:
    """The argparse type of a field's annotation (X | None parses as X)."""
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        (hint,) = [a for a in typing.get_args(hint) if a is not type(None)]
    if hint not in _PARSERS:
        raise TypeError(f"PlannerConfig: no CLI parser for a field of type {hint}")
    return _PARSERS[hint]


def add_config_options(p: argparse.ArgumentParser) -> None:
    """One flag per PlannerConfig field, with the field's default and help. --model defaults to the embedded
    model; --work-dir is required."""
    hints = typing.get_type_hints(PlannerConfig)
    for f in dataclasses.fields(PlannerConfig):
        help_, flag = f.metadata.get("help", ""), f.metadata.get("flag")
        if f.name == "model":
            p.add_argument("--model", dest="model", default="embedded", help=help_)
        elif f.name == "work_dir":
            p.add_argument("--work-dir", dest="work_dir", type=Path, required=True, help=help_)
        elif hints[f.name] is bool:
            if f.default is not True:
                raise TypeError(f"PlannerConfig.{f.name}: a bool option must default to True (its flag turns it off)")
            p.add_argument(flag or f"--no-{f.name.replace('_', '-')}", dest=f.name, action="store_false", help=help_)
        else:
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            name = flag or f"--{f.name.replace('_', '-')}"
            p.add_argument(name, dest=f.name, type=_value_parser(hints[f.name]), default=default, help=help_)


def common_options() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    add_config_options(p)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1: the machine is shared)")
    p.add_argument("--density", type=_floats, default=(0.5,), help="density target(s), e.g. '0.5 0.25'")
    p.add_argument("--out-dir", type=Path, help="also copy plan + report here as moa-d{density}.json/-report/")
    return p


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="moa-plan", description=__doc__)
    sub = top.add_subparsers(dest="step", required=True)
    parent = common_options()
    for step in STEPS:
        sp = sub.add_parser(step, parents=[parent], help=HELPS[step])
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


def config_from_args(args: argparse.Namespace, model: Path) -> PlannerConfig:
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(PlannerConfig)}
    return PlannerConfig(**{**values, "model": model})


def resolve_model(name: str) -> Path:
    if name == "embedded":
        from moa_vllm.model import prepare_embedded_model

        return prepare_embedded_model(progress=False)
    path = Path(name)
    if not (path / "config.json").is_file():
        raise SystemExit(f"moa-plan: {path} is not a HF model folder (no config.json)")
    return path


def main(argv: list[str] | None = None) -> int:
    """Exit code 3 when the ship gate refused a density (each refusal is reported; the others still run)."""
    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    import torch

    from moa_vllm.planner import chain
    from moa_vllm.planner.steps.diagnose import DiagnoseOptions

    torch.set_num_threads(args.threads)
    config = config_from_args(args, resolve_model(args.model))
    diagnosis = None
    if args.step == "diagnose":
        diagnosis = DiagnoseOptions(
            args.probe_layers, args.probe_spans, args.diagnose_samples, tuple(args.plans), args.ablation_heads
        )
    result = chain.run(config, args.step, args.density, args.out_dir, diagnosis)
    for d in args.density:
        if d in result.refused:
            print(result.refused[d], file=sys.stderr)
        if d in result.plans:
            print(f"plan for density {d}: {result.plans[d]}")
        if d in result.exported:
            print(f"exported: {result.exported[d]}")
    if result.diagnosis is not None:
        print(f"diagnosis: {result.diagnosis}")
    print(f"timings: {result.timings}")
    return 3 if result.refused else 0


if __name__ == "__main__":
    sys.exit(main())
