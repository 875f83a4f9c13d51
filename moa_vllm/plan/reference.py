"""Import of reference MoA plans ({"alphas", "betas"} per query head of an MHA-expanded model) into plan v1.

With GQA the cache is per KV head, so each KV head gets one rule covering its whole query group: the envelope
(max alpha, max beta) of the group's rules. It is at least as wide as every member rule at every length, so no
query head loses tokens; the price is a wider budget, reported by `widening_report`.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from moa_vllm.plan.errors import PlanError
from moa_vllm.plan.schema import ModelFingerprint, Plan, PlanMetadata, Rule
from moa_vllm.plan.span import span_tokens
from moa_vllm.version import __version__

REFERENCE_SINKS = 64
REFERENCE_MIN_SPAN = 128
REPORT_LENGTHS = (2048, 4096, 8192)
SHIPPED_LENGTHS = (8192, 32768, 131072)  # the density table of a shipped reference plan (within its context)
PROVENANCE_FIELDS = ("repository", "commit", "path", "licence")


@dataclass(frozen=True)
class Provenance:
    """Where a published reference plan came from: the plan's metadata records it with the file's sha256."""

    repository: str  # e.g. github.com/thu-nics/MoA
    commit: str
    path: str  # inside the repository
    licence: str
    sha256: str = ""  # of the reference file as read

    def to_json(self) -> dict[str, str]:
        return asdict(self)


def load_provenance(path: str | Path, reference_bytes: bytes) -> Provenance:
    """A provenance file ({repository, commit, path, licence}) for a reference file whose bytes are given."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError as e:
        raise PlanError(f"{path}: provenance file not found") from e
    except json.JSONDecodeError as e:
        raise PlanError(f"{path}: invalid JSON at line {e.lineno} column {e.colno}: {e.msg}") from e
    missing = [f for f in PROVENANCE_FIELDS if not isinstance(data.get(f), str) or not data[f]]
    if missing:
        raise PlanError(f"{path}: provenance needs non-empty string fields {', '.join(missing)}")
    return Provenance(**{f: data[f] for f in PROVENANCE_FIELDS}, sha256=hashlib.sha256(reference_bytes).hexdigest())


@dataclass(frozen=True)
class ReferencePlan:
    alphas: list[list[float]]  # [layer][query_head]
    betas: list[list[float]]


def parse_reference(data: Any, model: ModelFingerprint, source: str) -> ReferencePlan:
    if not isinstance(data, dict) or not {"alphas", "betas"} <= data.keys():
        raise PlanError(f"{source}: a reference MoA plan is a JSON object with 'alphas' and 'betas'")
    for key in ("alphas", "betas"):
        rows = data[key]
        if not isinstance(rows, list) or len(rows) != model.num_layers:
            raise PlanError(f"{source}: field '{key}' must have {model.num_layers} layers (one list per layer)")
        for i, row in enumerate(rows):
            if not isinstance(row, list) or len(row) != model.num_query_heads:
                raise PlanError(f"{source}: field '{key}[{i}]' must have {model.num_query_heads} query-head values")
            if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in row):
                raise PlanError(f"{source}: field '{key}[{i}]' must hold numbers")
    return ReferencePlan(alphas=data["alphas"], betas=data["betas"])


def _envelope(ref: ReferencePlan, layer: int, kv_head: int, group: int) -> Rule:
    heads = range(kv_head * group, (kv_head + 1) * group)
    return Rule(alpha=max(ref.alphas[layer][h] for h in heads), beta=max(ref.betas[layer][h] for h in heads))


def reference_tokens(ref: ReferencePlan, n: int, min_span: int) -> int:
    """Tokens the reference plan keeps per request of length n, summed over query heads."""
    return sum(
        span_tokens(a, b, n, min_span) for row_a, row_b in zip(ref.alphas, ref.betas) for a, b in zip(row_a, row_b)
    )


def widening_report(ref: ReferencePlan, plan: Plan, lengths: tuple[int, ...] = REPORT_LENGTHS) -> dict[str, Any]:
    """Density of the per-query-head reference vs the per-KV-head import, at a few lengths."""
    heads_q = plan.model.num_layers * plan.model.num_query_heads
    rows = []
    for n in lengths:
        ref_density = reference_tokens(ref, n, plan.min_span) / (n * heads_q)
        rows.append(
            {
                "length": n,
                "reference_density": round(ref_density, 4),
                "imported_density": round(plan.density(n), 4),
                "widening": round(plan.density(n) / ref_density, 4) if ref_density else None,
            }
        )
    return {"lengths": rows}


def report_lengths(max_context: int | None) -> tuple[int, ...]:
    """SHIPPED_LENGTHS within the model's context, plus the context itself when it is shorter than the last."""
    if max_context is None:
        return SHIPPED_LENGTHS
    inside = tuple(n for n in SHIPPED_LENGTHS if n <= max_context)
    return inside + ((max_context,) if max_context < SHIPPED_LENGTHS[-1] else ())


def import_reference(
    data: Any,
    model: ModelFingerprint,
    source: str = "<reference plan>",
    lengths: tuple[int, ...] = REPORT_LENGTHS,
    provenance: Provenance | None = None,
) -> tuple[Plan, dict]:
    ref = parse_reference(data, model, source)
    group = model.group_size
    rules = [[_envelope(ref, layer, h, group) for h in range(model.num_kv_heads)] for layer in range(model.num_layers)]
    meta = PlanMetadata(
        method="reference-import",
        tool_version=__version__,
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        notes=f"imported from {source}; per KV head = envelope (max alpha, max beta) of its query group",
    )
    plan = Plan(model=model, sink_tokens=REFERENCE_SINKS, min_span=REFERENCE_MIN_SPAN, rules=rules, metadata=meta)
    report = widening_report(ref, plan, lengths)
    extra: dict[str, Any] = {"widening": report}
    if provenance is not None:
        extra["source"] = provenance.to_json()
        meta = meta.model_copy(update={"notes": meta.notes.replace(f"from {source}", f"from {_cite(provenance)}")})
    plan = plan.model_copy(update={"metadata": meta.model_copy(update={"extra": extra})})
    return plan, report


def _cite(p: Provenance) -> str:
    return f"{p.repository} {p.path} at {p.commit[:12]} ({p.licence})"


def import_reference_file(
    path: str | Path,
    model: ModelFingerprint,
    lengths: tuple[int, ...] = REPORT_LENGTHS,
    provenance: str | Path | None = None,
) -> tuple[Plan, dict]:
    """Import a reference file; `provenance` names its provenance file (recorded with the file's sha256)."""
    path = Path(path)
    try:
        raw = path.read_bytes()
        data = json.loads(raw)
    except FileNotFoundError as e:
        raise PlanError(f"{path}: reference plan file not found") from e
    except json.JSONDecodeError as e:
        raise PlanError(f"{path}: invalid JSON at line {e.lineno} column {e.colno}: {e.msg}") from e
    source = load_provenance(provenance, raw) if provenance is not None else None
    return import_reference(data, model, str(path), lengths, source)
