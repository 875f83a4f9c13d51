"""moa_kernels.ring_decode (Triton) against its torch reference in Triton's interpreter: rings read through vLLM's
block table (packed and interleaved rows, a short request, a padding row with no ring, spare block-table columns and
stale pages holding NaN), GQA 1/3/4/8, float32/float16/bfloat16, split-KV over 4 and 16 segments, 8 KV heads of 128
dims, fp8 cells with their scales; a ring read one page off, a packed row read as interleaved and one key too many
fail."""

from __future__ import annotations

import pytest

from tests.kernels.interpreter import TOL, run_cases

pytestmark = pytest.mark.compute  # one interpreter run of every case (about 20 s)


@pytest.fixture(scope="module")
def errors() -> dict[str, float]:
    return run_cases("decode_cases.py")


@pytest.mark.parametrize("split", ["", "-split4"])
@pytest.mark.parametrize("dtype", list(TOL))
@pytest.mark.parametrize("group", [1, 3, 4])
def test_random_rings_match_the_reference(errors, dtype, group, split):
    assert errors[f"random-{dtype}-g{group}{split}"] < TOL[dtype]


@pytest.mark.parametrize("group", [4, 8])
def test_eight_kv_heads_of_128_dims_over_16_segments_match_the_reference(errors, group):
    assert errors[f"geometry-h8-g{group}-d128"] < TOL["float32"]


def test_a_head_dim_that_is_not_a_power_of_two_matches_the_reference(errors):
    assert errors["head-dim-48"] < TOL["float32"]


@pytest.mark.parametrize("fp8", ["float8_e4m3fn", "float8_e5m2"])
def test_fp8_cells_match_the_reference(errors, fp8):
    assert errors[f"fp8-{fp8}"] < TOL["float16"]
    assert not errors[f"mutation-fp8-unscaled-{fp8}"] < 1e-2


@pytest.mark.parametrize("case", ["base-plus-one", "packed-read-interleaved", "visible-plus-one"])
def test_a_ring_read_at_the_wrong_pages_fails(errors, case):
    assert not errors[f"mutation-{case}"] < 1e-2  # NaN (a never-written slot was read) fails too


def test_one_layer_of_a_group_of_layers_matches_the_reference_and_needs_its_cell_map(errors):
    assert errors["group-of-5-layers"] < TOL["float32"] and errors["group-of-5-layers-split4"] < TOL["float32"]
    assert not errors["mutation-group-read-without-cell-map"] < 1e-2
