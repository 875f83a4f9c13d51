"""The torch ring prefill (near queries, far tiles of every kind, the small-window GEMM path) against the independent
reference with the same masks: first chunks and chunks after wrapped / unwrapped rings, sinks 0 / 64, windows on
both sides of SMALL_WINDOW and of the tile size, chunks that are not a multiple of the tile, spans of sinks only.
Ring slots that hold no position are NaN, so reading one fails the comparison."""

from __future__ import annotations

import pytest
import torch

from moa_vllm.ops import ring_prefill
from moa_vllm.ops.reference import reference_attention
from moa_vllm.ops.ring_layout import slot_positions
from moa_vllm.ops.ring_prefill import prefill_attention

D = 16


def _ring(keys: torch.Tensor, values: torch.Tensor, computed: int, spans: torch.Tensor, sinks: int):
    """The rings as they stand after positions 0..computed-1: [H, S] contents, unheld slots NaN."""
    held = int(torch.clamp(spans, max=computed).max())
    pos = slot_positions(torch.tensor([computed]), spans[None], sinks, held)[0]  # [H, S]
    safe = pos.clamp(min=0)
    ring_k = torch.gather(keys, 1, safe[..., None].expand(-1, -1, keys.shape[2])).clone()
    ring_v = torch.gather(values, 1, safe[..., None].expand(-1, -1, keys.shape[2])).clone()
    ring_k[pos < 0] = float("nan")
    ring_v[pos < 0] = float("nan")
    return ring_k, ring_v, pos


def _check(spans: list[int], sinks: int, computed: int, n: int, g: int = 3, q_tile: int | None = None, seed: int = 0):
    torch.manual_seed(seed)
    h = len(spans)
    spans_t = torch.tensor(spans)
    total = computed + n
    keys, values = torch.randn(h, total, D), torch.randn(h, total, D)
    query = torch.randn(n, h * g, D)
    ring = (None, None, None) if computed == 0 else _ring(keys, values, computed, spans_t, sinks)
    out = torch.full((n, h * g, D), float("nan"))
    windows = torch.clamp(spans_t - sinks, min=0)
    prefill_attention(
        query, keys[:, computed:].transpose(0, 1), values[:, computed:].transpose(0, 1), *ring,
        computed, windows, sinks, 0.25, out, q_tile=q_tile,
    )  # fmt: skip
    want = reference_attention(query, torch.arange(computed, total), keys, values, windows, sinks, 0.25)
    return float((out.double() - want).abs().max())


@pytest.mark.parametrize("computed", [0, 100, 700])
@pytest.mark.parametrize("sinks", [0, 64])
def test_prefill_matches_the_reference(computed, sinks):
    # windows below SMALL_WINDOW (GEMM tiles), between it and the tile, above the tile, and heads that see it all
    spans = [sinks + 40, sinks + 127, sinks + 300, 2000]
    assert _check(spans, sinks, computed, n=517) < 1e-5


@pytest.mark.parametrize("q_tile", [1, 7, 64, 1000])
def test_every_tile_size(q_tile):
    assert _check([90, 200, 333], 8, computed=450, n=301, q_tile=q_tile) < 1e-5


def test_small_window_path_and_flash_tiles_agree(monkeypatch):
    spans = [24 + 70, 24 + 90]
    monkeypatch.setattr(ring_prefill, "SMALL_WINDOW", 0)  # every window through the flash tiles
    assert _check(spans, 24, computed=300, n=400, g=1) < 1e-5
    monkeypatch.setattr(ring_prefill, "SMALL_WINDOW", 10_000)  # every window through the GEMM tiles
    assert _check(spans, 24, computed=300, n=400, g=1) < 1e-5


def test_spans_of_sinks_only_and_chunks_across_the_near_far_boundary():
    assert _check([16, 16, 40], 16, computed=0, n=130) < 1e-5  # window 0: far queries see the sinks only
    assert _check([16, 16, 40], 16, computed=30, n=90) < 1e-5
    assert _check([120, 260], 64, computed=50, n=300, g=2) < 1e-5  # near queries, then far ones, in one chunk


def test_a_wrong_window_fails():
    """The comparison can fail: a prefill run with windows one too wide differs from the reference."""
    torch.manual_seed(1)
    h, n, sinks = 2, 300, 8
    spans = torch.tensor([100, 150])
    keys, values, query = torch.randn(h, n, D), torch.randn(h, n, D), torch.randn(n, h, D)
    out = torch.empty(n, h, D)
    windows = spans - sinks
    prefill_attention(query, keys.transpose(0, 1), values.transpose(0, 1), None, None, None, 0, windows + 1, sinks,
                      0.25, out)  # fmt: skip
    want = reference_attention(query, torch.arange(n), keys, values, windows, sinks, 0.25)
    assert float((out.double() - want).abs().max()) > 1e-3
