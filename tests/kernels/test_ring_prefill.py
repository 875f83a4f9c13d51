"""moa_kernels.ring_prefill (Triton) against its torch reference in Triton's interpreter: random spans, sinks 0 and 4,
windows smaller and larger than the chunk, empty / wrapped / many-times-wrapped rings, shuffled pages from a pool
whose stale pages hold NaN, GQA 1/3/8, float32/float16/bfloat16, rows left alone; a window off by one fails; 8 KV
heads of 128 dims at GQA 4 and 8 (the geometry of Llama-3-8B / 70B)."""

from __future__ import annotations

import pytest

from tests.kernels.interpreter import TOL, run_cases

pytestmark = pytest.mark.compute  # one interpreter run of every case (about a minute)


@pytest.fixture(scope="module")
def errors() -> dict[str, float]:
    return run_cases("interpret_cases.py")


@pytest.mark.parametrize("dtype", list(TOL))
@pytest.mark.parametrize("group", [1, 3, 8])
@pytest.mark.parametrize("sinks", [0, 4])
def test_random_rings_match_the_reference(errors, dtype, group, sinks):
    assert errors[f"random-{dtype}-g{group}-s{sinks}"] < TOL[dtype]


@pytest.mark.parametrize("case", ["sinks-in-chunk", "head-dim-48", "row-subset", "group-of-5-layers"])
def test_edge_cases_match_the_reference(errors, case):
    assert errors[case] < TOL["float32"]


@pytest.mark.parametrize("group", [4, 8])
def test_eight_kv_heads_of_128_dims_match_the_reference(errors, group):
    assert errors[f"geometry-h8-g{group}-d128"] < TOL["float32"]


def test_rows_not_asked_for_are_left_alone(errors):
    assert errors["row-subset-others-untouched"] == 0.0


@pytest.mark.parametrize("case", ["mutation-reference-window-minus-one", "mutation-kernel-span-plus-one"])
def test_a_window_off_by_one_fails(errors, case):
    assert not errors[case] < 1e-2  # NaN (a never-written slot was read) fails too


@pytest.mark.parametrize("fp8", ["float8_e4m3fn", "float8_e5m2"])
def test_fp8_cells_match_the_reference(errors, fp8):
    """Ring values read as float8 x scale, fresh keys in fp16: fp16 arithmetic over the same values."""
    assert errors[f"fp8-{fp8}"] < TOL["float16"]


@pytest.mark.parametrize("fp8", ["float8_e4m3fn", "float8_e5m2"])
def test_fp8_cells_without_their_scales_fail(errors, fp8):
    assert not errors[f"mutation-fp8-unscaled-{fp8}"] < 1e-2
