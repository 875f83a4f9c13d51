"""Reading and writing plan files, with one clear error per problem."""

from __future__ import annotations

import json
from pathlib import Path

from pydantic import ValidationError

from moa_vllm.plan.errors import PlanError
from moa_vllm.plan.schema import Plan


def _describe(err: ValidationError) -> str:
    errors = err.errors()
    first = errors[0]
    loc = ".".join(str(p) for p in first["loc"]) or "<root>"
    more = f" (and {len(errors) - 1} more problem(s))" if len(errors) > 1 else ""
    return f"field '{loc}': {first['msg']}{more}"


def parse_plan(text: str, source: str = "<plan>") -> Plan:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise PlanError(f"{source}: invalid JSON at line {e.lineno} column {e.colno}: {e.msg}") from e
    if not isinstance(data, dict):
        raise PlanError(f"{source}: a plan must be a JSON object, got {type(data).__name__}")
    if "alphas" in data and "betas" in data and "format_version" not in data:
        raise PlanError(
            f"{source}: this is a reference MoA plan ({{alphas, betas}}); convert it first with "
            "`moa-vllm plan import-reference`"
        )
    try:
        return Plan.model_validate(data)
    except ValidationError as e:
        raise PlanError(f"{source}: {_describe(e)}") from e


def load_plan(path: str | Path) -> Plan:
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError as e:
        raise PlanError(f"{path}: plan file not found") from e
    except (IsADirectoryError, PermissionError, UnicodeDecodeError) as e:
        raise PlanError(f"{path}: cannot read plan file ({e})") from e
    return parse_plan(text, str(path))


def save_plan(plan: Plan, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    unset = {"kv_amax"} if plan.kv_amax is None else None  # plans without fp8 calibration keep their old text
    path.write_text(plan.model_dump_json(indent=1, exclude=unset) + "\n")
    return path


def plan_digest(plan: Plan) -> str:
    """What decides a plan's masks: sinks, min_span and the rules, not its metadata (16 hex digits of sha256 over
    canonical JSON). The planner keys its artefacts by it; a server reports it as the plan's fingerprint."""
    import hashlib

    rules = [[r.model_dump(mode="json") for r in layer] for layer in plan.rules]
    body = {"sinks": plan.sink_tokens, "min_span": plan.min_span, "rules": rules}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()[:16]
