"""Far-context caches: only tokens outside the window count, against a brute-force reading of the definitions."""

from __future__ import annotations

import math

import pytest
import torch

from moa_vllm.bst.lm_cache import far_cache, interpolated_nll


def brute_force(tokens: list[int], window: int, p: int) -> tuple[float | None, float | None]:
    """(unigram, copy) share of target tokens[p + 1] at position p, None where the cache has nothing."""
    target, far = tokens[p + 1], p - window
    unigram = None if far < 0 else sum(tokens[j] == target for j in range(far + 1)) / (far + 1)
    starts = [j for j in range(far) if tokens[j] == tokens[p]]  # successor j + 1 <= far
    copy = None if not starts else sum(tokens[j + 1] == target for j in starts) / len(starts)
    return unigram, copy


@pytest.mark.parametrize("window", [1, 3, 8])
def test_far_cache_matches_brute_force(window: int) -> None:
    ids = torch.randint(0, 5, (60,), generator=torch.Generator().manual_seed(window))
    cache = far_cache(ids, window)
    tokens = ids.tolist()
    for p in range(len(tokens) - 1):
        unigram, copy = brute_force(tokens, window, p)
        assert bool(cache.has_unigram[p]) == (unigram is not None)
        assert bool(cache.has_copy[p]) == (copy is not None)
        assert cache.unigram[p].item() == pytest.approx(unigram or 0.0)
        assert cache.copy[p].item() == pytest.approx(copy or 0.0)


def test_tokens_inside_the_window_never_reach_the_cache() -> None:
    # "7 8" repeats only inside a window of 4: at the second 7 the copy cache must not know that 8 follows.
    ids = torch.tensor([1, 2, 7, 8, 7, 8])
    cache = far_cache(ids, window=4)
    assert not cache.has_copy[4]
    assert not cache.has_unigram[:4].any() and cache.has_unigram[4]
    wide = far_cache(ids, window=1)
    assert wide.has_copy[4] and wide.copy[4].item() == 1.0


def test_interpolation_leaves_positions_without_a_cache_alone() -> None:
    p_model = torch.tensor([0.5, 0.25], dtype=torch.float64)
    p_cache = torch.tensor([1.0, 1.0], dtype=torch.float64)
    nll = interpolated_nll(p_model, p_cache, torch.tensor([True, False]), lam=0.5)
    assert nll[0].item() == pytest.approx(-math.log(0.75))
    assert nll[1].item() == pytest.approx(-math.log(0.25))
    with pytest.raises(ValueError, match="interpolation weight"):
        interpolated_nll(p_model, p_cache, torch.tensor([True, True]), lam=1.0)
    with pytest.raises(ValueError, match="window"):
        far_cache(torch.tensor([1, 2]), window=0)
