"""Plan resolution, one place: explicit (--additional-config, then $MOA_VLLM_PLAN) > model folder > derived."""

from __future__ import annotations

import json
import logging

import pytest

from moa_vllm.plan import (
    ModelFingerprint,
    PlanError,
    dense_plan,
    fingerprint_from_hf_config,
    save_plan,
    uniform_plan,
    window_plan,
)
from moa_vllm.plan.attach import attach_plan
from moa_vllm.vllm_plugin import settings
from tests.conftest import SMALL_LLAMA

CONFIG = SMALL_LLAMA
FP = fingerprint_from_hf_config(SMALL_LLAMA)


@pytest.fixture(autouse=True)
def fresh(monkeypatch):
    monkeypatch.setattr(settings, "_plans", {})
    monkeypatch.setattr(settings, "_logged", set())
    monkeypatch.setattr(settings, "_families", {})
    monkeypatch.delenv(settings.PLAN_ENV, raising=False)


@pytest.fixture
def folder(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps(CONFIG))
    return model


def _explicit(path) -> dict:
    return {"moa": {"plan": str(path)}}


def test_each_source_in_order(folder, tmp_path, monkeypatch):
    explicit = save_plan(dense_plan(FP), tmp_path / "explicit.json")
    env = save_plan(uniform_plan(FP, 0.5), tmp_path / "env.json")
    attach_plan(save_plan(uniform_plan(FP, 0.25), tmp_path / "attached.json"), folder)
    monkeypatch.setenv(settings.PLAN_ENV, str(env))
    got = settings.resolve_plan(_explicit(explicit), str(folder), CONFIG)
    assert (got.source, got.where) == ("additional_config", str(explicit))
    got = settings.resolve_plan({}, str(folder), CONFIG)
    assert (got.source, got.where) == ("env", str(env))
    monkeypatch.delenv(settings.PLAN_ENV)
    got = settings.resolve_plan({}, str(folder), CONFIG)
    assert got.source == "model folder" and got.plan.metadata.density_targets == [0.25]


def test_a_derived_family_serves_without_any_file(folder):
    family = settings.DerivedPlanFamily(
        "toy", lambda c: c.get("model_type") == "llama", lambda c: FP, lambda c: window_plan(FP, 32)
    )
    settings.register_derived_plan(family)
    got = settings.resolve_plan(None, str(folder), CONFIG)
    assert (got.source, got.where, got.plan.metadata.method) == ("derived", "toy config", "window")


def test_no_source_names_every_way_to_give_one(folder):
    with pytest.raises(PlanError, match="needs a plan file") as e:
        settings.resolve_plan(None, str(folder), CONFIG)
    assert settings.PLAN_ENV in str(e.value) and "moa-vllm plan attach" in str(e.value)


def test_a_folder_plan_for_another_model_is_refused_naming_its_file(folder, tmp_path):
    other = ModelFingerprint(architecture="X", num_layers=3, num_query_heads=4, num_kv_heads=2, head_dim=16)
    save_plan(dense_plan(other), folder / "moa_plan.json")  # written by hand, not through attach's check
    with pytest.raises(PlanError, match=r"moa_plan.json: plan does not fit the model: model.num_layers is 3"):
        settings.resolve_plan(None, str(folder), CONFIG)


def test_one_log_line_names_the_winning_source(folder, tmp_path):
    attach_plan(save_plan(uniform_plan(FP, 0.25), tmp_path / "a.json"), folder)
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append
    settings.logger.addHandler(handler)
    level = settings.logger.level
    settings.logger.setLevel(logging.INFO)  # vLLM configures its loggers in its own processes only
    try:
        for _ in range(3):  # every layer of every worker asks; the source is logged once
            settings.resolve_plan(None, str(folder), CONFIG)
    finally:
        settings.logger.removeHandler(handler)
        settings.logger.setLevel(level)
    lines = [r.getMessage() for r in records]
    assert lines == [f"moa-vllm: plan from model folder: {folder / 'moa_plan.json'} (uniform)"]


def _config(additional=None, caching=True):
    from types import SimpleNamespace

    return SimpleNamespace(additional_config=additional, cache_config=SimpleNamespace(enable_prefix_caching=caching))


def test_span_length_floor_and_client_hint():
    assert settings.span_floor(_config()) == 0
    assert settings.span_floor(_config({"moa": {"span_length": 8192}})) == 8192
    from types import SimpleNamespace

    assert settings.span_hint(SimpleNamespace(extra_args=None)) is None
    assert settings.span_hint(SimpleNamespace(extra_args={"other": 1})) is None
    assert settings.span_hint(SimpleNamespace(extra_args={"moa_span_length": 4096})) == 4096
    assert settings.span_hint(SimpleNamespace(extra_args={"moa_span_length": "4096"})) == 4096
    for bad in (0, -1, "x", 2.5, False):
        with pytest.raises(ValueError, match="moa_span_length"):
            settings.span_hint(SimpleNamespace(extra_args={"moa_span_length": bad}))


def test_span_grid_defaults_with_prefix_caching_and_can_be_set():
    assert settings.span_grid(_config()) == settings.DEFAULT_SPAN_GRID
    assert settings.span_grid(_config(caching=False)) == 0  # exact N, as before prefix caching
    assert settings.span_grid(_config({"moa": {"span_grid": 0}})) == 0
    assert settings.span_grid(_config({"moa": {"span_grid": 4}}, caching=False)) == 4


@pytest.mark.parametrize(
    ("section", "message"),
    [
        ({"span_grid": -1}, "span_grid: expected an integer 0..64"),
        ({"span_grid": "8"}, "span_grid: expected an integer"),
        ({"plan": 3}, "moa.plan: expected a path"),
        ({"plans": "x"}, "every key optional"),
        ({"span_length": -1}, "span_length: expected a token count >= 0"),
        ({"span_length": "8k"}, "span_length: expected a token count"),
    ],
)
def test_a_bad_moa_section_names_its_field(section, message):
    with pytest.raises(PlanError, match=message):
        settings.span_grid(_config({"moa": section}))
