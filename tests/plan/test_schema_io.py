import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from moa_vllm.plan import (
    ModelFingerprint,
    PlanError,
    check_plan_fits,
    dense_plan,
    load_plan,
    parse_plan,
    save_plan,
    uniform_plan,
)

FP = ModelFingerprint(architecture="LlamaForCausalLM", num_layers=4, num_query_heads=6, num_kv_heads=2, head_dim=16)


def good_plan_dict() -> dict:
    return json.loads(uniform_plan(FP, 0.5).model_dump_json())


def test_roundtrip(tmp_path):
    plan = uniform_plan(FP, 0.25)
    path = save_plan(plan, tmp_path / "p.json")
    assert load_plan(path) == plan


def test_kv_amax_roundtrips_and_gives_fp8_scales(tmp_path):
    plan = uniform_plan(FP, 0.25).model_copy(update={"kv_amax": [(4.0, 8.0), (2.0, 1.0), (1.0, 1.0), (3.0, 6.0)]})
    assert load_plan(save_plan(plan, tmp_path / "p.json")) == plan
    assert plan.fp8_scales(3, 448.0) == (3.0 / 448.0, 6.0 / 448.0)


def test_missing_file_names_path(tmp_path):
    with pytest.raises(PlanError, match="nope.json: plan file not found"):
        load_plan(tmp_path / "nope.json")


def test_bad_json_names_position(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text('{"format_version": 1,')
    with pytest.raises(PlanError, match=r"bad.json: invalid JSON at line 1"):
        load_plan(path)


@pytest.mark.parametrize(
    ("mutate", "field"),
    [
        (lambda d: d.update(format_version=2), "format_version"),
        (lambda d: d["rules"][1][0].update(beta=1.5), "rules.1.0.beta"),
        (lambda d: d["rules"].pop(), "rules"),
        (lambda d: d["rules"][0].append(d["rules"][0][0]), "rules[0] has 3 KV heads"),
        (lambda d: d.update(sink_tokens=-1), "sink_tokens"),
        (lambda d: d.update(min_span=10, sink_tokens=64), "min_span"),
        (lambda d: d["model"].update(num_kv_heads=4), "num_query_heads"),
        (lambda d: d.update(surprise=1), "surprise"),
        (lambda d: d.pop("metadata"), "metadata"),
        (lambda d: d.update(kv_amax=[[1.0, 2.0]] * 3), "kv_amax has 3 layers"),
        (lambda d: d.update(kv_amax=[[1.0, 2.0]] * 3 + [[0.0, 1.0]]), "kv_amax[3]"),
        (lambda d: d.update(kv_amax=[[1.0, 2.0]] * 3 + [[float("nan"), 1.0]]), "kv_amax[3]"),
    ],
)
def test_schema_errors_name_the_field(mutate, field):
    data = good_plan_dict()
    mutate(data)
    with pytest.raises(PlanError) as e:
        parse_plan(json.dumps(data), "p.json")
    assert str(e.value).startswith("p.json: ")
    assert field in str(e.value)


def test_reference_format_is_pointed_to_importer():
    with pytest.raises(PlanError, match="import-reference"):
        parse_plan(json.dumps({"alphas": [[0]], "betas": [[0.5]]}), "ref.json")


def test_plan_must_fit_model():
    plan = dense_plan(FP)
    other = FP.model_copy(update={"num_layers": 30, "head_dim": 64})
    with pytest.raises(PlanError, match=r"p.json: .*num_layers is 4 but the model has 30.*head_dim is 16"):
        check_plan_fits(plan, other, "p.json")
    check_plan_fits(plan, FP, "p.json")  # fits: no error


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=5),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=10,
)


@settings(max_examples=200, deadline=None)
@given(
    path=st.lists(
        st.sampled_from(["model", "rules", 0, 1, "alpha", "beta", "sink_tokens", "metadata"]), min_size=1, max_size=4
    ),
    value=json_values,
)
def test_fuzzed_plans_raise_plan_error_or_load(path, value):
    """Any mutation either still validates or gives a PlanError naming the source; never another exception."""
    data = good_plan_dict()
    node = data
    for key in path[:-1]:
        try:
            node = node[key]
        except (KeyError, IndexError, TypeError):
            return
    try:
        node[path[-1]] = value
    except (IndexError, TypeError):
        return
    try:
        parse_plan(json.dumps(data), "fuzz.json")
    except PlanError as e:
        assert str(e).startswith("fuzz.json: ")


@settings(max_examples=100, deadline=None)
@given(st.text(max_size=200))
def test_fuzzed_text_never_crashes(text):
    try:
        parse_plan(text, "t.json")
    except PlanError as e:
        assert str(e).startswith("t.json: ")


def test_context_length_stretches_only_for_rope_types_that_stretch():
    from moa_vllm.plan.fingerprint import context_length

    assert context_length({"max_position_embeddings": 4096, "rope_scaling": {"type": "linear", "factor": 4.0}}) == 16384
    llama3 = {"rope_type": "llama3", "factor": 32.0, "original_max_position_embeddings": 8192}
    assert context_length({"max_position_embeddings": 131072, "rope_scaling": llama3}) == 131072
    assert context_length({"max_position_embeddings": 8192, "rope_scaling": None}) == 8192
    assert context_length({"text_config": {"max_position_embeddings": 2048}}) == 2048
    assert context_length({}) is None
