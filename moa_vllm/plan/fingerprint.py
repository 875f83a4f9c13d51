"""Model fingerprints read from a Hugging Face config, and the check that a plan fits a model."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from moa_vllm.plan.errors import PlanError
from moa_vllm.plan.schema import ModelFingerprint, Plan


def load_hf_config(model: str | Path) -> dict[str, Any]:
    """config.json of a local HF model folder (or the file itself)."""
    path = Path(model)
    if path.is_dir():
        path = path / "config.json"
    try:
        return json.loads(path.read_text())
    except FileNotFoundError as e:
        raise PlanError(f"{path}: model config not found") from e
    except json.JSONDecodeError as e:
        raise PlanError(f"{path}: invalid JSON ({e})") from e


def fingerprint_from_hf_config(config: Mapping[str, Any]) -> ModelFingerprint:
    """Works for llama / qwen2 / mistral style configs (GQA via num_key_value_heads)."""
    text = config.get("text_config", config)  # multimodal wrappers keep the LM config nested
    n_q = int(text["num_attention_heads"])
    arch = (config.get("architectures") or [text.get("model_type", "unknown")])[0]
    head_dim = text.get("head_dim") or int(text["hidden_size"]) // n_q
    return ModelFingerprint(
        architecture=arch,
        num_layers=int(text["num_hidden_layers"]),
        num_query_heads=n_q,
        num_kv_heads=int(text.get("num_key_value_heads") or n_q),
        head_dim=int(head_dim),
    )


# rope scalings whose factor stretches max_position_embeddings (vLLM's rule: llama3 / longrope configs already
# state the stretched length)
_STRETCHING_ROPE = ("linear", "dynamic", "yarn")


def context_length(config: Mapping[str, Any]) -> int | None:
    """The longest request the config allows: max_position_embeddings, times the rope factor where the rope type
    stretches it (vicuna-16k: 4096 x linear 4 = 16384); None when the config states no length."""
    text = config.get("text_config", config)
    base = text.get("max_position_embeddings")
    if base is None:
        return None
    scaling = text.get("rope_scaling") or {}
    kind = scaling.get("rope_type", scaling.get("type"))
    return int(base * scaling.get("factor", 1.0)) if kind in _STRETCHING_ROPE else int(base)


def check_plan_fits(plan: Plan, model: ModelFingerprint, plan_source: str = "plan") -> None:
    """Raise one PlanError listing every fingerprint field where plan and model disagree.

    The architecture name is not compared: the same weights may load under another class name (e.g. the plugin's
    own wrappers); the shape fields are what the attention kernels depend on.
    """
    wrong = [
        f"model.{field} is {getattr(plan.model, field)} but the model has {getattr(model, field)}"
        for field in ("num_layers", "num_query_heads", "num_kv_heads", "head_dim")
        if getattr(plan.model, field) != getattr(model, field)
    ]
    if wrong:
        raise PlanError(f"{plan_source}: plan does not fit the model: " + "; ".join(wrong))
