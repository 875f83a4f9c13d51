from collections import namedtuple

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from benchmarks.accuracy.fidelity import (
    TopK,
    compare,
    kl_topk,
    load_topks,
    save_topks,
    top1_agreement,
    topk_from_prompt_logprobs,
)

Logprob = namedtuple("Logprob", "logprob rank decoded_token")


def topk_of(logits: np.ndarray, k: int, targets: np.ndarray | None = None) -> TopK:
    """Top-k view of full distributions [positions, vocab], as vLLM would return them."""
    logp = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
    order = np.argsort(-logp, axis=1, kind="stable")[:, :k]
    targets = np.zeros(len(logits), dtype=int) if targets is None else targets
    return TopK(order, np.take_along_axis(logp, order, axis=1), logp[np.arange(len(logp)), targets])


def exact_kl(p_logits: np.ndarray, q_logits: np.ndarray) -> np.ndarray:
    lp = p_logits - np.log(np.exp(p_logits).sum(axis=1, keepdims=True))
    lq = q_logits - np.log(np.exp(q_logits).sum(axis=1, keepdims=True))
    return (np.exp(lp) * (lp - lq)).sum(axis=1)


logits = st.integers(1, 4).flatmap(
    lambda pos: st.integers(3, 12).flatmap(
        lambda vocab: st.tuples(
            *[
                st.lists(st.lists(st.floats(-6, 6), min_size=vocab, max_size=vocab), min_size=pos, max_size=pos)
                for _ in range(2)
            ]
        )
    )
)


@settings(max_examples=60, deadline=None)
@given(pair=logits)
def test_full_vocabulary_gives_the_exact_kl(pair):
    p, q = (np.array(x) for x in pair)
    vocab = p.shape[1]
    np.testing.assert_allclose(kl_topk(topk_of(p, vocab), topk_of(q, vocab)), exact_kl(p, q), atol=1e-9)


@settings(max_examples=60, deadline=None)
@given(pair=logits, k=st.integers(1, 3))
def test_top_k_kl_is_finite_and_non_negative(pair, k):
    p, q = (np.array(x) for x in pair)
    kl = kl_topk(topk_of(p, k), topk_of(q, k))
    assert np.all(np.isfinite(kl)) and np.all(kl >= -1e-9)


@settings(max_examples=60, deadline=None)
@given(pair=logits, k=st.integers(1, 3))
def test_top_k_kl_never_exceeds_the_exact_kl_when_the_plan_lists_every_dense_top_token(pair, k):
    p, q = (np.array(x) for x in pair)
    vocab = p.shape[1]
    # plan's list is its full distribution: no imputation, so this is the pure coarsening bound
    assert np.all(kl_topk(topk_of(p, k), topk_of(q, vocab)) <= exact_kl(p, q) + 1e-9)


def test_identical_predictions_agree_fully_with_zero_kl():
    p = np.random.default_rng(0).normal(size=(50, 30))
    a = topk_of(p, 5)
    assert top1_agreement(a, a).all()
    np.testing.assert_allclose(kl_topk(a, a), 0.0, atol=1e-12)


def test_disagreement_is_measured():
    p = np.array([[3.0, 0.0, 0.0, 0.0], [0.0, 3.0, 0.0, 0.0]])
    q = np.array([[3.0, 0.0, 0.0, 0.0], [3.0, 0.0, 0.0, 0.0]])
    assert top1_agreement(topk_of(p, 2), topk_of(q, 2)).tolist() == [True, False]
    kl = kl_topk(topk_of(p, 2), topk_of(q, 2))
    assert kl[0] == pytest.approx(0.0, abs=1e-12) and kl[1] > 1.0


def test_compare_splits_the_tail():
    rng = np.random.default_rng(1)
    p = rng.normal(size=(40, 20))
    q = p.copy()
    q[20:] = rng.normal(size=(20, 20))
    out = compare(topk_of(p, 20), topk_of(q, 20), tail_from=20)
    assert out["positions"] == 40
    assert out["tail_kl_mean"] == pytest.approx(2 * out["kl_mean"])
    assert out["tail_top1_agreement"] <= out["top1_agreement"]


def test_prompt_logprobs_conversion_skips_the_first_position_and_extra_target_entries():
    prompt = [5, 7, 9]
    entries = [
        None,
        {7: Logprob(-0.1, 1, "a"), 3: Logprob(-2.5, 2, "b")},
        {2: Logprob(-0.2, 1, "c"), 4: Logprob(-1.9, 2, "d"), 9: Logprob(-6.0, 40, "e")},  # target outside top-2
    ]
    t = topk_from_prompt_logprobs(entries, prompt, k=2)
    assert t.ids.tolist() == [[7, 3], [2, 4]]
    assert t.logprobs.tolist() == [[-0.1, -2.5], [-0.2, -1.9]]
    assert t.target_logprobs.tolist() == [-0.1, -6.0]
    with pytest.raises(ValueError, match="expected 3"):
        topk_from_prompt_logprobs(entries, prompt, k=3)


def test_saved_topks_load_back(tmp_path):
    a = topk_of(np.random.default_rng(2).normal(size=(6, 9)), 4)
    path = tmp_path / "x" / "ref.npz"
    save_topks(path, [a, a])
    b, _ = load_topks(path)
    np.testing.assert_array_equal(a.ids, b.ids)
    np.testing.assert_array_equal(a.logprobs, b.logprobs)
    np.testing.assert_array_equal(a.target_logprobs, b.target_logprobs)
