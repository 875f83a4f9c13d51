"""What one `moa-plan` run is configured with, and the checks that need no model.

Each field is one CLI flag (moa_vllm/planner/cli.py generates the parser from these fields): its default and help
text live here only. `flag` names a flag that is not the field's name; a bool whose default is True is turned off
by `--no-<name>` unless it names its own flag, and its help says what that flag does."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from moa_vllm.planner.rules import DEFAULT_NUM_BETAS, RuleGrid
from moa_vllm.planner.tasks import TASKS

# The chain's steps (moa_vllm/planner/chain.py) and CLI subcommands; "run" = validate + export.
STEPS = ("calibrate", "profile", "optimize", "validate", "run", "diagnose")


def option(default: Any, help: str, flag: str | None = None) -> Any:
    """A config field with its CLI help (and flag name, when it is not --<field-name>)."""
    metadata = {"help": help, "flag": flag}
    if isinstance(default, dict):
        return field(default_factory=lambda: dict(default), metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass(frozen=True)
class PlannerConfig:
    model: Path = field(metadata={"help": "HF model folder (llama/qwen2/mistral family) or 'embedded'"})
    work_dir: Path = field(metadata={"help": "where artefacts go (keep it out of git)"})
    lengths: tuple[int, ...] = option((1024, 2048, 4096), "profiled lengths (one objective each), e.g. '1024 2048'")
    validation_length: int = option(
        3072, "held-out length whose true loss picks the plan (never profiled; not one of --lengths)"
    )
    validation_samples: int = option(4, "held-out samples at the validation length")
    extension_lengths: tuple[int, ...] = option((8192,), "density-constrained lengths, not profiled")
    samples_per_length: int = option(4, "calibration samples per profiled length")
    profile_samples: dict[int, int] = option(
        {},
        "profile only the first N calibration samples of some levels, e.g. '3072=2 4096=2' (default: all; "
        "profiling cost grows with L^2)",
    )
    max_new_tokens: int = option(
        96, "length of the dense model's greedy answers (long answers give late layers gradient too)"
    )
    answer_attempts: int = option(
        3, "redraws of a sample whose dense answer misses its target; then the slot is dropped"
    )
    tasks: tuple[str, ...] = option(
        TASKS,
        "calibration task kinds, round-robin over each length's samples in this order: prose-number prose-name "
        "prose-setting two-hop (facts in natural text, asked for by label) and passkey facts recall (a target in "
        "filler)",
    )
    check_answers: bool = option(True, "keep samples whose dense answer is wrong", flag="--keep-wrong-answers")
    context_weight: float = option(1.0, "loss = mean answer CE + this x mean context CE")
    seed: int = option(0, "seed of the calibration samples, the held-out texts and the solver")
    device: str = option("cpu", "torch device: cpu, cuda, cuda:1, ...")
    sinks: int = option(64, "sink tokens every head keeps")
    min_span: int = option(128, "smallest span a rule may give")
    block: int = option(64, "block size of the profile's block sums")
    alphas: tuple[float, ...] | None = option(
        None, "rule grid alphas, e.g. '-1024 0 1024' (default: -shortest .. longest profiled length, --alpha-step)"
    )
    alpha_step: int | None = option(None, "step of the default alphas (default: shortest length / 2)")
    num_betas: int = option(DEFAULT_NUM_BETAS, "betas evenly spaced over [0, 1]")
    rule_filter: bool = option(
        True, "keep rules whose span is <= 0 at the shortest or > N at the longest profiled length"
    )
    min_head_density: float = option(0.0, "drop rules below this density at any constraint length (a per-head floor)")
    ship_gate: bool = option(
        True, "write the plan even when it loses to uniform on the held-out measures (experiments only)"
    )
    layer_correction: Path | None = option(
        None, "a diagnose.json: rescale each layer's rule losses by its measured true / predicted ratio"
    )
    retrieval_weights: tuple[float, ...] = option(
        (1.0,),
        "extra candidate sets with loss = influence + w x retrieval loss (scaled to the influence's total), one "
        "Pareto set per w, e.g. '0.25 1' ('' for none; the influence-only set is always a candidate)",
    )
    hybrid_heads: tuple[int, ...] = option(
        (4, 8, 12, 16, 24),
        "hybrid candidates: the K heads of most retrieval mass at full span, the rest at one window, for each K "
        "('' for none)",
    )
    max_candidates: int = option(
        4,
        "Pareto plans per candidate set that are validated: those of lowest predicted loss (0: all; every plan "
        "validated costs a masked forward over the held-out samples and the fidelity texts)",
    )
    fidelity_texts: int = option(
        2,
        "held-out natural texts on which every candidate's top-1 agreement and KL to dense are measured and "
        "must beat uniform's (0: task loss only)",
    )
    fidelity_length: int = option(2048, "tokens per held-out fidelity text")
    max_rules_per_layer: int = option(2, "distinct rules a layer may use")
    time_limit_s: float = option(60.0, "seconds per MILP solve", flag="--time-limit")
    epsilon_points: int = option(5, "epsilon-constraint points of the Pareto sweep")
    progress: bool = option(True, "hide progress bars")

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
        if self.max_candidates < 0:
            raise ValueError(f"max_candidates must be >= 0 (0: all), got {self.max_candidates}")
        if any(k < 1 for k in self.hybrid_heads) or len(set(self.hybrid_heads)) != len(self.hybrid_heads):
            raise ValueError(f"hybrid head counts must be distinct and >= 1, got {self.hybrid_heads}")
        if not self.tasks or set(self.tasks) - set(TASKS):
            raise ValueError(f"calibration tasks must be among {', '.join(TASKS)}, got {self.tasks}")
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
