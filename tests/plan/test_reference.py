import json

import pytest

from moa_vllm.plan import ModelFingerprint, PlanError, import_reference, import_reference_file
from moa_vllm.plan.reference import ReferencePlan, reference_tokens

FP = ModelFingerprint(architecture="LlamaForCausalLM", num_layers=2, num_query_heads=4, num_kv_heads=2, head_dim=8)


def ref_data():
    return {
        "alphas": [[0, 1024, -1024, 0], [2048, 2048, 0, 0]],
        "betas": [[0.5, 0.0, 0.75, 0.25], [0.0, 0.125, 1.0, 0.5]],
    }


def test_envelope_per_kv_head():
    plan, _ = import_reference(ref_data(), FP)
    rules = [[(r.alpha, r.beta) for r in layer] for layer in plan.rules]
    assert rules == [[(1024, 0.5), (0, 0.75)], [(2048, 0.125), (0, 1.0)]]
    assert (plan.sink_tokens, plan.min_span) == (64, 128)


def test_envelope_covers_every_query_head():
    data = ref_data()
    plan, _ = import_reference(data, FP)
    for n in (500, 2048, 8192):
        spans = plan.spans(n)
        for layer in range(2):
            for q in range(4):
                ref_rule = ReferencePlan(data["alphas"], data["betas"])
                single = reference_tokens(
                    ReferencePlan([[ref_rule.alphas[layer][q]]], [[ref_rule.betas[layer][q]]]), n, plan.min_span
                )
                assert spans[layer][q // 2] >= single


def test_widening_report():
    _, report = import_reference(ref_data(), FP)
    for row in report["lengths"]:
        assert row["imported_density"] >= row["reference_density"]
        assert row["widening"] >= 1.0


def test_shape_errors(tmp_path):
    bad = ref_data()
    bad["betas"][1] = [0.5]
    path = tmp_path / "ref.json"
    path.write_text(json.dumps(bad))
    with pytest.raises(PlanError, match=r"ref.json: field 'betas\[1\]' must have 4 query-head values"):
        import_reference_file(path, FP)
    with pytest.raises(PlanError, match="alphas"):
        import_reference({"betas": []}, FP)


def test_provenance_is_recorded_with_the_files_sha256(tmp_path):
    import hashlib

    ref = tmp_path / "moa_alpha_beta.json"
    ref.write_text(json.dumps(ref_data()))
    source = tmp_path / "source.json"
    source.write_text(
        json.dumps({"repository": "github.com/o/r", "commit": "abc123", "path": "x/y.json", "licence": "MIT"})
    )
    plan, _ = import_reference_file(ref, FP, (4096,), source)
    recorded = plan.metadata.extra["source"]
    assert recorded["sha256"] == hashlib.sha256(ref.read_bytes()).hexdigest() and recorded["commit"] == "abc123"
    assert "github.com/o/r x/y.json" in plan.metadata.notes
    assert [row["length"] for row in plan.metadata.extra["widening"]["lengths"]] == [4096]
    source.write_text(json.dumps({"repository": "github.com/o/r", "commit": "", "path": "x"}))
    with pytest.raises(PlanError, match="source.json: provenance needs non-empty string fields commit, licence"):
        import_reference_file(ref, FP, (4096,), source)


def test_report_lengths_stay_within_the_models_context():
    from moa_vllm.plan.reference import report_lengths

    assert report_lengths(131072) == (8192, 32768, 131072)
    assert report_lengths(262144) == (8192, 32768, 131072)
    assert report_lengths(16384) == (8192, 16384)
    assert report_lengths(None) == (8192, 32768, 131072)
