"""What `moa-vllm plan show` prints: a plan's density table over request lengths and a per-layer picture of its
spans at one length (one character per KV head, its span as a share of the request)."""

from __future__ import annotations

from moa_vllm.plan.schema import Plan

SHADES = " ▁▂▃▄▅▆▇█"  # span / N in eighths (index 0 unused: every head keeps its sinks and a window)


def shade(span: int, n: int) -> str:
    """One character for a span of n: the nearest eighth, but never blank (every head keeps its sinks + window)."""
    eighths = round(8 * min(span, n) / n)
    return SHADES[max(eighths, 1)]


def density_table(plan: Plan, lengths: list[int]) -> list[str]:
    rows = ["| N | density | KV tokens / request | smallest span | largest span |", "|---|---|---|---|---|"]
    for n in lengths:
        flat = [s for layer in plan.spans(n) for s in layer]
        rows.append(f"| {n} | {plan.density(n):.3f} | {plan.kv_tokens(n)} | {min(flat)} | {max(flat)} |")
    return rows


def span_picture(plan: Plan, n: int) -> list[str]:
    """A row per layer: its KV heads' spans at length n as shades, then the layer's density."""
    spans = plan.spans(n)
    width = len(str(plan.model.num_layers - 1))
    head = f"spans at N={n} ({' '.join(SHADES[1:])} = 1/8 .. 8/8 of N), one column per KV head"
    rows = [head]
    for layer, row in enumerate(spans):
        pic = "".join(shade(s, n) for s in row)
        rows.append(f"L{layer:<{width}} {pic}  {sum(row) / (n * len(row)):.2f}")
    return rows


def describe(plan: Plan, source: str, lengths: list[int], picture_at: int | None) -> list[str]:
    m = plan.model
    out = [
        f"{source}: {plan.metadata.method}, {m.architecture}, {m.num_layers} layers x {m.num_kv_heads} KV heads "
        f"({m.num_query_heads} query heads, head dim {m.head_dim}), {plan.sink_tokens} sinks, min span {plan.min_span}"
    ]
    origin = plan.metadata.extra.get("source")
    if isinstance(origin, dict):
        out.append(f"source: {origin.get('repository')} {origin.get('path')} @ {origin.get('commit')} "
                   f"({origin.get('licence')})")  # fmt: skip
    out += density_table(plan, lengths)
    if picture_at is not None:
        out += ["", *span_picture(plan, picture_at)]
    return out
