from hypothesis import given
from hypothesis import strategies as st

from moa_vllm.plan import request_length, span_tokens, visible, window_tokens


def test_request_length_caps_at_max_model_len():
    assert request_length(100, 50, 8192) == 150
    assert request_length(8000, 500, 8192) == 8192
    assert request_length(10, None, 4096) == 4096


def test_span_rounds_half_up_and_clamps():
    assert span_tokens(0, 0.5, 1001, 128) == 501  # 500.5 -> 501
    assert span_tokens(0, 0.25, 4096, 128) == 1024
    assert span_tokens(0, 0.01, 4096, 128) == 128  # raised to min_span
    assert span_tokens(-1024, 0.5, 1000, 128) == 128
    assert span_tokens(3072, 1.0, 4096, 128) == 4096  # capped at N
    assert span_tokens(0, 0.5, 100, 128) == 100  # N below min_span: N wins


@given(alpha=st.floats(-4096, 4096), beta=st.floats(0, 1), n=st.integers(1, 1 << 17), min_span=st.integers(1, 512))
def test_span_bounds_and_monotone(alpha, beta, n, min_span):
    s = span_tokens(alpha, beta, n, min_span)
    assert min(min_span, n) <= s <= n
    assert span_tokens(alpha, beta, n + 1, min_span) >= s  # spans never shrink as N grows


@given(n=st.integers(1, 300), sinks=st.integers(0, 64), span=st.integers(1, 300))
def test_visible_count_equals_span(n, sinks, span):
    """The last query of a request sees exactly min(span, N) keys when span > sinks."""
    span = min(span, n)
    if span <= sinks and n > span:
        return  # all-sink spans only occur when N itself is that short
    window = window_tokens(span, sinks)
    q = n - 1
    seen = sum(visible(q, k, sinks, window) for k in range(n))
    assert seen == span or (span <= sinks and seen == n)
