"""Plans kept with their model: a `moa_plan.json` beside config.json (what `moa-vllm plan attach` writes), or a
`sparse_attention_config` section of config.json (the convention of NVIDIA ModelOpt and Qwen's dual-chunk models,
accepted when its algorithm is "moa"). Imports no vLLM."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from moa_vllm.plan.errors import PlanError
from moa_vllm.plan.fingerprint import check_plan_fits, fingerprint_from_hf_config, load_hf_config
from moa_vllm.plan.io import load_plan, parse_plan, save_plan
from moa_vllm.plan.schema import Plan

PLAN_FILE = "moa_plan.json"
CONFIG_SECTION = "sparse_attention_config"
ALGORITHM = "moa"


@dataclass(frozen=True)
class FolderPlan:
    plan: Plan
    where: str  # the file (or "config.json#sparse_attention_config") it came from


def folder_plan(model_dir: str | Path) -> FolderPlan | None:
    """The plan a model folder carries, or None. `moa_plan.json` wins over a config.json section; a section for
    another algorithm is not ours and is ignored; a malformed one is an error naming config.json."""
    folder = Path(model_dir)
    if not folder.is_dir():
        return None
    beside = folder / PLAN_FILE
    if beside.is_file():
        return FolderPlan(load_plan(beside), str(beside))
    config = folder / "config.json"
    if not config.is_file():
        return None
    section = json.loads(config.read_text()).get(CONFIG_SECTION)
    if not isinstance(section, dict) or section.get("algorithm", "").lower() != ALGORITHM:
        return None
    where = f"{config}#{CONFIG_SECTION}"
    if isinstance(section.get("plan"), dict):
        return FolderPlan(parse_plan(json.dumps(section["plan"]), source=where), where)
    if isinstance(section.get("plan_file"), str):
        path = folder / section["plan_file"]
        return FolderPlan(load_plan(path), str(path))
    raise PlanError(f'{where}: algorithm "moa" needs "plan" (a plan v1 object) or "plan_file" (a file in the folder)')


def attach_plan(plan_path: str | Path, model_dir: str | Path, force: bool = False) -> Path:
    """Copy a plan into a model folder as moa_plan.json after checking it fits that model (its fingerprint)."""
    folder = Path(model_dir)
    if not (folder / "config.json").is_file():
        raise PlanError(f"{folder}: not a model folder (no config.json)")
    plan = load_plan(plan_path)
    check_plan_fits(plan, fingerprint_from_hf_config(load_hf_config(folder)), plan_source=str(plan_path))
    dest = folder / PLAN_FILE
    if dest.exists() and not force and load_plan(dest) != plan:
        raise PlanError(f"{dest} exists and holds another plan; pass --force to replace it")
    tmp = dest.with_name(f".{PLAN_FILE}.tmp-{os.getpid()}")
    save_plan(plan, tmp)
    os.replace(tmp, dest)
    return dest
