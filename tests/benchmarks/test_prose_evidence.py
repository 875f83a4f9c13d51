"""The evidence of where a plan loses prose answers: its per-head visibility agrees with the harness's record, plan
names resolve to the shipped files, and the dense needle-mass cache refuses another model's masses."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks.prose_retrieval import corpora
from benchmarks.prose_retrieval.evidence import load_masses, plan_path, sees
from benchmarks.prose_retrieval.results import heads_seeing_facts
from benchmarks.prose_retrieval.tasks import build_case
from moa_vllm.plan import fingerprint_from_hf_config, load_hf_config, window_plan
from tests.conftest import REPO
from tests.planner.tiny_llama import save_tiny_llama, tiny_tokenizer


def test_per_head_visibility_agrees_with_the_harness_share(tmp_path: Path):
    fp = fingerprint_from_hf_config(load_hf_config(save_tiny_llama(tmp_path)))
    case = build_case(tiny_tokenizer(), corpora.load("stdlib-docstrings"), "two-needles", 900, (0.3, 0.9), 0, 16)
    shares = []
    for window in (64, 2048):  # the first fact is out of reach, then in reach
        plan = window_plan(fp, window)
        shares.append(float(sees(plan, case, 2048).mean()))
        assert shares[-1] == pytest.approx(heads_seeing_facts(plan, case, 2048))
    assert shares == [0.0, 1.0]


def test_plan_names_resolve_to_shipped_files_and_paths_stay_paths():
    assert plan_path("moa-d0.50") == REPO / "plans" / "SmolLM2-135M-Instruct" / "moa-d0.50.json"
    assert plan_path("x/y/moa-d0.25-plan29.json") == Path("x/y/moa-d0.25-plan29.json")


def test_the_mass_cache_refuses_another_models_masses(tmp_path: Path):
    path = tmp_path / "needle-mass.json"
    assert load_masses(path, "m") == {}
    path.write_text(json.dumps({"model": "m", "masses": {"abc": [[0.5, 0.25]]}}))
    assert load_masses(path, "m")["abc"].tolist() == [[0.5, 0.25]]
    with pytest.raises(SystemExit, match="not other"):
        load_masses(path, "other")
