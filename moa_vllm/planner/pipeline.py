"""The `moa-plan` steps: calibrate -> profile -> optimize -> validate, each writing one resumable artefact.

Work dir layout:
    calibration.json            samples (prompt and dense greedy answer ids), checkpointed per sample
    profile-L{length}.npz       mean block sums and per-offset sums of |E| per (layer, KV head), checkpointed per sample
    retrieval-L{length}.npz     per-offset retrieval mass per (layer, KV head) on the same samples (retrieval.py)
    optimize-d{density}.json    the Pareto set of one density target (influence loss only)
    optimize-d{density}-r{w}.json   the same with w x the retrieval loss added (one per --retrieval-weights entry)
    truth-d{density}[-r{w}].json    held-out true loss of those Pareto plans (dense and uniform in the first)
    truth-d{density}-hybrid.json    held-out true loss of the hybrid candidates (hybrid.py)
    fidelity-d{density}.json    held-out top-1 / KL to dense of every candidate and uniform (fidelity.py)
    validate-d{density}.json    the chosen plan over all of them; plan-d{density}.json and report-d{density}/ beside it
    timings.json                wall time of every step that ran
The profile does not depend on the density, so several densities share one calibration and profile.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from moa_vllm.plan.fingerprint import fingerprint_from_hf_config, load_hf_config
from moa_vllm.plan.schema import ModelFingerprint
from moa_vllm.plan.span import span_tokens, window_tokens
from moa_vllm.planner import artefacts as art
from moa_vllm.planner.artefacts import density_tag
from moa_vllm.planner.calibrate import Sample, SlotResult, calibrate
from moa_vllm.planner.config import PlannerConfig
from moa_vllm.planner.fidelity_step import FidelityStep
from moa_vllm.planner.gate import ShipGateError  # noqa: F401  (re-exported for the CLI)
from moa_vllm.planner.influence import outside_window_loss
from moa_vllm.planner.optimize import (
    ParetoSolution,
    PlanningProblem,
    SolverOptions,
    density_targets,
    pareto_front,
)
from moa_vllm.planner.retrieval_step import RetrievalStep
from moa_vllm.planner.validate_step import ValidateStep

log = logging.getLogger(__name__)


CALIBRATION_VERSION = 3  # bump when sample construction changes, so old calibrations are not reused
PROFILE_VERSION = 2


@dataclass
class Pipeline(RetrievalStep, FidelityStep, ValidateStep):
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
            "slots": self.calibration_slots(),
            "max_new_tokens": c.max_new_tokens,
            "answer_attempts": c.answer_attempts,
            "check_answers": c.check_answers,
        }

    def calibration_slots(self) -> list[tuple[int, int]]:
        """(level, index) of every sample: samples_per_length per profiled length, validation_samples held out."""
        c = self.config
        counts = {**dict.fromkeys(c.lengths, c.samples_per_length), c.validation_length: c.validation_samples}
        return [(level, i) for level in c.levels for i in range(counts[level])]

    def calibrate(self) -> dict[str, Any]:
        path, key = self.path("calibration.json"), self.calibration_key()
        if art.json_matches(path, key):
            log.info("calibrate: %s is up to date, skipped", path)
            return art.read_json(path)
        old = art.read_json(path)
        # Samples depend on their slot, not on how many slots there are: more (or fewer) slots keep the others.
        same = old and _without(old.get("key", {}), "slots") == _without(art.normalised(key), "slots")
        resumed = old if same else {"samples": [], "dropped": []}
        wanted = set(self.calibration_slots())
        samples = [s for s in map(Sample.from_json, resumed["samples"]) if (s.level, s.index) in wanted]
        dropped = [d for d in resumed.get("dropped", []) if (d["level"], d["index"]) in wanted]
        done = {(s.level, s.index) for s in samples} | {(d["level"], d["index"]) for d in dropped}
        todo = [slot for slot in self.calibration_slots() if slot not in done]

        def checkpoint(result: SlotResult) -> None:
            if result.sample is None:
                dropped.append({"level": result.level, "index": result.index, "attempts": result.attempts})
                log.warning(
                    "calibrate: level %d slot %d dropped (%d wrong dense answers)",
                    result.level,
                    result.index,
                    result.attempts,
                )
            else:
                samples.append(result.sample)
            art.write_json_atomic(path, self._calibration_doc(key, samples, dropped, complete=False))
            bar.update(1)

        total = len(self.calibration_slots())
        with (
            self.timings.step("calibrate", samples=total, resumed_from=len(done)),
            self._bar(total, "calibrate", len(done)) as bar,
        ):
            torch.manual_seed(self.config.seed)
            calibrate(
                self.model,
                self.tokenizer,
                todo,
                self.config.seed,
                self.config.max_new_tokens,
                checkpoint,
                self.config.answer_attempts,
                self.config.check_answers,
            )
            order = {slot: i for i, slot in enumerate(self.calibration_slots())}
            samples.sort(key=lambda s: order[(s.level, s.index)])
            doc = self._calibration_doc(key, samples, dropped, complete=True)
            art.write_json_atomic(path, doc)
        return doc

    @staticmethod
    def _calibration_doc(
        key: dict[str, Any], samples: list[Sample], dropped: list[dict[str, int]], complete: bool
    ) -> dict[str, Any]:
        body = [s.to_json() for s in samples]
        return {"key": key, "complete": complete, "digest": art.digest(body), "samples": body, "dropped": dropped}

    def samples(self, level: int) -> list[Sample]:
        return [Sample.from_json(s) for s in self.calibrate()["samples"] if s["level"] == level]

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
            "context_weight": c.context_weight,
        }
        if self.profiled_count(level) < c.samples_per_length:
            key["samples"] = self.profiled_count(level)  # only when subsampled: "all" needs no entry
        return key

    def profiled_count(self, level: int) -> int:
        return min(
            self.config.profile_samples.get(level, self.config.samples_per_length), self.config.samples_per_length
        )

    def profile(self) -> dict[int, Path]:
        """Profile every profiled length (the validation length stays held out); returns the artefact per level."""
        cal = self.calibrate()
        samples = [Sample.from_json(s) for s in cal["samples"]]
        out: dict[int, Path] = {}
        for level in self.config.lengths:
            out[level] = self.path(f"profile-L{level}.npz")
            key = art.normalised(self.profile_key(cal["digest"], level))
            self._profile_level(level, key, [s for s in samples if s.level == level][: self.profiled_count(level)])
        return out

    def _profile_level(self, level: int, key: dict[str, Any], todo: list[Sample]) -> None:
        from moa_vllm.planner import profile as prof

        if not todo:
            raise ValueError(
                f"no calibration sample at length {level}: every dense answer missed its target "
                "(raise --answer-attempts or --samples-per-length, or pass --keep-wrong-answers)"
            )
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
            acc.each = list(old["offsets_each"])
        prof.use_capture_attention(self.model)
        with (
            self.timings.step(f"profile-L{level}", samples=len(todo), resumed_from=acc.count),
            self._bar(len(todo), f"profile {level}", acc.count) as bar,
        ):
            for sample in todo[acc.count :]:
                ids = sample.prompt_ids + sample.answer_ids
                acc.add(
                    prof.sample_influence(self.model, ids, len(sample.prompt_ids), c.sinks, c.block, c.context_weight)
                )
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
            offsets_each=acc.offsets_each(),
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

    def layer_scale(self, level: int) -> np.ndarray:
        """[layers]: the correction applied to the rule losses of `level` (ones when there is none).

        From a diagnose.json: the measured true / predicted ratio per probed layer at that level, interpolated
        between probed layers (clipped positive: the MILP needs non-negative losses)."""
        from moa_vllm.planner.diagnose import interpolate_ratios

        layers = self.fingerprint.num_layers
        if self.config.layer_correction is None:
            return np.ones(layers)
        doc = art.read_json(self.config.layer_correction)
        if not doc or str(level) not in doc.get("levels", {}):
            raise ValueError(f"{self.config.layer_correction}: no diagnosis at length {level} to correct with")
        ratios = {int(k): float(v) for k, v in doc["levels"][str(level)]["layer_ratio"].items()}
        return interpolate_ratios(ratios, layers)

    def level_loss(self, level: int, retrieval_weight: float) -> np.ndarray:
        """Rule losses [layer, kv_head, rule] at one profiled length: influence (optionally corrected per layer)
        plus retrieval_weight x the retrieval loss scaled so that both have the same total over all heads at
        window 0 (all context beyond the sinks cut)."""
        influence = self.rule_loss(level) * self.layer_scale(level)[:, None, None]
        if retrieval_weight == 0:
            return influence
        retrieval = self.retrieval_loss(level)
        mass = float(self.retrieval_mass(level).sum())
        if mass <= 0:
            log.warning("retrieval: no retrieval mass at length %d (no sample with a matched target)", level)
            return influence
        scale = float(art.load_npz(self.path(f"profile-L{level}.npz"))["offsets"].sum()) / mass
        return influence + retrieval_weight * scale * retrieval

    def problem(self, density: float, retrieval_weight: float = 0.0) -> PlanningProblem:
        c = self.config
        loss = np.stack([self.level_loss(n, retrieval_weight) for n in c.lengths])
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

    def _profile_digests(self, levels: list[int], prefix: str = "profile") -> dict[str, str]:
        return {str(n): art.digest(art.load_npz(self.path(f"{prefix}-L{n}.npz"))["key"]) for n in levels}

    # ---- optimize ----------------------------------------------------------------------------------------------
    @property
    def weights(self) -> tuple[float, ...]:
        """Retrieval weights of the candidate sets: 0 (influence only) first."""
        return (0.0, *self.config.retrieval_weights)

    @staticmethod
    def weight_suffix(weight: float) -> str:
        return "" if weight == 0 else f"-r{weight:g}"

    def optimize_key(self, density: float, retrieval_weight: float = 0.0) -> dict[str, Any]:
        c = self.config
        key = {
            "profiles": self._profile_digests(list(c.lengths)),
            "density": density,
            "lengths": list(c.lengths),
            "extension_lengths": list(c.extension_lengths),
            "grid": c.grid.model_dump(mode="json"),
            "min_span": c.min_span,
            "max_rules_per_layer": c.max_rules_per_layer,
            "solver": asdict(self.solver_options()),
        }
        if c.layer_correction is not None:  # only then: uncorrected runs keep their artefacts
            key["layer_scale"] = {str(n): self.layer_scale(n).round(12).tolist() for n in c.lengths}
        if retrieval_weight:  # only then: influence-only sets keep their artefacts
            key["retrieval"] = self._profile_digests(list(c.lengths), "retrieval")
            key["retrieval_weight"] = retrieval_weight
        return key

    def optimize(self, density: float, retrieval_weight: float = 0.0) -> list[ParetoSolution]:
        self.profile()
        if retrieval_weight:
            self.retrieval()
        name = f"optimize-{density_tag(density)}{self.weight_suffix(retrieval_weight)}"
        path, key = self.path(f"{name}.json"), self.optimize_key(density, retrieval_weight)
        if art.json_matches(path, key):
            log.info("optimize: %s is up to date, skipped", path)
            return [solution_from_json(s) for s in art.read_json(path)["solutions"]]
        with self.timings.step(name):
            solutions = pareto_front(self.problem(density, retrieval_weight), self.solver_options())
        art.write_json_atomic(path, {"key": key, "solutions": [solution_to_json(s) for s in solutions]})
        return solutions

    def optimize_all(self, density: float) -> dict[float, list[ParetoSolution]]:
        return {w: self.optimize(density, w) for w in self.weights}


def _without(d: dict[str, Any], name: str) -> dict[str, Any]:
    return {k: v for k, v in d.items() if k != name}


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
