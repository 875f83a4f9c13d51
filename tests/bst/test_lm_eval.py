"""Perplexity by position bucket: the per-position NLL is the model's own loss, buckets count context tokens."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from moa_vllm.bst.lm_eval import bucket_perplexity, position_nll
from tests.bst.helpers import tiny_model, token_ids


def test_position_nll_matches_cross_entropy_of_the_full_forward() -> None:
    model = tiny_model("sh")
    docs = list(token_ids(3, 40))
    nll = position_nll(model, docs)
    assert nll.shape == (3, 39) and nll.dtype == torch.float64
    for i, doc in enumerate(docs):
        logits = model(doc[None, :-1])[0]
        assert torch.allclose(nll[i], F.cross_entropy(logits, doc[1:], reduction="none"))
    with pytest.raises(ValueError, match="one length"):
        position_nll(model, [docs[0], docs[1][:30]])


def test_buckets_are_by_context_length_and_weighted_by_tokens() -> None:
    # Column p predicts token p+1 from p+1 tokens of context: NLL = p + 1 makes each bucket's mean checkable.
    nll = torch.arange(1, 8, dtype=torch.float64).repeat(2, 1)  # 2 docs of 8 tokens
    rows = bucket_perplexity(nll, edges=(0, 2, 4, 7))
    assert [(r["context_from"], r["context_to"], r["tokens"]) for r in rows] == [(0, 2, 4), (2, 4, 4), (4, 7, 6)]
    assert [r["nll"] for r in rows] == [1.5, 3.5, 6.0]
    assert rows[2]["ppl"] == pytest.approx(math.exp(6.0))
    with pytest.raises(ValueError, match="no position"):
        bucket_perplexity(nll, edges=(0, 7, 16))
