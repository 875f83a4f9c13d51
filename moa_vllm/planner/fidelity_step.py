"""The planner's fidelity step (a Pipeline mixin): every candidate plan's top-1 agreement and KL to dense on
held-out natural text (moa_vllm/planner/fidelity.py has the measure and why), checkpointed per plan and keyed by
the plan's rules, so a candidate that did not change is never measured twice."""

from __future__ import annotations

from functools import cached_property
from typing import Any

import torch

from moa_vllm.plan.schema import Plan
from moa_vllm.planner import artefacts as art
from moa_vllm.planner.artefacts import density_tag
from moa_vllm.planner.calibrate import Sample

FIDELITY_VERSION = 1


class FidelityStep:
    def fidelity_key(self) -> dict[str, Any]:
        c = self.config
        return {
            "version": FIDELITY_VERSION,
            "calibration": self.calibrate()["digest"],  # the texts avoid its samples
            "length": c.fidelity_length,
            "texts": c.fidelity_texts,
            "seed": c.seed,
        }

    @cached_property
    def fidelity_texts(self) -> list[list[int]]:
        from moa_vllm.planner.fidelity import held_out_texts

        c = self.config
        samples = [Sample.from_json(s) for s in self.calibrate()["samples"]]
        exclude = [s.prompt_ids + s.answer_ids for s in samples]
        return held_out_texts(self.tokenizer, c.fidelity_length, c.fidelity_texts, c.seed, exclude)

    @cached_property
    def _dense_logprobs(self) -> list[torch.Tensor]:
        from moa_vllm.planner.fidelity import next_token_logprobs

        return [next_token_logprobs(self.model, None, ids) for ids in self.fidelity_texts]

    def fidelity(self, density: float, plans: dict[str, Plan]) -> dict[str, dict[str, Any]]:
        """{name: {"plan": digest, "top1": .., "kl": ..}} for every plan (empty when --fidelity-texts is 0)."""
        from moa_vllm.planner.fidelity import plan_fidelity

        if not self.config.fidelity_texts:
            return {}
        name = f"fidelity-{density_tag(density)}"
        path, key = self.path(f"{name}.json"), art.normalised(self.fidelity_key())
        doc = art.read_json(path)
        if not doc or doc.get("key") != key:
            doc = {"key": key, "plans": {}}
        digests = {n: art.plan_digest(p) for n, p in plans.items()}
        todo = [n for n in plans if doc["plans"].get(n, {}).get("plan") != digests[n]]
        if todo:
            with (
                self.timings.step(name, plans=len(todo), texts=self.config.fidelity_texts),
                self._bar(len(todo), f"fidelity d{density}") as bar,
            ):
                for n in todo:
                    result = plan_fidelity(self.model, plans[n], self.fidelity_texts, self._dense_logprobs)
                    doc["plans"][n] = {"plan": digests[n], **result.to_json()}
                    art.write_json_atomic(path, doc)
                    bar.update(1)
        return {n: doc["plans"][n] for n in plans}
