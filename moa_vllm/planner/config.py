"""What one `moa-plan` run is configured with (the CLI's flags, one field each), and the checks that need no model."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from moa_vllm.planner.rules import DEFAULT_NUM_BETAS, RuleGrid


@dataclass(frozen=True)
class PlannerConfig:
    model: Path
    work_dir: Path
    lengths: tuple[int, ...] = (1024, 2048, 4096)  # profiled lengths: one objective each
    validation_length: int = 3072  # held out: Pareto plans are chosen by their true loss here (never profiled)
    validation_samples: int = 4
    extension_lengths: tuple[int, ...] = (8192,)  # density-constrained, not profiled
    samples_per_length: int = 4
    # level -> how many of its calibration samples to profile (default: all); profiling cost grows with L^2
    profile_samples: dict[int, int] = field(default_factory=dict)
    max_new_tokens: int = 96  # the dense model's answers: long answers give late layers gradient too
    answer_attempts: int = 3  # redraws of a sample whose dense answer misses its target; then the slot is dropped
    check_answers: bool = True
    context_weight: float = 1.0  # loss = mean answer CE + context_weight * mean context CE
    seed: int = 0
    device: str = "cpu"
    sinks: int = 64
    min_span: int = 128
    block: int = 64
    alphas: tuple[float, ...] | None = None  # None: scaled to the profiled lengths (RuleGrid.scaled)
    alpha_step: int | None = None  # of the scaled grid; default shortest length / 2
    num_betas: int = DEFAULT_NUM_BETAS
    rule_filter: bool = True  # drop rules with span <= 0 at the shortest or > N at the longest profiled length
    min_head_density: float = 0.0  # drop rules below this density at any constraint length (a per-head floor)
    ship_gate: bool = True  # refuse a plan whose held-out true loss is above the uniform plan's
    layer_correction: Path | None = None  # a diagnose.json: rescale rule losses per layer by its measured ratios
    # Extra candidate sets: loss = influence + w x retrieval loss (scaled to the influence's total), one Pareto set
    # per w, beside the influence-only set (w = 0, always a candidate). The held-out true loss picks among all.
    retrieval_weights: tuple[float, ...] = (1.0,)
    # Hybrid candidates (hybrid.py): the K heads of most retrieval mass at full span, the rest at one window.
    hybrid_heads: tuple[int, ...] = (2, 4, 8, 12)
    # Held-out fidelity (fidelity.py) of every candidate and uniform: texts x length tokens; 0 texts = not measured
    fidelity_texts: int = 2
    fidelity_length: int = 2048
    max_rules_per_layer: int = 2
    time_limit_s: float = 60.0
    epsilon_points: int = 5
    progress: bool = True

    def __post_init__(self) -> None:
        if self.validation_length in self.lengths:
            raise ValueError(f"validation length {self.validation_length} must not be a profiled length")
        if len(set(self.lengths)) != len(self.lengths) or not self.lengths:
            raise ValueError(f"profiled lengths must be distinct and non-empty, got {self.lengths}")
        if any(w <= 0 for w in self.retrieval_weights) or len(set(self.retrieval_weights)) != len(
            self.retrieval_weights
        ):
            raise ValueError(
                f"retrieval weights must be distinct and > 0 (0 is always a candidate), got {self.retrieval_weights}"
            )
        if any(k < 1 for k in self.hybrid_heads) or len(set(self.hybrid_heads)) != len(self.hybrid_heads):
            raise ValueError(f"hybrid head counts must be distinct and >= 1, got {self.hybrid_heads}")
        if self.fidelity_texts < 0 or self.fidelity_length < 2:
            got = f"{self.fidelity_texts}, {self.fidelity_length}"
            raise ValueError(f"need fidelity_texts >= 0 and fidelity_length >= 2, got {got}")

    @property
    def levels(self) -> list[int]:
        return sorted({*self.lengths, self.validation_length})

    @property
    def grid(self) -> RuleGrid:
        filters: dict[str, Any] = {}
        if self.min_head_density > 0:
            filters = {"min_density": self.min_head_density, "min_density_lengths": self.constraint_lengths}
        if self.alphas is None:
            return RuleGrid.scaled(self.lengths, self.num_betas, self.alpha_step, **filters)
        valid = (min(self.lengths), max(self.lengths)) if self.rule_filter else None
        return RuleGrid.evenly(self.alphas, self.num_betas, valid_between=valid, **filters)

    @property
    def constraint_lengths(self) -> tuple[int, ...]:
        return tuple(sorted({*self.lengths, *self.extension_lengths}))
