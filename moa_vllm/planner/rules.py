"""Candidate elastic rules (alpha, beta) the planner chooses from, and their KV token counts per length."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

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
    """The cross product alphas x betas, in alpha-major order, less the rules the filters drop; rule index r counts
    the kept rules in that order.

    Filters (both off by default):
    - valid_between = (shortest, longest) profiled length: as in the MoA reference, drop a rule whose raw span
      alpha + beta * N is <= 0 at the shortest length (it would collapse to min_span: a head with no real window)
      or > N at the longest (it would waste budget clamped at N). What survives has a floor of about N/8.
    - min_density at min_density_lengths: drop a rule whose span is below min_density * N at any of those lengths
      (a floor per head, hence per layer too).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    alphas: tuple[float, ...] = Field(default=DEFAULT_ALPHAS, min_length=1)
    betas: tuple[float, ...] = Field(default_factory=lambda: even_betas(DEFAULT_NUM_BETAS), min_length=1)
    valid_between: tuple[int, int] | None = None
    min_density: float = Field(default=0.0, ge=0.0, le=1.0)
    min_density_lengths: tuple[int, ...] = ()

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

    @model_validator(mode="after")
    def _something_left(self) -> RuleGrid:
        if self.valid_between is not None and not 0 < self.valid_between[0] <= self.valid_between[1]:
            raise ValueError(f"valid_between must be (shortest, longest) lengths, got {self.valid_between}")
        if not self.rules:
            raise ValueError(
                f"the rule filters leave no rule (valid_between {self.valid_between}, min_density "
                f"{self.min_density} at {self.min_density_lengths}); widen the grid"
            )
        return self

    @classmethod
    def evenly(
        cls, alphas: Sequence[float] = DEFAULT_ALPHAS, num_betas: int = DEFAULT_NUM_BETAS, **filters
    ) -> RuleGrid:
        return cls(alphas=tuple(alphas), betas=even_betas(num_betas), **filters)

    @classmethod
    def scaled(
        cls, lengths: Sequence[int], num_betas: int = DEFAULT_NUM_BETAS, alpha_step: int | None = None, **filters
    ) -> RuleGrid:
        """The reference's grid scaled to the profiled lengths: alphas from -shortest to longest in steps of
        alpha_step (default shortest / 2), betas evenly over [0, 1], invalid rules dropped (valid_between)."""
        lo, hi = min(lengths), max(lengths)
        step = alpha_step or max(lo // 2, 1)
        alphas = tuple(float(a) for a in range(-lo, hi + 1, step))
        return cls(alphas=alphas, betas=even_betas(num_betas), valid_between=(lo, hi), **filters)

    def _keeps(self, alpha: float, beta: float) -> bool:
        if self.valid_between is not None:
            lo, hi = self.valid_between
            if alpha + beta * lo <= 0 or alpha + beta * hi > hi:
                return False
        return all(alpha + beta * n >= self.min_density * n for n in self.min_density_lengths)

    @property
    def rules(self) -> list[Rule]:
        return [Rule(alpha=a, beta=b) for a in self.alphas for b in self.betas if self._keeps(a, b)]

    @property
    def dropped(self) -> int:
        """How many rules of the cross product the filters removed."""
        return len(self.alphas) * len(self.betas) - len(self.rules)

    def __len__(self) -> int:
        return len(self.rules)

    def rule(self, index: int) -> Rule:
        return self.rules[index]


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
