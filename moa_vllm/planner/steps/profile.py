"""Step 2: the influence profile of every profiled length (moa_vllm/planner/profile.py has the measure), one
forward + backward per calibration sample, checkpointed per sample. The validation length is never profiled."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np

from moa_vllm.planner import artefacts as art
from moa_vllm.planner import profile as prof
from moa_vllm.planner.calibrate import Sample
from moa_vllm.planner.config import PlannerConfig
from moa_vllm.planner.model_inputs import ModelInputs
from moa_vllm.planner.steps.calibrate import Calibration

log = logging.getLogger(__name__)

PROFILE_VERSION = 2


@dataclass(frozen=True)
class LevelProfile:
    level: int
    key: dict[str, Any]  # as stored: its digest is what the optimize key names
    offsets: np.ndarray  # [layers, kv_heads, level]: mean per-offset influence over the profiled samples
    offsets_each: np.ndarray  # [samples, layers, kv_heads, level]

    @property
    def digest(self) -> str:
        return art.digest(self.key)


def profiled_count(config: PlannerConfig, level: int) -> int:
    return min(config.profile_samples.get(level, config.samples_per_length), config.samples_per_length)


def profile_key(config: PlannerConfig, calibration_digest: str, level: int) -> dict[str, Any]:
    c = config
    key = {
        "version": PROFILE_VERSION,
        "calibration": calibration_digest,
        "level": level,
        "sinks": c.sinks,
        "block": c.block,
        "dtype": "float32",
        "context_weight": c.context_weight,
    }
    if profiled_count(c, level) < c.samples_per_length:
        key["samples"] = profiled_count(c, level)  # only when subsampled: "all" needs no entry
    return key


def profile(
    calibration: Calibration, model: ModelInputs, config: PlannerConfig, work: art.WorkDir
) -> dict[int, LevelProfile]:
    out = {}
    for level in config.lengths:
        key = art.normalised(profile_key(config, calibration.digest, level))
        samples = calibration.at(level)[: profiled_count(config, level)]
        out[level] = _profile_level(level, key, samples, model, config, work)
    return out


def _profile_level(
    level: int, key: dict[str, Any], todo: list[Sample], model: ModelInputs, config: PlannerConfig, work: art.WorkDir
) -> LevelProfile:
    if not todo:
        raise ValueError(
            f"no calibration sample at length {level}: every dense answer missed its target "
            "(raise --answer-attempts or --samples-per-length, or pass --keep-wrong-answers)"
        )
    path = work.path(f"profile-L{level}.npz")
    old = art.load_npz(path)
    if old and old["key"] == key and bool(old["complete"]):
        log.info("profile: %s is up to date, skipped", path)
        return _loaded(level, old)
    fp, c = model.fingerprint, config
    acc = prof.LevelAccumulator.empty(level, fp.num_layers, fp.num_kv_heads, c.block)
    if old and old["key"] == key:  # an interrupted run: continue after its last finished sample
        acc.blocks, acc.offsets = old["blocks_sum"], old["offsets_sum"]
        acc.count, acc.losses = int(old["count"]), old["losses"].tolist()
        acc.each = list(old["offsets_each"])
    prof.use_capture_attention(model.model)
    with (
        work.timings.step(f"profile-L{level}", samples=len(todo), resumed_from=acc.count),
        work.bar(len(todo), f"profile {level}", acc.count) as bar,
    ):
        for sample in todo[acc.count :]:
            ids = sample.prompt_ids + sample.answer_ids
            acc.add(prof.sample_influence(model.model, ids, len(sample.prompt_ids), c.sinks, c.block, c.context_weight))
            _save(path, key, acc, complete=acc.count == len(todo))
            bar.update(1)
    return _loaded(level, art.load_npz(path))


def _loaded(level: int, data: dict[str, Any]) -> LevelProfile:
    return LevelProfile(level, data["key"], data["offsets"], data["offsets_each"])


def _save(path, key: dict[str, Any], acc: prof.LevelAccumulator, complete: bool) -> None:
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
