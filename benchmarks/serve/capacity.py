"""How many requests of N tokens a pinned KV budget holds per configuration, and the concurrency sweep up to it."""

from __future__ import annotations

from moa_vllm.plan import load_hf_config, load_plan


def token_bytes(model_dir: str, dtype_bytes: int) -> tuple[int, int]:
    """(bytes of one token's K+V in one KV head of one layer, layers x KV heads) for the model."""
    config = load_hf_config(model_dir)
    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    heads = config.get("num_key_value_heads", config["num_attention_heads"])
    return 2 * head_dim * dtype_bytes, config["num_hidden_layers"] * heads


def request_bytes(plan: str | None, n: int, per_head_token: int, layer_heads: int, block: int) -> int:
    """Bytes one request of N tokens holds: dense rounds N up to whole blocks; a plan holds its spans (its rings
    are page aligned too: counted per (layer, KV head))."""
    if plan is None:
        return -(-n // block) * block * per_head_token * layer_heads
    spans = load_plan(plan).spans(n)
    return sum(-(-s // block) * block for layer in spans for s in layer) * per_head_token


def max_requests(budget: int, plan: str | None, n: int, per_head_token: int, layer_heads: int, block: int) -> int:
    return max(1, budget // request_bytes(plan, n, per_head_token, layer_heads, block))


def sweep(maximum: int, levels: list[int] | None = None) -> list[int]:
    """Concurrency levels: powers of two below the maximum, then the maximum itself (or the given levels, capped)."""
    if levels:
        return sorted({min(c, maximum) for c in levels})
    out, c = [], 1
    while c < maximum:
        out.append(c)
        c *= 2
    return [*out, maximum]
