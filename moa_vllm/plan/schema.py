"""Plan format v1: one elastic rule (alpha, beta) per (layer, KV head) of one model, stored as JSON."""

from __future__ import annotations

import math
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from moa_vllm.plan.span import span_tokens, window_tokens

FORMAT_VERSION = 1


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelFingerprint(_Strict):
    """What a plan must agree with in the model it is used for."""

    architecture: str = Field(min_length=1)
    num_layers: int = Field(gt=0)
    num_query_heads: int = Field(gt=0)
    num_kv_heads: int = Field(gt=0)
    head_dim: int = Field(gt=0)

    @model_validator(mode="after")
    def _gqa_groups(self) -> ModelFingerprint:
        if self.num_query_heads % self.num_kv_heads:
            raise ValueError(
                f"num_query_heads ({self.num_query_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})"
            )
        return self

    @property
    def group_size(self) -> int:
        return self.num_query_heads // self.num_kv_heads


class Rule(_Strict):
    """span(N) = alpha + beta * N tokens (then clamped). beta >= 0 keeps spans monotone in N, which the KV cache
    sizing relies on (the widest span of any request is the one at max_model_len)."""

    alpha: float
    beta: float = Field(ge=0.0, le=1.0)

    @field_validator("alpha")
    @classmethod
    def _finite(cls, v: float) -> float:
        if not math.isfinite(v):
            raise ValueError("alpha must be finite")
        return v

    def span(self, n: int, min_span: int, cap: int | None = None) -> int:
        return span_tokens(self.alpha, self.beta, n, min_span, cap)


class PlanMetadata(_Strict):
    method: str = Field(min_length=1, description="how the plan was made: dense, uniform, reference-import, moa-plan")
    tool_version: str
    density_targets: list[float] = Field(default_factory=list)
    lengths_profiled: list[int] = Field(default_factory=list)
    created: str | None = None
    notes: str = ""
    extra: dict[str, Any] = Field(default_factory=dict)


class Plan(_Strict):
    format_version: Literal[1] = FORMAT_VERSION
    model: ModelFingerprint
    sink_tokens: int = Field(ge=0)
    min_span: int = Field(gt=0)
    rules: list[list[Rule]] = Field(description="[layer][kv_head]")
    metadata: PlanMetadata
    kv_amax: list[tuple[float, float]] | None = Field(
        default=None,
        description="[layer] (largest |K| after RoPE, largest |V|) on calibration text (`moa-vllm plan kv-range`): "
        "an fp8 KV cache without checkpoint scales stores value / (amax / the fp8 type's largest value)",
    )

    @model_validator(mode="after")
    def _shape(self) -> Plan:
        if len(self.rules) != self.model.num_layers:
            raise ValueError(f"rules has {len(self.rules)} layers, model.num_layers is {self.model.num_layers}")
        for i, layer in enumerate(self.rules):
            if len(layer) != self.model.num_kv_heads:
                raise ValueError(
                    f"rules[{i}] has {len(layer)} KV heads, model.num_kv_heads is {self.model.num_kv_heads}"
                )
        if self.kv_amax is not None:
            if len(self.kv_amax) != self.model.num_layers:
                raise ValueError(f"kv_amax has {len(self.kv_amax)} layers, model.num_layers is {self.model.num_layers}")
            bad = [i for i, pair in enumerate(self.kv_amax) if not all(math.isfinite(x) and x > 0 for x in pair)]
            if bad:
                raise ValueError(f"kv_amax[{bad[0]}] = {self.kv_amax[bad[0]]}: amax values must be finite and > 0")
        if self.min_span <= self.sink_tokens:
            raise ValueError(
                f"min_span ({self.min_span}) must exceed sink_tokens ({self.sink_tokens}) so every head keeps a "
                "recent window"
            )
        return self

    # ---- span math over the whole plan -------------------------------------------------------------------------
    def spans(self, n: int, cap: int | None = None) -> list[list[int]]:
        """Tokens kept per [layer][kv_head] for spans taken at length n, a request of `cap` tokens (None: n)."""
        return [[r.span(n, self.min_span, cap) for r in layer] for layer in self.rules]

    def windows(self, n: int, cap: int | None = None) -> list[list[int]]:
        return [[window_tokens(s, self.sink_tokens) for s in layer] for layer in self.spans(n, cap)]

    def layer_max_window(self, layer: int, n: int) -> int:
        return max(window_tokens(r.span(n, self.min_span), self.sink_tokens) for r in self.rules[layer])

    def kv_tokens(self, n: int) -> int:
        """KV tokens kept by one request of length n, summed over layers and KV heads."""
        return sum(sum(layer) for layer in self.spans(n))

    def density(self, n: int) -> float:
        """kv_tokens(n) relative to a dense cache of the same request."""
        return self.kv_tokens(n) / (n * self.model.num_layers * self.model.num_kv_heads)

    def fp8_scales(self, layer: int, fp8_max: float) -> tuple[float, float] | None:
        """(k_scale, v_scale) of a layer's fp8 cache from kv_amax: the calibration's largest |K| / |V| lands on the
        type's largest value; None without kv_amax (vLLM's default scale 1.0 then applies)."""
        if self.kv_amax is None:
            return None
        k, v = self.kv_amax[layer]
        return k / fp8_max, v / fp8_max

    def is_dense_at(self, n: int) -> bool:
        return all(s == n for layer in self.spans(n) for s in layer)
