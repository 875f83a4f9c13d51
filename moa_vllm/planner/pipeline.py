"""The `moa-plan` steps: calibrate -> profile -> optimize -> validate, each writing one resumable artefact.

Work dir layout:
    calibration.json            samples (prompt and dense greedy answer ids), checkpointed per sample
    profile-L{length}.npz       mean block sums and per-offset sums of |E| per (layer, KV head), checkpointed per sample
    optimize-d{density}.json    the Pareto set of one density target
    validate-d{density}.json    the chosen Pareto plan; plan-d{density}.json and report-d{density}/ beside it
    timings.json                wall time of every step that ran
The profile does not depend on the density, so several densities share one calibration and profile.
"""

from __future__ import annotations

import logging
import shutil
from dataclasses import asdict, dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from moa_vllm.plan.fingerprint import fingerprint_from_hf_config, load_hf_config
from moa_vllm.plan.io import load_plan, save_plan
from moa_vllm.plan.schema import ModelFingerprint, Plan
from moa_vllm.plan.span import span_tokens, window_tokens
from moa_vllm.planner import artefacts as art
from moa_vllm.planner.calibrate import Sample, calibrate
from moa_vllm.planner.influence import outside_window_loss
from moa_vllm.planner.optimize import (
    ParetoSolution,
    PlanningProblem,
    SolverOptions,
    density_targets,
    pareto_front,
    select_by_validation,
    solution_to_plan,
    validation_losses,
)
from moa_vllm.planner.rules import DEFAULT_ALPHAS, DEFAULT_NUM_BETAS, RuleGrid

log = logging.getLogger(__name__)

CALIBRATION_VERSION = 1  # bump when sample construction changes, so old calibrations are not reused
PROFILE_VERSION = 1


@dataclass(frozen=True)
class PlannerConfig:
    model: Path
    work_dir: Path
    lengths: tuple[int, ...] = (1024, 2048, 4096)  # profiled lengths: one objective each
    validation_length: int = 3072  # profiled too, but only to choose among Pareto plans
    extension_lengths: tuple[int, ...] = (8192,)  # density-constrained, not profiled
    samples_per_length: int = 4
    # level -> how many of its calibration samples to profile (default: all); profiling cost grows with L^2
    profile_samples: dict[int, int] = field(default_factory=dict)
    max_new_tokens: int = 24
    seed: int = 0
    device: str = "cpu"
    sinks: int = 64
    min_span: int = 128
    block: int = 64
    alphas: tuple[float, ...] = DEFAULT_ALPHAS
    num_betas: int = DEFAULT_NUM_BETAS
    max_rules_per_layer: int = 2
    time_limit_s: float = 60.0
    epsilon_points: int = 5
    progress: bool = True

    def __post_init__(self) -> None:
        if self.validation_length in self.lengths:
            raise ValueError(f"validation length {self.validation_length} must not be a profiled length")
        if len(set(self.lengths)) != len(self.lengths) or not self.lengths:
            raise ValueError(f"profiled lengths must be distinct and non-empty, got {self.lengths}")

    @property
    def levels(self) -> list[int]:
        return sorted({*self.lengths, self.validation_length})

    @property
    def grid(self) -> RuleGrid:
        return RuleGrid.evenly(self.alphas, self.num_betas)


def density_tag(density: float) -> str:
    return f"d{density:.2f}"


@dataclass
class Pipeline:
    config: PlannerConfig
    timings: art.Timings = field(init=False)

    def __post_init__(self) -> None:
        self.config.work_dir.mkdir(parents=True, exist_ok=True)
        self.timings = art.Timings(self.config.work_dir)

    # ---- shared inputs -----------------------------------------------------------------------------------------
    @cached_property
    def fingerprint(self) -> ModelFingerprint:
        return fingerprint_from_hf_config(load_hf_config(self.config.model))

    @cached_property
    def model_identity(self) -> dict[str, Any]:
        return art.model_identity(self.config.model)

    @cached_property
    def tokenizer(self):
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(self.config.model)

    @cached_property
    def model(self):
        """The dense model in float32 (profiling differentiates through it), without weight gradients."""
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(self.config.model, dtype=torch.float32)
        model.to(self.config.device).eval().requires_grad_(False)
        return model

    def path(self, name: str) -> Path:
        return self.config.work_dir / name

    def _bar(self, total: int, desc: str, initial: int = 0) -> tqdm:
        return tqdm(total=total, initial=initial, desc=desc, disable=not self.config.progress, unit="sample")

    # ---- calibrate ---------------------------------------------------------------------------------------------
    def calibration_key(self) -> dict[str, Any]:
        c = self.config
        return {
            "version": CALIBRATION_VERSION,
            "model": self.model_identity,
            "seed": c.seed,
            "levels": c.levels,
            "samples_per_length": c.samples_per_length,
            "max_new_tokens": c.max_new_tokens,
        }

    def calibrate(self) -> dict[str, Any]:
        path, key = self.path("calibration.json"), self.calibration_key()
        if art.json_matches(path, key):
            log.info("calibrate: %s is up to date, skipped", path)
            return art.read_json(path)
        old = art.read_json(path)
        done = [Sample(**s) for s in old["samples"]] if old and old.get("key") == art.normalised(key) else []
        samples: list[Sample] = []

        def checkpoint(sample: Sample) -> None:
            samples.append(sample)
            art.write_json_atomic(path, self._calibration_doc(key, done + samples, complete=False))

        total = len(self.config.levels) * self.config.samples_per_length
        with (
            self.timings.step("calibrate", samples=total, resumed_from=len(done)),
            self._bar(total, "calibrate", len(done)) as bar,
        ):
            torch.manual_seed(self.config.seed)
            every = calibrate(
                self.model,
                self.tokenizer,
                self.config.levels,
                self.config.samples_per_length,
                self.config.seed,
                self.config.max_new_tokens,
                done,
                checkpoint,
                bar.update,
            )
            doc = self._calibration_doc(key, every, complete=True)
            art.write_json_atomic(path, doc)
        return doc

    @staticmethod
    def _calibration_doc(key: dict[str, Any], samples: list[Sample], complete: bool) -> dict[str, Any]:
        body = [s.to_json() for s in samples]
        return {"key": key, "complete": complete, "digest": art.digest(body), "samples": body}

    # ---- profile -----------------------------------------------------------------------------------------------
    def profile_key(self, calibration_digest: str, level: int) -> dict[str, Any]:
        c = self.config
        key = {
            "version": PROFILE_VERSION,
            "calibration": calibration_digest,
            "level": level,
            "sinks": c.sinks,
            "block": c.block,
            "dtype": "float32",
        }
        if self.profiled_count(level) < c.samples_per_length:
            key["samples"] = self.profiled_count(level)  # only when subsampled: "all" needs no entry
        return key

    def profiled_count(self, level: int) -> int:
        return min(
            self.config.profile_samples.get(level, self.config.samples_per_length), self.config.samples_per_length
        )

    def profile(self) -> dict[int, Path]:
        """Profile every level (profiled lengths and the validation length); returns the artefact per level."""
        cal = self.calibrate()
        samples = [Sample(**s) for s in cal["samples"]]
        out: dict[int, Path] = {}
        for level in self.config.levels:
            out[level] = self.path(f"profile-L{level}.npz")
            key = art.normalised(self.profile_key(cal["digest"], level))
            self._profile_level(level, key, [s for s in samples if s.level == level][: self.profiled_count(level)])
        return out

    def _profile_level(self, level: int, key: dict[str, Any], todo: list[Sample]) -> None:
        from moa_vllm.planner import profile as prof

        path = self.path(f"profile-L{level}.npz")
        old = art.load_npz(path)
        if old and old["key"] == key and bool(old["complete"]):
            log.info("profile: %s is up to date, skipped", path)
            return
        fp, c = self.fingerprint, self.config
        acc = prof.LevelAccumulator.empty(level, fp.num_layers, fp.num_kv_heads, c.block)
        if old and old["key"] == key:  # an interrupted run: continue after its last finished sample
            acc.blocks, acc.offsets = old["blocks_sum"], old["offsets_sum"]
            acc.count, acc.losses = int(old["count"]), old["losses"].tolist()
        prof.use_capture_attention(self.model)
        with (
            self.timings.step(f"profile-L{level}", samples=len(todo), resumed_from=acc.count),
            self._bar(len(todo), f"profile {level}", acc.count) as bar,
        ):
            for sample in todo[acc.count :]:
                ids = sample.prompt_ids + sample.answer_ids
                acc.add(prof.sample_influence(self.model, ids, len(sample.prompt_ids), c.sinks, c.block))
                self._save_profile(path, key, acc, complete=acc.count == len(todo))
                bar.update(1)

    @staticmethod
    def _save_profile(path: Path, key: dict[str, Any], acc, complete: bool) -> None:
        art.save_npz_atomic(
            path,
            key,
            blocks=acc.mean_blocks(),
            offsets=acc.mean_offsets(),
            blocks_sum=acc.blocks,
            offsets_sum=acc.offsets,
            count=np.array(acc.count),
            losses=np.array(acc.losses, dtype=np.float64),
            complete=np.array(complete),
        )

    # ---- rule losses -------------------------------------------------------------------------------------------
    def rule_windows(self, length: int) -> torch.Tensor:
        """Recent-window tokens of every grid rule at `length` (span math from moa_vllm.plan.span)."""
        c = self.config
        return torch.tensor(
            [window_tokens(span_tokens(r.alpha, r.beta, length, c.min_span), c.sinks) for r in c.grid.rules]
        )

    def rule_loss(self, level: int) -> np.ndarray:
        """loss[layer, kv_head, rule] at `level`: mean influence outside each rule's sink + window mask."""
        data = art.load_npz(self.path(f"profile-L{level}.npz"))
        if data is None or not bool(data["complete"]):
            raise FileNotFoundError(f"no complete profile for length {level}; run `moa-plan profile` first")
        return outside_window_loss(torch.from_numpy(data["offsets"]), self.rule_windows(level)).numpy()

    def problem(self, density: float) -> PlanningProblem:
        c = self.config
        loss = np.stack([self.rule_loss(n) for n in c.lengths])
        return PlanningProblem(
            loss=loss,
            lengths=c.lengths,
            density_targets=density_targets(density, [*c.lengths, *c.extension_lengths]),
            grid=c.grid,
            min_span=c.min_span,
            max_rules_per_layer=c.max_rules_per_layer,
        )

    def solver_options(self) -> SolverOptions:
        c = self.config
        return SolverOptions(time_limit_s=c.time_limit_s, seed=c.seed, epsilon_points=c.epsilon_points)

    def _profile_digests(self, levels: list[int]) -> dict[str, str]:
        return {str(n): art.digest(art.load_npz(self.path(f"profile-L{n}.npz"))["key"]) for n in levels}

    # ---- optimize ----------------------------------------------------------------------------------------------
    def optimize_key(self, density: float) -> dict[str, Any]:
        c = self.config
        return {
            "profiles": self._profile_digests(list(c.lengths)),
            "density": density,
            "lengths": list(c.lengths),
            "extension_lengths": list(c.extension_lengths),
            "grid": {"alphas": list(c.grid.alphas), "betas": list(c.grid.betas)},
            "min_span": c.min_span,
            "max_rules_per_layer": c.max_rules_per_layer,
            "solver": asdict(self.solver_options()),
        }

    def optimize(self, density: float) -> list[ParetoSolution]:
        self.profile()
        path, key = self.path(f"optimize-{density_tag(density)}.json"), self.optimize_key(density)
        if art.json_matches(path, key):
            log.info("optimize: %s is up to date, skipped", path)
            return [solution_from_json(s) for s in art.read_json(path)["solutions"]]
        with self.timings.step(f"optimize-{density_tag(density)}"):
            solutions = pareto_front(self.problem(density), self.solver_options())
        art.write_json_atomic(path, {"key": key, "solutions": [solution_to_json(s) for s in solutions]})
        return solutions

    # ---- validate ----------------------------------------------------------------------------------------------
    def validate_key(self, density: float) -> dict[str, Any]:
        opt = art.read_json(self.path(f"optimize-{density_tag(density)}.json"))
        return {
            "optimize": art.digest(opt),
            "validation": self._profile_digests([self.config.validation_length]),
            "sinks": self.config.sinks,
            "fingerprint": self.fingerprint.model_dump(),
        }

    def validate(self, density: float) -> Path:
        """Pick the Pareto plan with the lowest loss at the validation length; write the plan and its report."""
        solutions = self.optimize(density)
        tag = density_tag(density)
        path, key = self.path(f"validate-{tag}.json"), self.validate_key(density)
        plan_path, report_dir = self.path(f"plan-{tag}.json"), self.path(f"report-{tag}")
        if art.json_matches(path, key) and plan_path.exists():
            log.info("validate: %s is up to date, skipped", path)
            return plan_path
        with self.timings.step(f"validate-{tag}"):
            problem = self.problem(density)
            validation = self.rule_loss(self.config.validation_length)
            chosen = select_by_validation(solutions, validation)
            plan = solution_to_plan(solutions[chosen], problem, self.fingerprint, self.config.sinks, self.notes())
            save_plan(plan, plan_path)
            self._report(report_dir, solutions, chosen, problem, plan, validation)
        art.write_json_atomic(
            path,
            {
                "key": key,
                "chosen": chosen,
                "validation_length": self.config.validation_length,
                "validation_loss": validation_losses(solutions, validation),
                "plan": plan_path.name,
            },
        )
        return plan_path

    def _report(self, out: Path, solutions, chosen: int, problem, plan: Plan, validation: np.ndarray) -> None:
        from moa_vllm.planner.report import write_report

        write_report(out, solutions, chosen, problem, plan, validation, self.config.validation_length)

    def notes(self) -> str:
        c = self.config
        profiled = {n: self.profiled_count(n) for n in c.levels}
        return (
            f"moa-plan: calibration at {c.levels} tokens (seed {c.seed}), samples profiled per length {profiled}, "
            f"objectives at {list(c.lengths)}, chosen by loss at {c.validation_length}; rule loss is token-exact "
            "(per-offset influence sums)"
        )

    def export(self, density: float, out_dir: Path) -> Path:
        """Copy the plan and its report into out_dir as moa-d{density}.json and moa-d{density}-report/."""
        tag = density_tag(density)
        out_dir.mkdir(parents=True, exist_ok=True)
        plan_src = self.path(f"plan-{tag}.json")
        load_plan(plan_src)  # never export a plan that does not load
        plan_dst = out_dir / f"moa-{tag}.json"
        shutil.copyfile(plan_src, plan_dst)
        report_dst = out_dir / f"moa-{tag}-report"
        shutil.copytree(self.path(f"report-{tag}"), report_dst, dirs_exist_ok=True)
        return plan_dst


def solution_to_json(s: ParetoSolution) -> dict[str, Any]:
    return {
        "assignment": s.assignment.tolist(),
        "objectives": {str(k): v for k, v in s.objectives.items()},
        "densities": {str(k): v for k, v in s.densities.items()},
        "optimal": s.optimal,
        "gap": s.gap,
        "bounds": {str(k): v for k, v in s.bounds.items()},
    }


def solution_from_json(d: dict[str, Any]) -> ParetoSolution:
    ints = lambda m: {int(k): float(v) for k, v in m.items()}  # noqa: E731
    return ParetoSolution(
        assignment=np.array(d["assignment"], dtype=np.int64),
        objectives=ints(d["objectives"]),
        densities=ints(d["densities"]),
        optimal=bool(d["optimal"]),
        gap=float(d["gap"]),
        bounds=ints(d["bounds"]),
    )
