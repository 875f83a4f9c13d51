"""The model a planner run plans for: its fingerprint and identity (cheap, from config.json) and its tokenizer and
float32 weights, loaded on first use so that a run whose artefacts are all up to date never loads the model."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import torch

from moa_vllm.plan.fingerprint import fingerprint_from_hf_config, load_hf_config
from moa_vllm.plan.schema import ModelFingerprint
from moa_vllm.planner import artefacts as art


@dataclass
class ModelInputs:
    path: Path
    device: str = "cpu"

    @cached_property
    def fingerprint(self) -> ModelFingerprint:
        return fingerprint_from_hf_config(load_hf_config(self.path))

    @cached_property
    def identity(self) -> dict[str, Any]:
        return art.model_identity(self.path)

    @cached_property
    def tokenizer(self):
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(self.path)

    @cached_property
    def model(self):
        """The dense model in float32 (profiling differentiates through it), without weight gradients."""
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(self.path, dtype=torch.float32)
        model.to(self.device).eval().requires_grad_(False)
        return model
