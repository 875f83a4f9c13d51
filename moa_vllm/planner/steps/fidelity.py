"""Step 4b: every candidate plan's top-1 agreement and KL to dense on held-out natural text
(moa_vllm/planner/fidelity.py has the measure and why), checkpointed per plan and keyed by the plan's rules, so a
candidate that did not change is never measured twice."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Any

import torch

from moa_vllm.plan.schema import Plan
from moa_vllm.planner import artefacts as art
from moa_vllm.planner.artefacts import density_tag
from moa_vllm.planner.config import PlannerConfig
from moa_vllm.planner.fidelity import held_out_texts, next_token_logprobs, plan_fidelity
from moa_vllm.planner.model_inputs import ModelInputs
from moa_vllm.planner.steps.calibrate import Calibration

FIDELITY_VERSION = 1


@dataclass
class HeldOutText:
    """The held-out texts (they avoid the calibration's samples) and the dense model's next-token log-probs on
    them: made on first use and shared by every density of a run."""

    model: ModelInputs
    calibration: Calibration
    config: PlannerConfig

    @cached_property
    def texts(self) -> list[list[int]]:
        c = self.config
        exclude = [s.prompt_ids + s.answer_ids for s in self.calibration.samples]
        return held_out_texts(self.model.tokenizer, c.fidelity_length, c.fidelity_texts, c.seed, exclude)

    @cached_property
    def dense_logprobs(self) -> list[torch.Tensor]:
        return [next_token_logprobs(self.model.model, None, ids) for ids in self.texts]


def fidelity_key(calibration: Calibration, config: PlannerConfig) -> dict[str, Any]:
    return {
        "version": FIDELITY_VERSION,
        "calibration": calibration.digest,  # the texts avoid its samples
        "length": config.fidelity_length,
        "texts": config.fidelity_texts,
        "seed": config.seed,
    }


def fidelity(
    density: float, plans: dict[str, Plan], held_out: HeldOutText, config: PlannerConfig, work: art.WorkDir
) -> dict[str, dict[str, Any]]:
    """{name: {"plan": digest, "top1": .., "kl": ..}} for every plan (empty when fidelity_texts is 0)."""
    if not config.fidelity_texts:
        return {}
    name = f"fidelity-{density_tag(density)}"
    path, key = work.path(f"{name}.json"), art.normalised(fidelity_key(held_out.calibration, config))
    doc = art.read_json(path)
    if not doc or doc.get("key") != key:
        doc = {"key": key, "plans": {}}
    digests = {n: art.plan_digest(p) for n, p in plans.items()}
    todo = [n for n in plans if doc["plans"].get(n, {}).get("plan") != digests[n]]
    if todo:
        with (
            work.timings.step(name, plans=len(todo), texts=config.fidelity_texts),
            work.bar(len(todo), f"fidelity d{density}") as bar,
        ):
            for n in todo:
                result = plan_fidelity(held_out.model.model, plans[n], held_out.texts, held_out.dense_logprobs)
                doc["plans"][n] = {"plan": digests[n], **result.to_json()}
                art.write_json_atomic(path, doc)
                bar.update(1)
    return {n: doc["plans"][n] for n in plans}
