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
