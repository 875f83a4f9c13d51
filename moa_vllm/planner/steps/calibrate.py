"""Step 1: calibration samples (synthetic retrieval prompts answered by the dense model), checkpointed per sample.

A sample depends on its slot (level, index) and the seed, not on how many slots there are, so more (or fewer)
slots keep the samples already made."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch

from moa_vllm.planner import artefacts as art
from moa_vllm.planner.calibrate import Sample, SlotResult, calibrate_slots
from moa_vllm.planner.config import PlannerConfig
from moa_vllm.planner.model_inputs import ModelInputs

log = logging.getLogger(__name__)

# Bump when sample construction changes, so old calibrations are not reused.
# 5: held-out natural-text facts in the first half; 4: natural-text tasks, fact spans.
CALIBRATION_VERSION = 5


@dataclass(frozen=True)
class Calibration:
    samples: tuple[Sample, ...]
    digest: str  # of the samples: what every later step's key names

    def at(self, level: int) -> list[Sample]:
        return [s for s in self.samples if s.level == level]

    @classmethod
    def from_doc(cls, doc: dict[str, Any]) -> Calibration:
        return cls(tuple(Sample.from_json(s) for s in doc["samples"]), doc["digest"])


def calibration_slots(config: PlannerConfig) -> list[tuple[int, int]]:
    """(level, index) of every sample: samples_per_length per profiled length, validation_samples held out."""
    c = config
    counts = {**dict.fromkeys(c.lengths, c.samples_per_length), c.validation_length: c.validation_samples}
    return [(level, i) for level in c.levels for i in range(counts[level])]


def calibration_key(config: PlannerConfig, model_identity: dict[str, Any]) -> dict[str, Any]:
    c = config
    return {
        "version": CALIBRATION_VERSION,
        "model": model_identity,
        "seed": c.seed,
        "levels": c.levels,
        "slots": calibration_slots(c),
        "max_new_tokens": c.max_new_tokens,
        "answer_attempts": c.answer_attempts,
        "check_answers": c.check_answers,
        "tasks": list(c.tasks),
    }


def calibrate(model: ModelInputs, config: PlannerConfig, work: art.WorkDir) -> Calibration:
    path, key = work.path("calibration.json"), calibration_key(config, model.identity)
    if art.json_matches(path, key):
        log.info("calibrate: %s is up to date, skipped", path)
        return Calibration.from_doc(art.read_json(path))
    old = art.read_json(path)
    same = old and _without(old.get("key", {}), "slots") == _without(art.normalised(key), "slots")
    resumed = old if same else {"samples": [], "dropped": []}
    slots = calibration_slots(config)
    wanted = set(slots)
    samples = [s for s in map(Sample.from_json, resumed["samples"]) if (s.level, s.index) in wanted]
    dropped = [d for d in resumed.get("dropped", []) if (d["level"], d["index"]) in wanted]
    done = {(s.level, s.index) for s in samples} | {(d["level"], d["index"]) for d in dropped}
    todo = [slot for slot in slots if slot not in done]

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
        art.write_json_atomic(path, _document(key, samples, dropped, complete=False))
        bar.update(1)

    c = config
    with (
        work.timings.step("calibrate", samples=len(slots), resumed_from=len(done)),
        work.bar(len(slots), "calibrate", len(done)) as bar,
    ):
        torch.manual_seed(c.seed)
        calibrate_slots(
            model.model,
            model.tokenizer,
            todo,
            c.seed,
            c.max_new_tokens,
            checkpoint,
            c.answer_attempts,
            c.check_answers,
            c.tasks,
            c.validation_length,
        )
        order = {slot: i for i, slot in enumerate(slots)}
        samples.sort(key=lambda s: order[(s.level, s.index)])
        doc = _document(key, samples, dropped, complete=True)
        art.write_json_atomic(path, doc)
    return Calibration.from_doc(doc)


def _document(key: dict[str, Any], samples: list[Sample], dropped: list[dict[str, int]], complete: bool):
    body = [s.to_json() for s in samples]
    return {"key": key, "complete": complete, "digest": art.digest(body), "samples": body, "dropped": dropped}


def _without(d: dict[str, Any], name: str) -> dict[str, Any]:
    return {k: v for k, v in d.items() if k != name}
