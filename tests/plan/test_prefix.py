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
    assert served_length(300, 100, 4096, 8) == span_length(400, 4096, 8)


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
    assert cacheable_blocks(100, 32) == 3
