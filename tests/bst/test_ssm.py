"""S4D: the FFT, recurrent and chunked paths compute the same causal map."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from moa_vllm.bst.ssm import S4D

CHANNELS, LENGTH = 6, 300


def make_ssm(init: str = "lin", seed: int = 0, channels: int = CHANNELS) -> S4D:
    torch.manual_seed(seed)
    # dt_max 0.5 makes some modes decay fast and some rotate fast, so long and short memories are both exercised.
    return S4D(channels, state_size=16, init=init, dt_min=1e-3, dt_max=0.5).double()


def inputs(length: int = LENGTH, batch: int = 2, seed: int = 1, channels: int = CHANNELS) -> torch.Tensor:
    return torch.randn(batch, length, channels, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


def recurrence(ssm: S4D, u: torch.Tensor, state: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    if state is None:
        state = ssm.initial_state(u.shape[0], u.dtype)
    ys = []
    for t in range(u.shape[1]):
        y, state = ssm.step(u[:, t], state)
        ys.append(y)
    return torch.stack(ys, 1), state


@pytest.mark.parametrize("init", ["lin", "inv"])
def test_fft_matches_recurrence_float64(init: str) -> None:
    ssm, u = make_ssm(init), inputs()
    y_rec, _ = recurrence(ssm, u)
    torch.testing.assert_close(ssm(u), y_rec, rtol=0, atol=1e-12)


@pytest.mark.parametrize("L", [1, 2, 49, 50])  # the kernel is built in sqrt(L) blocks: squares, and one past
def test_kernel_matches_formula(L: int) -> None:
    """K_l = 2 Re(sum_n C_n (exp(dt A_n) - 1)/A_n exp(dt A_n l)), written out independently."""
    ssm = make_ssm()
    dt = torch.exp(ssm.log_dt).detach()
    A = torch.complex(-torch.exp(ssm.log_neg_A_real), ssm.A_imag).detach()
    C = torch.view_as_complex(ssm.C.detach())
    expected = torch.zeros(CHANNELS, L, dtype=torch.float64)
    for h in range(CHANNELS):
        for pos in range(L):
            terms = C[h] * (torch.exp(dt[h] * A[h]) - 1) / A[h] * torch.exp(dt[h] * A[h] * pos)
            expected[h, pos] = 2 * terms.sum().real
    torch.testing.assert_close(ssm.kernel(L, torch.float64).detach(), expected, rtol=0, atol=1e-13)


@pytest.mark.parametrize("chunk", [1, 7, 64, 100, 299, 300, 512])
def test_chunked_matches_one_shot(chunk: int) -> None:
    """Fixed-size chunks, including ones that do not divide the length and one longer than it."""
    ssm, u = make_ssm(), inputs()
    state = ssm.initial_state(u.shape[0], u.dtype)
    ys = []
    for a in range(0, LENGTH, chunk):
        y, state = ssm.forward_chunk(u[:, a : a + chunk], state)
        ys.append(y)
    _, final_state = recurrence(ssm, u)
    torch.testing.assert_close(torch.cat(ys, 1), ssm(u), rtol=0, atol=1e-12)
    torch.testing.assert_close(state, final_state, rtol=0, atol=1e-12)


@settings(max_examples=20, deadline=None)
@given(cuts=st.lists(st.integers(1, LENGTH - 1), max_size=6, unique=True))
def test_chunked_any_split(cuts: list[int]) -> None:
    ssm, u = make_ssm(), inputs()
    bounds = [0, *sorted(cuts), LENGTH]
    state = ssm.initial_state(u.shape[0], u.dtype)
    ys = []
    for a, b in zip(bounds, bounds[1:]):
        y, state = ssm.forward_chunk(u[:, a:b], state)
        ys.append(y)
    torch.testing.assert_close(torch.cat(ys, 1), ssm(u), rtol=0, atol=1e-12)


def test_single_token_chunk_equals_step() -> None:
    ssm, u = make_ssm(), inputs(length=20)
    _, state = recurrence(ssm, u[:, :19])
    y_step, s_step = ssm.step(u[:, 19], state)
    y_chunk, s_chunk = ssm.forward_chunk(u[:, 19:], state)
    torch.testing.assert_close(y_chunk[:, 0], y_step, rtol=0, atol=1e-13)
    torch.testing.assert_close(s_chunk, s_step, rtol=0, atol=1e-13)


@pytest.mark.parametrize("position", [0, 150, 299])
def test_fft_path_is_causal(position: int) -> None:
    """Changing u_p leaves y_t, t < p, unchanged up to FFT rounding (the FFT mixes all positions numerically)."""
    ssm, u = make_ssm(), inputs()
    changed = u.clone()
    changed[:, position] += 10.0
    y, y2 = ssm(u), ssm(changed)
    torch.testing.assert_close(y2[:, :position], y[:, :position], rtol=0, atol=1e-12)
    assert (y2[:, position] - y[:, position]).abs().min() > 1e-3


def test_float32_paths_agree_over_long_inputs() -> None:
    torch.manual_seed(0)
    ssm = S4D(4, 16)
    u = torch.randn(1, 1024, 4)
    y_rec, _ = recurrence(ssm, u)
    y = ssm(u)
    assert y.dtype == torch.float32
    torch.testing.assert_close(y, y_rec, rtol=0, atol=1e-4 * y.abs().max().item())


def test_state_dtypes() -> None:
    ssm = S4D(3, 4)
    assert ssm.initial_state(2).dtype == torch.complex64
    assert ssm.initial_state(2, torch.bfloat16).dtype == torch.complex64
    assert ssm.initial_state(2, torch.float64).dtype == torch.complex128
    assert ssm.initial_state(2).shape == (2, 3, 4)
    u = torch.randn(2, 5, 3, dtype=torch.bfloat16)
    assert ssm(u).dtype == torch.bfloat16
    y, state = ssm.forward_chunk(u, ssm.initial_state(2, torch.complex128))
    assert y.dtype == torch.bfloat16 and state.dtype == torch.complex128


def test_initialisations() -> None:
    lin, inv = S4D(2, 16, "lin"), S4D(2, 16, "inv")
    n = torch.arange(16, dtype=torch.float32)
    for ssm in (lin, inv):
        torch.testing.assert_close(-torch.exp(ssm.log_neg_A_real), torch.full((2, 16), -0.5))
    torch.testing.assert_close(lin.A_imag[1], math.pi * n)
    torch.testing.assert_close(inv.A_imag[0], 32 / math.pi * (32 / (2 * n + 1) - 1))
    assert (inv.A_imag >= 0).all() and (inv.A_imag[:, 1:] < inv.A_imag[:, :-1]).all()
    with pytest.raises(ValueError):
        S4D(2, 16, "legs")  # type: ignore[arg-type]


def test_shape_errors() -> None:
    ssm = S4D(3, 4)
    with pytest.raises(ValueError):
        ssm(torch.randn(2, 5, 4))
    with pytest.raises(ValueError):
        ssm.step(torch.randn(2, 3), ssm.initial_state(3))
    with pytest.raises(ValueError):
        ssm.forward_chunk(torch.randn(2, 5, 3), torch.zeros(2, 3, 4))  # a real tensor is not a state
