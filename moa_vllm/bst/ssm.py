"""S4D: a diagonal, linear time-invariant state space model, one independent SSM per channel.

Continuous system per channel h and mode n (B is fixed to 1; only the product C*B matters for a diagonal SSM):

    x'(t) = A_n x(t) + u(t),   y(t) = 2 Re(sum_n C_n x_n(t)) + D u(t)

Each complex mode n stands for a conjugate pair, hence the ``2 Re``. ``state_size`` N counts complex modes, so one
channel carries N complex numbers (2N real numbers); the S4D paper's "N" counts real dimensions (its N/2 modes).

Zero-order-hold discretisation with step dt gives dA = exp(dt A) and dB = (exp(dt A) - 1) / A, and three ways to
evaluate the same map, which agree to rounding error:

* :meth:`S4D.forward` - FFT convolution with the kernel K_l = 2 Re(sum_n C_n dB_n dA_n^l), O(L log L), parallel
  (training, one-shot prefill);
* :meth:`S4D.step` - the recurrence x_t = dA x_{t-1} + dB u_t, y_t = 2 Re(C x_t) + D u_t (decode);
* :meth:`S4D.forward_chunk` - FFT convolution of a chunk plus the free response of a carried state, returning the
  state after the chunk (chunked prefill).

Layout is channels-last, ``(batch, length, channels)``, like the transformer around it. The SSM always computes in
float32 or float64 (FFTs and complex exponentials are too lossy in half precision) and casts its output back.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

SSMInit = Literal["lin", "inv", "real"]

_COMPLEX_OF = {torch.float32: torch.complex64, torch.float64: torch.complex128}


def compute_dtype(*dtypes: torch.dtype) -> torch.dtype:
    """float64 if any input is double precision (real or complex), else float32.

    A complex128 state therefore keeps the recurrence in float64 even when activations are float32, which is how a
    caller buys extra precision for very long decodes.
    """
    return torch.float64 if any(d in (torch.float64, torch.complex128) for d in dtypes) else torch.float32


def state_dtype(dtype: torch.dtype) -> torch.dtype:
    """The complex dtype the carried state uses for activations (or a state) of ``dtype``."""
    if dtype.is_complex:
        return dtype
    return _COMPLEX_OF[compute_dtype(dtype)]


@dataclass(frozen=True)
class Discretization:
    """ZOH-discretised parameters, each ``(channels, state_size)`` complex."""

    dtA: Tensor  # dt * A; dA^l is computed as exp(l * dtA) rather than by repeated products
    dA: Tensor
    dB: Tensor
    C: Tensor


def init_A(channels: int, state_size: int, init: SSMInit) -> tuple[Tensor, Tensor]:
    """Initial (real, imaginary) parts of A, each ``(channels, state_size)``.

    S4D-Lin: A_n = -1/2 + i pi n.
    S4D-Inv: A_n = -1/2 + i (N'/pi) (N'/(2n+1) - 1) with N' = 2 * state_size, the real state dimension the S4D
    paper's formula is written for (so the imaginary parts stay non-negative for n < state_size).
    Real: A_n = -1/2, no oscillation. With small dt every mode is a slow leaky integrator whose kernel is flat over
    thousands of steps, so what a token wrote reads back the same at any distance (length-robust recall).
    """
    n = torch.arange(state_size, dtype=torch.float64)
    if init == "lin":
        imag = math.pi * n
    elif init == "inv":
        n_real = 2 * state_size
        imag = n_real / math.pi * (n_real / (2 * n + 1) - 1)
    elif init == "real":
        imag = torch.zeros_like(n)
    else:
        raise ValueError(f"unknown S4D init {init!r}; expected 'lin', 'inv' or 'real'")
    real = torch.full((state_size,), -0.5, dtype=torch.float64)
    return real.repeat(channels, 1).float(), imag.repeat(channels, 1).float()


class S4D(nn.Module):
    """Diagonal SSM over ``channels`` independent channels with ``state_size`` complex modes each.

    Learnable: log dt per channel, A (real part kept negative through ``-exp``, so every mode decays), C (complex,
    stored as real pairs so optimizers and safetensors see only real tensors) and the skip D.
    """

    def __init__(
        self,
        channels: int,
        state_size: int = 16,
        init: SSMInit = "lin",
        dt_min: float = 1e-3,
        dt_max: float = 1e-1,
    ) -> None:
        super().__init__()
        if channels < 1 or state_size < 1:
            raise ValueError("channels and state_size must be positive")
        if not 0 < dt_min <= dt_max:
            raise ValueError("need 0 < dt_min <= dt_max")
        self.channels = channels
        self.state_size = state_size
        # log-uniform dt, as in S4/S4D: channels see time scales from 1/dt_max to 1/dt_min tokens.
        log_dt = torch.rand(channels) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min)
        self.log_dt = nn.Parameter(log_dt)
        real, imag = init_A(channels, state_size, init)
        self.log_neg_A_real = nn.Parameter(torch.log(-real))
        self.A_imag = nn.Parameter(imag)
        c = torch.randn(channels, state_size, dtype=torch.complex64) * math.sqrt(0.5)
        self.C = nn.Parameter(torch.view_as_real(c).contiguous())
        self.D = nn.Parameter(torch.randn(channels))

    def extra_repr(self) -> str:
        return f"channels={self.channels}, state_size={self.state_size}"

    # ---- parameters -------------------------------------------------------------------------------------------

    def discretize(self, dtype: torch.dtype = torch.float32) -> Discretization:
        """ZOH discretisation in real precision ``dtype`` (float32 or float64)."""
        cdtype = _COMPLEX_OF[dtype]
        A = torch.complex(-torch.exp(self.log_neg_A_real.to(dtype)), self.A_imag.to(dtype))
        dtA = torch.exp(self.log_dt.to(dtype))[:, None] * A
        dA = torch.exp(dtA)
        dB = (dA - 1.0) / A
        C = torch.view_as_complex(self.C.to(dtype).contiguous())
        return Discretization(dtA.to(cdtype), dA.to(cdtype), dB.to(cdtype), C.to(cdtype))

    def kernel(self, length: int, dtype: torch.dtype = torch.float32) -> Tensor:
        """Convolution kernel ``(channels, length)``: K_l = 2 Re(sum_n C_n dB_n dA_n^l)."""
        disc = self.discretize(dtype)
        return 2 * _vandermonde(disc.C * disc.dB, disc.dtA, length)

    def initial_state(
        self, batch: int, dtype: torch.dtype = torch.float32, device: torch.device | str | None = None
    ) -> Tensor:
        """Zero state ``(batch, channels, state_size)``; complex64 unless ``dtype`` asks for double precision."""
        if device is None:
            device = self.log_dt.device
        return torch.zeros(batch, self.channels, self.state_size, dtype=state_dtype(dtype), device=device)

    # ---- the three evaluation paths ---------------------------------------------------------------------------

    def forward(self, u: Tensor) -> Tensor:
        """Zero-initial-state output for ``u`` ``(batch, length, channels)``, by FFT convolution."""
        self._check_input(u)
        dtype = compute_dtype(u.dtype)
        x = u.to(dtype)
        y = self._convolve(x, self.kernel(x.shape[1], dtype)) + x * self.D.to(dtype)
        return y.to(u.dtype)

    def step(self, u_t: Tensor, state: Tensor) -> tuple[Tensor, Tensor]:
        """One recurrence step: ``u_t`` ``(batch, channels)`` -> (y_t, new state)."""
        if u_t.dim() != 2 or u_t.shape[-1] != self.channels:
            raise ValueError(f"expected (batch, {self.channels}), got {tuple(u_t.shape)}")
        self._check_state(state, u_t.shape[0])
        dtype = compute_dtype(u_t.dtype, state.dtype)
        disc = self.discretize(dtype)
        x = u_t.to(dtype)
        new = disc.dA * state.to(_COMPLEX_OF[dtype]) + disc.dB * x[..., None]
        y = 2 * (disc.C * new).sum(-1).real + self.D.to(dtype) * x
        return y.to(u_t.dtype), new.to(state.dtype)

    def forward_chunk(self, u: Tensor, state: Tensor) -> tuple[Tensor, Tensor]:
        """Output of a chunk ``u`` ``(batch, T, channels)`` that follows ``state``, and the state after it.

        With the state before the chunk written x_{-1}, x_t = dA^{t+1} x_{-1} + sum_{s<=t} dA^{t-s} dB u_s, so the
        output is the zero-state convolution plus the free response 2 Re(C dA^{t+1} x_{-1}), and the state after the
        chunk is dA^T x_{-1} + sum_s dA^{T-1-s} dB u_s. Costs O(T log T + T N) per channel, like the FFT path.
        """
        self._check_input(u)
        self._check_state(state, u.shape[0])
        dtype = compute_dtype(u.dtype, state.dtype)
        disc = self.discretize(dtype)
        x = u.to(dtype)
        x0 = state.to(_COMPLEX_OF[dtype])
        T = x.shape[1]
        steps = torch.arange(T + 1, device=x.device, dtype=dtype)
        powers = _powers(disc.dtA, steps)  # dA^0 .. dA^T, (channels, N, T+1)
        kern = 2 * torch.einsum("hn,hnl->hl", disc.C * disc.dB, powers[..., :T]).real
        y = self._convolve(x, kern) + x * self.D.to(dtype)
        y = y + 2 * torch.einsum("hn,bhn,hnt->bth", disc.C, x0, powers[..., 1:]).real
        # dA^(T-1-s) for s = 0..T-1 is the power table read backwards.
        reversed_powers = powers[..., :T].flip(-1)
        new = powers[..., T] * x0 + torch.einsum("hns,bsh->bhn", disc.dB[..., None] * reversed_powers, x.to(x0.dtype))
        return y.to(u.dtype), new.to(state.dtype)

    # ---- helpers ----------------------------------------------------------------------------------------------

    @staticmethod
    def _convolve(x: Tensor, kernel: Tensor) -> Tensor:
        """Causal convolution of ``x`` ``(batch, L, channels)`` with ``kernel`` ``(channels, L)`` via FFT.

        Padding to 2L makes the circular convolution linear (no wrap-around from the end into the start).
        """
        length = x.shape[1]
        n = 2 * length
        xf = torch.fft.rfft(x.transpose(1, 2), n=n)
        kf = torch.fft.rfft(kernel, n=n)
        return torch.fft.irfft(xf * kf, n=n)[..., :length].transpose(1, 2)

    def _check_input(self, u: Tensor) -> None:
        if u.dim() != 3 or u.shape[-1] != self.channels:
            raise ValueError(f"expected (batch, length, {self.channels}), got {tuple(u.shape)}")

    def _check_state(self, state: Tensor, batch: int) -> None:
        expected = (batch, self.channels, self.state_size)
        if tuple(state.shape) != expected or not state.is_complex():
            raise ValueError(f"expected a complex state of shape {expected}, got {state.dtype} {tuple(state.shape)}")


def _powers(dtA: Tensor, steps: Tensor) -> Tensor:
    """dA^l = exp(l * dt A) for every l in ``steps``: ``(channels, N, len(steps))``.

    The exponential form keeps the error flat in l, where repeated multiplication would accumulate it.
    """
    return torch.exp(dtA[..., None] * steps.to(dtA.dtype))


def _vandermonde(weights: Tensor, dtA: Tensor, length: int) -> Tensor:
    """Re(sum_n weights_n dA_n^l) for l < ``length``: ``(channels, length)``, real.

    Blocked: with l = a * B + b, dA^l = dA^(aB) * dA^b, so the sum over modes is one real batched matmul of an
    (A, 2N) by a (2N, B) table per channel, from A + B complex exponentials per mode instead of L. The direct form
    (an exp and a product per mode, channel and position) was most of a training step at 8192 tokens.
    """
    block = math.isqrt(max(length - 1, 0)) + 1  # ceil(sqrt(length))
    blocks = -(-length // block)
    steps = torch.arange(max(block, blocks), device=dtA.device, dtype=dtA.real.dtype)
    inner = _powers(dtA, steps[:block])  # dA^b, (channels, N, B)
    outer = weights[..., None] * _powers(dtA, steps[:blocks] * block)  # w dA^(aB), (channels, N, A)
    # Re(w p) = Re(w) Re(p) - Im(w) Im(p), stacked along the contraction axis.
    left = torch.cat([outer.real, -outer.imag], dim=1).transpose(1, 2)  # (channels, A, 2N)
    right = torch.cat([inner.real, inner.imag], dim=1)  # (channels, 2N, B)
    return torch.bmm(left, right).flatten(1)[:, :length]
