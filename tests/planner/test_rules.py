"""The rule grid: validation, indexing, and token counts that follow the one span definition."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from moa_vllm.plan.span import span_tokens
from moa_vllm.planner.rules import RuleGrid, even_betas, kv_tokens, token_matrix


def test_default_grid_is_the_reference_search_space() -> None:
    grid = RuleGrid()
    assert len(grid) == 45 == len(grid.rules)
    assert grid.alphas == (-1024.0, 0.0, 1024.0, 2048.0, 3072.0)
    assert grid.betas[0] == 0.0 and grid.betas[-1] == 1.0 and len(grid.betas) == 9


def test_rule_index_is_alpha_major() -> None:
    grid = RuleGrid(alphas=(0.0, 100.0), betas=(0.0, 0.5, 1.0))
    for index, rule in enumerate(grid.rules):
        assert grid.rule(index) == rule
    assert grid.rule(4).alpha == 100.0 and grid.rule(4).beta == 0.5


def test_even_betas() -> None:
    assert even_betas(1) == (1.0,)
    assert even_betas(5) == (0.0, 0.25, 0.5, 0.75, 1.0)
    with pytest.raises(ValueError):
        even_betas(0)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"alphas": (0.0, 0.0)},
        {"betas": (0.5, 0.5)},
        {"betas": (1.5,)},
        {"betas": (float("nan"),)},
        {"alphas": (float("inf"),)},
        {"alphas": ()},
    ],
)
def test_invalid_grids_are_rejected(kwargs: dict) -> None:
    with pytest.raises(ValidationError):
        RuleGrid(**kwargs)


def test_token_matrix_uses_span_tokens() -> None:
    grid = RuleGrid(alphas=(-1024.0, 0.0, 300.0), betas=(0.0, 0.3, 1.0))
    lengths, min_span = (100, 2048, 5000), 128
    matrix = token_matrix(grid, lengths, min_span)
    assert matrix.shape == (3, 9)
    for i, n in enumerate(lengths):
        for r, rule in enumerate(grid.rules):
            expected = span_tokens(rule.alpha, rule.beta, n, min_span)
            assert matrix[i, r] == expected == kv_tokens(rule, n, min_span)
    assert matrix[0].max() <= 100  # capped at N


def test_scaled_grid_drops_collapsed_and_oversized_rules_as_the_reference_does():
    grid = RuleGrid.scaled([1024, 2048])
    assert grid.alphas[0] == -1024 and grid.alphas[-1] == 2048 and grid.dropped > 0
    for rule in grid.rules:
        assert rule.alpha + rule.beta * 1024 > 0  # a real window at the shortest length
        assert rule.alpha + rule.beta * 2048 <= 2048  # never clamped at the longest
    # what survives keeps at least about N/8 at the profiled lengths
    assert min(r.span(1024, 1) for r in grid.rules) >= 1024 // 8
    assert min(r.span(2048, 1) for r in grid.rules) >= 2048 // 8
    kept = {(r.alpha, r.beta) for r in grid.rules}
    assert (0.0, 0.0) not in kept and (-1024.0, 0.5) not in kept and (0.0, 1.0) in kept and (2048.0, 0.0) in kept


def test_min_density_floor_and_an_empty_filter_is_refused():
    grid = RuleGrid.evenly((0.0, 512.0), 5, min_density=0.25, min_density_lengths=(1024, 8192))
    assert all(r.alpha + r.beta * n >= 0.25 * n for r in grid.rules for n in (1024, 8192))
    assert grid.rule(0) == grid.rules[0] and len(grid) == len(grid.rules)
    with pytest.raises(ValueError, match="leave no rule"):
        RuleGrid(alphas=(-4096.0,), betas=(0.5,), valid_between=(1024, 2048))
