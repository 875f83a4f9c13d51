"""`moa-vllm plan show`: the density table and the per-layer span picture."""

from __future__ import annotations

from moa_vllm.plan import ModelFingerprint, Plan, PlanMetadata, Rule, dense_plan, uniform_plan
from moa_vllm.plan.show import describe, shade, span_picture

FP = ModelFingerprint(architecture="LlamaForCausalLM", num_layers=3, num_query_heads=8, num_kv_heads=4, head_dim=64)


def test_a_shade_is_the_nearest_eighth_and_never_blank():
    assert shade(8192, 8192) == "█" and shade(4096, 8192) == "▄" and shade(1024, 8192) == "▁"
    assert shade(1, 8192) == "▁" and shade(9000, 8192) == "█"


def test_the_picture_has_a_row_per_layer_and_a_column_per_kv_head():
    rules = [[Rule(alpha=0, beta=1.0)] * 4, [Rule(alpha=0, beta=0.5)] * 4, [Rule(alpha=1024, beta=0.0)] * 4]
    plan = Plan(
        model=FP, sink_tokens=64, min_span=128, rules=rules, metadata=PlanMetadata(method="t", tool_version="0")
    )
    rows = span_picture(plan, 8192)
    assert len(rows) == 1 + 3
    assert rows[1].split()[1:] == ["████", "1.00"] and rows[2].split()[1:] == ["▄▄▄▄", "0.50"]
    assert rows[3].split()[1:] == ["▁▁▁▁", "0.12"]


def test_describe_prints_one_density_row_per_length():
    lines = describe(uniform_plan(FP, 0.25, 64, 128), "u.json", [2048, 8192], 8192)
    table = [line for line in lines if line.startswith("| 2048") or line.startswith("| 8192")]
    assert len(table) == 2 and "| 0.250 |" in table[1]
    assert describe(dense_plan(FP, 64, 128), "d.json", [4096], None)[-1].startswith("| 4096 | 1.000")
