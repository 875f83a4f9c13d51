"""The span grid and the span signature of a cached prefix block."""

from __future__ import annotations

import numpy as np
import pytest

from moa_vllm.plan.prefix import SpanSignature, cacheable_blocks, request_spans, signature_for
from moa_vllm.plan.span import GRID_MULTIPLE, served_length, span_length


def test_grid_is_monotone_idempotent_and_close_above_n():
    prev = 0
    for n in range(1, 20000, 7):
        g = span_length(n, 16384, 8)
        assert g >= min(n, 16384) and g >= prev and span_length(g, 16384, 8) == g
        assert g == 16384 or g % GRID_MULTIPLE == 0
        assert g <= n * 2 ** (1 / 8) + GRID_MULTIPLE
        prev = g
    assert span_length(1000, 4096, 0) == 1000  # 0 steps: exact N
    assert span_length(5000, 4096, 8) == 4096  # capped by max_model_len
    assert served_length(300, 100, 4096, 8) == (span_length(400, 4096, 8), 400)


def test_one_step_per_octave_holds_spans_over_a_doubling():
    assert {span_length(n, 16384, 1) for n in range(2049, 4097, 13)} == {4096}
    assert span_length(2048, 16384, 1) == 2048 and span_length(4097, 16384, 1) == 8192


def test_hint_and_floor_raise_the_span_length_never_lower_it():
    assert span_length(1000, 8192, 1, hint=6000) == 8192  # raised, then on the grid
    assert span_length(1000, 8192, 0, hint=6000) == 6000
    assert span_length(5000, 8192, 0, hint=100) == 5000  # a hint below N changes nothing
    assert span_length(1000, 8192, 0, floor=3000) == 3000
    assert span_length(1000, 8192, 0, hint=2000, floor=3000) == 3000  # the larger wins
    assert span_length(1000, 4096, 0, floor=100000) == 4096  # capped by max_model_len
    assert served_length(900, 100, 8192, 0, hint=4000) == (4000, 1000)


def test_a_conversation_under_one_hint_shares_every_block_of_its_history():
    """Turns of growing N, one hint: the signature of every block of the shorter turn's prompt is the same."""
    rng = np.random.default_rng(0)
    alphas, betas = rng.uniform(0, 600, (4, 3)), rng.uniform(0, 0.6, (4, 3))
    turns = [2100, 2400, 2750, 3300, 3900]
    sigs = [signature_for(alphas, betas, 64, n, 16384, 1, hint=8192) for n in turns]
    for first, second, n in zip(sigs, sigs[1:], turns, strict=False):
        assert all(first(e) == second(e) for e in range(16, n - 48, 16))
    plain = [signature_for(alphas, betas, 64, n, 16384, 8) for n in turns]  # the old default: spans move
    assert any(plain[0](e) != plain[1](e) for e in range(16, turns[0], 16))


def test_spans_are_capped_by_the_request_not_the_span_length():
    from moa_vllm.plan.span import span_tokens

    assert span_tokens(0.0, 1.0, 8192, 64, cap=1000) == 1000  # a dense head holds its own N, not L
    assert span_tokens(100.0, 0.1, 8192, 64, cap=1000) == 919
    assert span_tokens(100.0, 0.1, 8192, 64) == 919
    assert span_tokens(100.0, 0.1, 8192, 64, cap=500) == 500
    # never below the plan's span at the request's own N (beta >= 0)
    for n in (300, 1000, 5000):
        for a, b in ((0.0, 1.0), (128.0, 0.25), (512.0, 0.0)):
            assert span_tokens(a, b, 8192, 64, cap=n) >= span_tokens(a, b, n, 64)


def test_signature_depends_only_on_spans_below_the_block_end():
    a = SpanSignature(np.array([100, 300, 64]))
    b = SpanSignature(np.array([100, 500, 64]))  # differs on one head, at 300 vs 500
    assert a(64) == b(64) and a(300) == b(300)  # both reach 300: the head saw every key before it
    assert a(320) != b(320)
    c = SpanSignature(np.array([101, 300, 64]))
    assert c(100) == a(100) and c(101) != a(101)
    assert a(1000) == a(2000)  # beyond every span: the digest no longer changes


@pytest.mark.parametrize("n", [200, 900, 4000])
def test_dense_rules_share_at_every_length(n):
    alphas, betas = np.zeros((2, 3)), np.ones((2, 3))  # span = N: the dense plan
    sig_n = signature_for(alphas, betas, 16, n, 8192, 8)
    sig_other = signature_for(alphas, betas, 16, n + 777, 8192, 8)
    assert all(sig_n(e) == sig_other(e) for e in range(16, n, 16))


def test_request_spans_round_like_span_tokens():
    from moa_vllm.plan.span import span_tokens

    alphas, betas = np.array([[10.0, 0.4]]), np.array([[0.25, 0.125]])
    got = request_spans(alphas, betas, 999, 32)
    assert got.tolist() == [[span_tokens(10.0, 0.25, 999, 32), span_tokens(0.4, 0.125, 999, 32)]]
    capped = request_spans(alphas, betas, 4000, 32, cap=900)
    assert capped.tolist() == [[span_tokens(10.0, 0.25, 4000, 32, 900), span_tokens(0.4, 0.125, 4000, 32, 900)]]
    assert cacheable_blocks(100, 32) == 3
