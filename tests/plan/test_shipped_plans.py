"""Every shipped plan fits its model (plans/<model>/config.json holds the model's config facts), and every shipped
reference plan is exactly what the importer makes from the vendored published rules, with their provenance."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from moa_vllm.plan import check_plan_fits, fingerprint_from_hf_config, load_hf_config, load_plan
from moa_vllm.plan.fingerprint import context_length
from moa_vllm.plan.reference import PROVENANCE_FIELDS, import_reference_file, report_lengths

PLANS = Path(__file__).resolve().parents[2] / "plans"
MODELS = sorted(p.parent.name for p in PLANS.glob("*/config.json"))
REFERENCES = sorted(p.parent.parent.name for p in PLANS.glob("*/reference/moa_alpha_beta.json"))
SHIPPED = sorted(
    (m, p.name) for m in MODELS for p in (PLANS / m).glob("*.json") if p.name != "config.json"
)  # fmt: skip


def test_every_model_folder_has_its_config_facts_and_the_six_references_are_shipped():
    assert {p.name for p in PLANS.iterdir() if p.is_dir()} == set(MODELS)
    assert set(REFERENCES) == {"Llama-3.2-1B-Instruct", "Llama-3.2-3B-Instruct", "Llama-3-8B-Instruct-262k",
                               "Llama-3-70B-Instruct-262k", "vicuna-7b-v1.5-16k", "vicuna-13b-v1.5-16k"}  # fmt: skip
    assert all((PLANS / m / "moa-reference.json").is_file() for m in REFERENCES)


@pytest.mark.parametrize(("model", "plan"), SHIPPED)
def test_a_shipped_plan_fits_its_model(model: str, plan: str):
    config = load_hf_config(PLANS / model / "config.json")
    loaded = load_plan(PLANS / model / plan)
    check_plan_fits(loaded, fingerprint_from_hf_config(config), plan)
    n = context_length(config)
    assert n is not None and all(0 < s <= n for layer in loaded.spans(n) for s in layer)


@pytest.mark.parametrize("model", REFERENCES)
def test_a_shipped_reference_plan_is_the_import_of_its_vendored_source(model: str):
    folder = PLANS / model
    config = load_hf_config(folder / "config.json")
    lengths = report_lengths(context_length(config))
    source = folder / "reference" / "moa_alpha_beta.json"
    again, _ = import_reference_file(
        source, fingerprint_from_hf_config(config), lengths, folder / "reference" / "source.json"
    )
    shipped = load_plan(folder / "moa-reference.json")
    assert shipped.rules == again.rules and (shipped.sink_tokens, shipped.min_span) == (
        again.sink_tokens,
        again.min_span,
    )
    provenance = shipped.metadata.extra["source"]
    assert provenance == again.metadata.extra["source"]
    assert provenance["sha256"] == hashlib.sha256(source.read_bytes()).hexdigest()
    assert all(provenance[f] for f in PROVENANCE_FIELDS) and provenance["licence"].startswith("MIT")
    widening = shipped.metadata.extra["widening"]["lengths"]
    assert [row["length"] for row in widening] == list(lengths)
    assert all(row["imported_density"] >= row["reference_density"] for row in widening)  # the envelope never cuts
    assert widening == again.metadata.extra["widening"]["lengths"]


def test_the_readme_names_every_reference_and_carries_the_licence_notice():
    readme = (PLANS / "README.md").read_text()
    assert "Copyright (c) 2024 NICS-EFC Lab of Tsinghua University" in readme
    assert "Permission is hereby granted, free of charge" in readme
    for model in REFERENCES:
        assert f"{model}/moa-reference.json" in readme
        commit = json.loads((PLANS / model / "reference" / "source.json").read_text())["commit"]
        assert commit in readme
