"""The headroom benchmark's statistics: per-document bucket means, the paired bootstrap, the cache gains."""

from __future__ import annotations

import pytest
import torch

from benchmarks.bst_lm_headroom import LAMBDAS, bootstrap_gap, bucket_means, cache_gains
from moa_vllm.bst.lm_cache import far_cache

EDGES = (0, 4, 8)


def test_bucket_means_average_each_document_over_its_context_bucket() -> None:
    nll = torch.arange(16, dtype=torch.float64).reshape(2, 8)[:, :7]  # 2 documents of 8 tokens
    # column p has context p + 1: bucket (0, 4] is columns 0-3, (4, 8] columns 4-6
    assert bucket_means(nll, EDGES).tolist() == [[1.5, 5.0], [9.5, 13.0]]


def test_bootstrap_interval_brackets_the_mean_and_excludes_zero_only_for_a_consistent_gap() -> None:
    base = torch.tensor([[1.0, 1.0]] * 6, dtype=torch.float64)
    bst = base - torch.tensor([[0.1, 0.3], [0.1, -0.3]] * 3, dtype=torch.float64)  # bucket 2: half up, half down
    gap = bootstrap_gap(base, bst)
    assert gap["mean"] == pytest.approx([0.1, 0.0])
    assert gap["low"][0] == pytest.approx(0.1) and gap["high"][0] == pytest.approx(0.1)
    assert gap["low"][1] < 0 < gap["high"][1]
    assert gap["documents_bst_better"] == [6, 3]


def test_a_copy_cache_helps_a_model_that_ignores_a_repeated_document() -> None:
    # the second half repeats the first beyond a window of 4: the copy cache knows every next token there
    half = torch.tensor([5, 1, 7, 2, 9, 3, 6, 4])
    ids = torch.cat([half, half])
    caches = [far_cache(ids, window=4)]
    nll = torch.full((1, ids.numel() - 1), 2.0, dtype=torch.float64)  # a model at p = e^-2 everywhere
    gains = cache_gains(nll, caches, (0, 8, 15))
    assert gains["copy"]["gain_at_best"][0] == pytest.approx(0.0)  # nothing beyond the window repeats yet
    assert gains["copy"]["gain_at_best"][1] > 1.0
    assert gains["copy"]["best_lambda"] == max(LAMBDAS)  # an always-right cache: the more weight the better
    assert gains["copy"]["positions_with_cache"] == pytest.approx([0.0, 1.0])
