"""Plans used by the engine tests, beside the shipped ones."""

from __future__ import annotations

from moa_vllm.plan import ModelFingerprint, Plan, PlanMetadata, Rule

ALPHAS = (16, 48, 96)
BETAS = (0.0, 0.1, 0.3, 0.6)


def heterogeneous_plan(fp: ModelFingerprint) -> Plan:
    """Different rules across layers and KV heads (spans from tens to hundreds of tokens at N ~ 1k)."""
    rules = [
        [Rule(alpha=ALPHAS[(layer + h) % 3], beta=BETAS[(3 * layer + h) % 4]) for h in range(fp.num_kv_heads)]
        for layer in range(fp.num_layers)
    ]
    meta = PlanMetadata(method="hand-made", tool_version="test")
    return Plan(model=fp, sink_tokens=8, min_span=24, rules=rules, metadata=meta)
