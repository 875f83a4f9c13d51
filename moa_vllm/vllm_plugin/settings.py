"""Where the plugin's plan comes from: resolved in ONE place, loaded once per process, checked against the model.

Resolution order (the first source that has a plan wins, and one log line names it):
1. explicit: --additional-config '{"moa": {"plan": PATH}}', then $MOA_VLLM_PLAN;
2. the model folder: `moa_plan.json` beside config.json (`moa-vllm plan attach`), else a
   `sparse_attention_config` section of config.json whose algorithm is "moa" (moa_vllm/plan/attach.py);
3. a plan the model derives itself: a model family registered with `register_derived_plan` (the BST's window).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from vllm.logger import init_logger

from moa_vllm.plan import ModelFingerprint, Plan, PlanError, check_plan_fits, fingerprint_from_hf_config, load_plan
from moa_vllm.plan.attach import PLAN_FILE, folder_plan

PLAN_ENV = "MOA_VLLM_PLAN"
BACKEND_PATH = "moa_vllm.vllm_plugin.moa.backend.MoABackend"
CONFIG_KEY = "moa"
CONFIG_FIELDS = {"plan", "span_grid", "span_length"}
# Steps per octave while prefix caching is on: one, so a conversation's turns share spans while their N stay within one
# doubling (spans are taken at up to 2N but never exceed N: ring bytes grow only on heads whose span grows with N).
DEFAULT_SPAN_GRID = 1
MAX_SPAN_GRID = 64
SPAN_HINT_KEY = "moa_span_length"  # a request's span length from the client (SamplingParams.extra_args)

logger = init_logger("vllm.moa_vllm")  # under "vllm" so vLLM's log config prints it


def moa_selected(vllm_config) -> bool:
    """Whether this config serves with the moa backend (CUSTOM, registered to our class)."""
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    if vllm_config.attention_config.backend != AttentionBackendEnum.CUSTOM:
        return False
    try:
        return AttentionBackendEnum.CUSTOM.get_path() == BACKEND_PATH
    except ValueError:
        return False


@dataclass(frozen=True)
class DerivedPlanFamily:
    """A model family that brings its own plan and fingerprint (registered by that family's plugin part)."""

    name: str
    matches: Callable[[Any], bool]  # hf_config -> is this family
    fingerprint: Callable[[Any], ModelFingerprint]
    plan: Callable[[Any], Plan]


@dataclass(frozen=True)
class ResolvedPlan:
    plan: Plan
    source: str  # "additional_config", "env", "model folder", "model config", "derived"
    where: str  # the file, or what derived it


_families: dict[str, DerivedPlanFamily] = {}
_plans: dict[tuple[str, str], ResolvedPlan] = {}
_logged: set[tuple[str, str]] = set()


def register_derived_plan(family: DerivedPlanFamily) -> None:
    _families[family.name] = family


def derived_family(hf_config: Any) -> DerivedPlanFamily | None:
    return next((f for f in _families.values() if f.matches(hf_config)), None)


def _section(additional_config: Any) -> dict:
    """The `moa` section of --additional-config ({} when absent), its keys checked."""
    if not isinstance(additional_config, dict) or additional_config.get(CONFIG_KEY) is None:
        return {}
    section = additional_config[CONFIG_KEY]
    if not isinstance(section, dict) or not section or set(section) - CONFIG_FIELDS:
        raise PlanError(
            'additional_config.moa: expected {"moa": {"plan": "PATH", "span_grid": STEPS, "span_length": TOKENS}} '
            f"(every key optional), got {section!r}"
        )
    if "plan" in section and not isinstance(section["plan"], str):
        raise PlanError(f"additional_config.moa.plan: expected a path, got {section['plan']!r}")
    grid = section.get("span_grid", 0)
    if isinstance(grid, bool) or not isinstance(grid, int) or not 0 <= grid <= MAX_SPAN_GRID:
        raise PlanError(f"additional_config.moa.span_grid: expected an integer 0..{MAX_SPAN_GRID}, got {grid!r}")
    floor = section.get("span_length", 0)
    if isinstance(floor, bool) or not isinstance(floor, int) or floor < 0:
        raise PlanError(
            "additional_config.moa.span_length: expected a token count >= 0 (spans of every request are taken at "
            f"at least this length; 0: the request's own), got {floor!r}"
        )
    return section


def _explicit(additional_config: Any) -> tuple[str, str | None]:
    """(source, path) of an explicit plan: --additional-config '{"moa": {"plan": PATH}}' wins over $MOA_VLLM_PLAN."""
    section = _section(additional_config)
    if "plan" in section:
        return "additional_config", section["plan"]
    return "env", os.environ.get(PLAN_ENV) or None


def span_grid(vllm_config: Any) -> int:
    """Span grid steps per octave (moa_vllm.plan.span.span_length): `additional_config.moa.span_grid` when given,
    else DEFAULT_SPAN_GRID while prefix caching is on (requests of nearby lengths then share spans, so their
    prefixes can be shared) and 0 (exact N) while it is off."""
    section = _section(getattr(vllm_config, "additional_config", None))
    if "span_grid" in section:
        return section["span_grid"]
    caching = getattr(getattr(vllm_config, "cache_config", None), "enable_prefix_caching", False)
    return DEFAULT_SPAN_GRID if caching else 0


def span_floor(vllm_config: Any) -> int:
    """The server's span length (`additional_config.moa.span_length`, 0 when absent): every request's spans are taken
    at no less than this many tokens, so a conversation whose turns stay under it keeps one set of spans."""
    return _section(getattr(vllm_config, "additional_config", None)).get("span_length", 0)


def span_hint(sampling_params: Any) -> int | None:
    """A request's own span length (`moa_span_length` in vLLM's extra_args / the OpenAI API's vllm_xargs), checked:
    None when absent; a ValueError naming the field for anything but a positive integer."""
    extra = getattr(sampling_params, "extra_args", None) or {}
    if SPAN_HINT_KEY not in extra:
        return None
    value = extra[SPAN_HINT_KEY]
    if isinstance(value, str) and value.strip().isdigit():  # vllm_xargs from a query string may arrive as text
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{SPAN_HINT_KEY}: expected a positive integer number of tokens, got {value!r}")
    return value


def missing_plan_error(model: str) -> PlanError:
    return PlanError(
        f"--attention-backend moa needs a plan file and none was found for {model}: pass --additional-config "
        f'\'{{"moa": {{"plan": "PATH"}}}}\', set {PLAN_ENV}, or attach one to the model folder '
        f"(`moa-vllm plan attach PLAN MODEL_DIR` writes {PLAN_FILE} beside config.json)"
    )


def model_fingerprint(hf_config: Any) -> ModelFingerprint:
    """What a plan must fit: a derived-plan family says (a BST runs more heads than num_attention_heads counts);
    every other model is read the usual way."""
    family = derived_family(hf_config)
    if family is not None:
        return family.fingerprint(hf_config)
    config = hf_config.to_dict() if hasattr(hf_config, "to_dict") else dict(hf_config)
    return fingerprint_from_hf_config(config)


def resolve_plan(additional_config: Any, model: str, hf_config: Any) -> ResolvedPlan:
    """The plan for this model from the first source that has one (see the module docstring), checked to fit."""
    source, path = _explicit(additional_config)
    key = (model, path or "")
    if key in _plans:
        return _plans[key]
    if path is not None:
        found = ResolvedPlan(load_plan(path), source, path)
    elif (attached := folder_plan(model)) is not None:
        kind = "model folder" if attached.where.endswith(PLAN_FILE) else "model config"
        found = ResolvedPlan(attached.plan, kind, attached.where)
    elif (family := derived_family(hf_config)) is not None:
        found = ResolvedPlan(family.plan(hf_config), "derived", f"{family.name} config")
    else:
        raise missing_plan_error(model)
    check_plan_fits(found.plan, model_fingerprint(hf_config), plan_source=found.where)
    _plans[key] = found
    if key not in _logged:
        _logged.add(key)
        logger.info("moa-vllm: plan from %s: %s (%s)", found.source, found.where, found.plan.metadata.method)
    return found


def plan_from_vllm_config(vllm_config: Any) -> Plan:
    model_config = vllm_config.model_config
    return resolve_plan(vllm_config.additional_config, str(model_config.model), model_config.hf_config).plan
