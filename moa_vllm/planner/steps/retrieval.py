"""Step 2b: retrieval mass per KV head on the profiled samples (moa_vllm/planner/retrieval.py has the arithmetic and
why), one forward per sample with a matchable target; run when a candidate set needs it (a retrieval weight, the
hybrid candidates, or the diagnosis's group ablation)."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
from tqdm import tqdm

from moa_vllm.planner import artefacts as art
from moa_vllm.planner import profile as prof
from moa_vllm.planner.config import PlannerConfig
from moa_vllm.planner.model_inputs import ModelInputs
from moa_vllm.planner.retrieval import head_scores, sample_retrieval, target_positions
from moa_vllm.planner.steps.calibrate import Calibration
from moa_vllm.planner.steps.profile import profiled_count

log = logging.getLogger(__name__)

RETRIEVAL_VERSION = 4  # 2: rule loss from each head's mass at a uniform depth; 3: + extension lengths; 4: facts


@dataclass(frozen=True)
class LevelRetrieval:
    level: int
    key: dict[str, Any]
    offsets: np.ndarray  # [layers, kv_heads, level]: mean retrieval mass by distance

    @property
    def digest(self) -> str:
        return art.digest(self.key)

    @property
    def mass(self) -> np.ndarray:
        """[layers, kv_heads]: mean retrieval mass per head (beyond the sinks)."""
        return head_scores(self.offsets)


def retrieval_key(config: PlannerConfig, calibration_digest: str, level: int) -> dict[str, Any]:
    return {
        "version": RETRIEVAL_VERSION,
        "calibration": calibration_digest,
        "level": level,
        "sinks": config.sinks,
        "samples": profiled_count(config, level),
    }


def retrieval(
    calibration: Calibration, model: ModelInputs, config: PlannerConfig, work: art.WorkDir
) -> dict[int, LevelRetrieval]:
    """Retrieval mass by distance of every profiled sample with a matchable target, per profiled length.
    A forward pass per sample (no backward): a few seconds at 2k tokens."""
    out: dict[int, LevelRetrieval] = {}
    for level in config.lengths:
        path = work.path(f"retrieval-L{level}.npz")
        key = art.normalised(retrieval_key(config, calibration.digest, level))
        old = art.load_npz(path)
        if old and old["key"] == key:
            log.info("retrieval: %s is up to date, skipped", path)
            out[level] = LevelRetrieval(level, old["key"], old["offsets"])
            continue
        samples = calibration.at(level)[: profiled_count(config, level)]
        fp = model.fingerprint
        total, each, used = np.zeros((fp.num_layers, fp.num_kv_heads, level)), [], []
        prof.use_capture_attention(model.model)
        with work.timings.step(f"retrieval-L{level}", samples=len(samples)):
            for sample in tqdm(samples, desc=f"retrieval {level}", disable=not config.progress):
                target = target_positions(sample, model.tokenizer)
                if target is None:
                    continue
                ids = sample.prompt_ids + sample.answer_ids
                r = sample_retrieval(model.model, ids, target, config.sinks)
                total[..., : r.shape[-1]] += r
                each.append(r.sum(axis=-1))
                used.append(sample.index)
        art.save_npz_atomic(
            path,
            key,
            offsets=total / max(len(used), 1),
            head_mass_each=np.array(each).reshape(len(used), fp.num_layers, fp.num_kv_heads),
            sample_index=np.array(used, dtype=np.int64),
            complete=np.array(True),
        )
        data = art.load_npz(path)
        out[level] = LevelRetrieval(level, data["key"], data["offsets"])
    return out
