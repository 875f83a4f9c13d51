"""Plans kept with their model: moa_plan.json beside config.json, or config.json's sparse_attention_config."""

from __future__ import annotations

import json

import pytest

from moa_vllm.plan import (
    PlanError,
    dense_plan,
    fingerprint_from_hf_config,
    load_plan,
    save_plan,
    uniform_plan,
)
from moa_vllm.plan.attach import PLAN_FILE, attach_plan, folder_plan
from tests.conftest import SMALL_LLAMA

CONFIG = SMALL_LLAMA
FP = fingerprint_from_hf_config(SMALL_LLAMA)


@pytest.fixture
def folder(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(CONFIG))
    return tmp_path


def _config(folder, section):
    (folder / "config.json").write_text(json.dumps({**CONFIG, "sparse_attention_config": section}))


def test_attach_writes_the_plan_beside_config_and_the_folder_reads_it_back(folder, tmp_path):
    plan = save_plan(uniform_plan(FP, 0.5), tmp_path / "u.json")
    dest = attach_plan(plan, folder)
    assert dest == folder / PLAN_FILE
    found = folder_plan(folder)
    assert found.plan == load_plan(plan) and found.where == str(dest)


def test_attach_refuses_to_replace_another_plan_unless_forced(folder, tmp_path):
    attach_plan(save_plan(uniform_plan(FP, 0.5), tmp_path / "a.json"), folder)
    attach_plan(tmp_path / "a.json", folder)  # the same plan again is fine
    other = save_plan(dense_plan(FP), tmp_path / "b.json")
    with pytest.raises(PlanError, match="holds another plan; pass --force"):
        attach_plan(other, folder)
    attach_plan(other, folder, force=True)
    assert folder_plan(folder).plan.metadata.method == "dense"


def test_a_folder_without_a_plan_has_none(folder, tmp_path):
    assert folder_plan(folder) is None
    assert folder_plan(tmp_path / "missing") is None
    _config(folder, {"algorithm": "skip_softmax", "threshold": 0.1})  # another method's section is not ours
    assert folder_plan(folder) is None


def test_config_section_inline_or_file_is_accepted(folder, tmp_path):
    plan = uniform_plan(FP, 0.25)
    _config(folder, {"algorithm": "moa", "plan": json.loads(plan.model_dump_json())})
    found = folder_plan(folder)
    assert found.plan == plan and found.where.endswith("config.json#sparse_attention_config")
    save_plan(plan, folder / "mine.json")
    _config(folder, {"algorithm": "MoA", "plan_file": "mine.json"})
    assert folder_plan(folder).where == str(folder / "mine.json")


def test_moa_plan_json_wins_over_the_config_section(folder, tmp_path):
    _config(folder, {"algorithm": "moa", "plan": json.loads(uniform_plan(FP, 0.25).model_dump_json())})
    attach_plan(save_plan(dense_plan(FP), tmp_path / "d.json"), folder)
    assert folder_plan(folder).plan.metadata.method == "dense"


def test_a_malformed_section_names_config_json(folder):
    _config(folder, {"algorithm": "moa"})
    with pytest.raises(PlanError, match=r"config.json#sparse_attention_config: .* needs \"plan\""):
        folder_plan(folder)
    _config(folder, {"algorithm": "moa", "plan": {"format_version": 1}})
    with pytest.raises(PlanError, match="config.json#sparse_attention_config"):
        folder_plan(folder)
