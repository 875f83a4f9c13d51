"""The planner's retrieval step (a Pipeline mixin): retrieval mass per KV head on the profiled samples, and the rule
loss it adds to the influence loss of the candidate sets with a retrieval weight (moa_vllm/planner/retrieval.py has
the arithmetic and why)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from moa_vllm.planner import artefacts as art

log = logging.getLogger(__name__)

RETRIEVAL_VERSION = 3  # 2: rule loss from each head's mass at a uniform depth; 3: + extension lengths


class RetrievalStep:
    def retrieval_key(self, calibration_digest: str, level: int) -> dict[str, Any]:
        return {
            "version": RETRIEVAL_VERSION,
            "calibration": calibration_digest,
            "level": level,
            "sinks": self.config.sinks,
            "samples": self.profiled_count(level),
        }

    def retrieval(self) -> dict[int, Path]:
        """Retrieval mass by distance of every profiled sample with a matchable target, per profiled length.
        A forward pass per sample (no backward): a few seconds at 2k tokens."""
        from moa_vllm.planner import profile as prof
        from moa_vllm.planner.retrieval import sample_retrieval, target_positions

        cal = self.calibrate()
        out: dict[int, Path] = {}
        for level in self.config.lengths:
            path = out[level] = self.path(f"retrieval-L{level}.npz")
            key = art.normalised(self.retrieval_key(cal["digest"], level))
            old = art.load_npz(path)
            if old and old["key"] == key:
                log.info("retrieval: %s is up to date, skipped", path)
                continue
            samples = self.samples(level)[: self.profiled_count(level)]
            fp = self.fingerprint
            total, each, used = np.zeros((fp.num_layers, fp.num_kv_heads, level)), [], []
            prof.use_capture_attention(self.model)
            with self.timings.step(f"retrieval-L{level}", samples=len(samples)):
                for sample in tqdm(samples, desc=f"retrieval {level}", disable=not self.config.progress):
                    target = target_positions(sample, self.tokenizer)
                    if target is None:
                        continue
                    ids = sample.prompt_ids + sample.answer_ids
                    r = sample_retrieval(self.model, ids, target, self.config.sinks)
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
        return out

    def retrieval_mass(self, level: int) -> np.ndarray:
        """[layers, kv_heads]: mean retrieval mass per head at `level` (beyond the sinks)."""
        from moa_vllm.planner.retrieval import head_scores

        data = art.load_npz(self.path(f"retrieval-L{level}.npz"))
        if data is None:
            raise FileNotFoundError(f"no retrieval profile for length {level}; run `moa-plan profile` first")
        return head_scores(data["offsets"])

    def retrieval_loss(self, level: int) -> np.ndarray:
        """loss[layer, kv_head, rule] at `level`: the retrieval mass each rule's window would miss for a target at a
        uniformly random depth (see retrieval.py for why not the calibration's own depths), averaged over `level`
        and every extension length above it. The mass does not depend on N under that model, so the longer lengths
        cost nothing to score, and without them a constant rule (2048 + 0 N) looks as good as a full one."""
        from moa_vllm.planner.retrieval import uniform_depth_loss

        mass = self.retrieval_mass(level)
        lengths = [level, *(n for n in self.config.extension_lengths if n > level)]
        losses = [uniform_depth_loss(mass, self.rule_windows(n).numpy(), n, self.config.sinks) for n in lengths]
        return np.mean(losses, axis=0)
