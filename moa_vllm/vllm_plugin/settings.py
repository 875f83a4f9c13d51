"""Where the plugin's plan comes from, loaded once per process and checked against the model."""

from __future__ import annotations

import os
from typing import Any

from moa_vllm.plan import ModelFingerprint, Plan, PlanError, check_plan_fits, fingerprint_from_hf_config, load_plan
from moa_vllm.vllm_plugin.bst_config import bst_fingerprint, bst_window_plan, is_bst_config

PLAN_ENV = "MOA_VLLM_PLAN"
CONFIG_KEY = "moa"

_plans: dict[str, Plan] = {}


def plan_path(additional_config: Any) -> str | None:
    """--additional-config '{"moa": {"plan": PATH}}' wins over $MOA_VLLM_PLAN."""
    if isinstance(additional_config, dict):
        section = additional_config.get(CONFIG_KEY)
        if section is not None:
            if not isinstance(section, dict) or not isinstance(section.get("plan"), str):
                raise PlanError('additional_config.moa: expected {"moa": {"plan": "PATH"}}, got ' + repr(section))
            return section["plan"]
    return os.environ.get(PLAN_ENV) or None


def missing_plan_error() -> PlanError:
    return PlanError(
        "--attention-backend moa needs a plan file: pass --additional-config "
        '\'{"moa": {"plan": "PATH"}}\' or set ' + PLAN_ENV
    )


def model_fingerprint(hf_config: Any) -> ModelFingerprint:
    """What a plan must fit. A BST's attention call runs more heads than ``num_attention_heads`` says (self +
    context heads), so its fingerprint counts those; every other model is read the usual way."""
    if is_bst_config(hf_config):
        return bst_fingerprint(hf_config)
    config = hf_config.to_dict() if hasattr(hf_config, "to_dict") else dict(hf_config)
    return fingerprint_from_hf_config(config)


def load_checked_plan(path: str, hf_config: Any) -> Plan:
    """The plan at `path`, verified to fit the model whose HF config is given (cached per path)."""
    if path not in _plans:
        plan = load_plan(path)
        check_plan_fits(plan, model_fingerprint(hf_config), plan_source=path)
        _plans[path] = plan
    return _plans[path]


def plan_from_vllm_config(vllm_config: Any) -> Plan:
    """The plan file's rules; a BST without one gets its trained window as a plan (no file needed)."""
    hf_config = vllm_config.model_config.hf_config
    path = plan_path(vllm_config.additional_config)
    if path is None:
        if is_bst_config(hf_config):
            plan = bst_window_plan(hf_config)
            check_plan_fits(plan, model_fingerprint(hf_config), plan_source="BST window plan")
            return plan
        raise missing_plan_error()
    return load_checked_plan(path, hf_config)
