"""Candidate elastic rules (alpha, beta) the planner chooses from, and their KV token counts per length."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator

from moa_vllm.plan.schema import Rule
from moa_vllm.plan.span import span_tokens

DEFAULT_ALPHAS = (-1024.0, 0.0, 1024.0, 2048.0, 3072.0)  # as in the MoA reference search space
DEFAULT_NUM_BETAS = 9


def even_betas(count: int) -> tuple[float, ...]:
    """`count` betas evenly spaced over [0, 1], both ends included."""
    if count < 1:
        raise ValueError(f"need at least one beta, got {count}")
    if count == 1:
        return (1.0,)
    return tuple(i / (count - 1) for i in range(count))


class RuleGrid(BaseModel):
    """The cross product alphas x betas; rule index r = alpha_index * len(betas) + beta_index."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    alphas: tuple[float, ...] = Field(default=DEFAULT_ALPHAS, min_length=1)
    betas: tuple[float, ...] = Field(default_factory=lambda: even_betas(DEFAULT_NUM_BETAS), min_length=1)

    @field_validator("alphas")
    @classmethod
    def _alphas_ok(cls, v: tuple[float, ...]) -> tuple[float, ...]:
        if not all(math.isfinite(a) for a in v):
            raise ValueError("alphas must be finite")
        return _unique(v, "alphas")

    @field_validator("betas")
    @classmethod
    def _betas_ok(cls, v: tuple[float, ...]) -> tuple[float, ...]:
        if not all(0.0 <= b <= 1.0 for b in v):  # also rejects NaN
            raise ValueError("betas must lie in [0, 1]")
        return _unique(v, "betas")

    @classmethod
    def evenly(cls, alphas: Sequence[float] = DEFAULT_ALPHAS, num_betas: int = DEFAULT_NUM_BETAS) -> RuleGrid:
        return cls(alphas=tuple(alphas), betas=even_betas(num_betas))

    @property
    def rules(self) -> list[Rule]:
        return [Rule(alpha=a, beta=b) for a in self.alphas for b in self.betas]

    def __len__(self) -> int:
        return len(self.alphas) * len(self.betas)

    def rule(self, index: int) -> Rule:
        a, b = divmod(index, len(self.betas))
        return Rule(alpha=self.alphas[a], beta=self.betas[b])


def _unique(values: tuple[float, ...], name: str) -> tuple[float, ...]:
    if len(set(values)) != len(values):
        raise ValueError(f"{name} must not repeat values")
    return values


def kv_tokens(rule: Rule, n: int, min_span: int) -> int:
    """Tokens one head with `rule` keeps for a request of length n."""
    return span_tokens(rule.alpha, rule.beta, n, min_span)


def token_matrix(grid: RuleGrid, lengths: Sequence[int], min_span: int) -> np.ndarray:
    """int64 [len(lengths), len(grid)]: tokens kept per head by each rule at each length."""
    rules = grid.rules
    return np.array([[kv_tokens(r, n, min_span) for r in rules] for n in lengths], dtype=np.int64).reshape(
        len(lengths), len(rules)
    )
