"""Where the plugin's plan comes from, loaded once per process and checked against the model."""

from __future__ import annotations

import os
from typing import Any

from moa_vllm.plan import Plan, PlanError, check_plan_fits, fingerprint_from_hf_config, load_plan

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


def load_checked_plan(path: str, hf_config: Any) -> Plan:
    """The plan at `path`, verified to fit the model whose HF config is given (cached per path)."""
    if path not in _plans:
        plan = load_plan(path)
        config = hf_config.to_dict() if hasattr(hf_config, "to_dict") else dict(hf_config)
        check_plan_fits(plan, fingerprint_from_hf_config(config), plan_source=path)
        _plans[path] = plan
    return _plans[path]


def plan_from_vllm_config(vllm_config: Any) -> Plan:
    path = plan_path(vllm_config.additional_config)
    if path is None:
        raise missing_plan_error()
    return load_checked_plan(path, vllm_config.model_config.hf_config)
