"""Run the CUDA ring path through the REAL Triton ring decode and prefill kernels in the Triton interpreter, on CPU.

Used by test_kernels_cuda.py in a subprocess: TRITON_INTERPRET must be set before Triton is first imported (the
interpreter needs no driver; the kernels are moa_kernels', so vLLM's own Triton switch does not matter).
Arguments: dtype, window delta (default 0), geometry HxGxD (KV heads x query heads per KV head x head dim; default
3x3x64), KV cache dtype (default auto; fp8_e4m3 / fp8_e5m2: quantized rings, scales 0.5 / 0.25).
Prints the largest error against the token-exact reference, one line: `max_err <float>`.
"""

from __future__ import annotations

import os
import sys

os.environ["TRITON_INTERPRET"] = "1"

import torch  # noqa: E402


def main() -> int:
    from moa_vllm.vllm_plugin.moa.kernels_cuda import CudaRingKernels
    from tests.vllm_plugin.ring_sim import drive, make_sim

    dtype = {"float32": torch.float32, "float16": torch.float16}[sys.argv[1]]
    delta = int(sys.argv[2]) if len(sys.argv) > 2 else 0
    heads, g, d = (int(x) for x in (sys.argv[3] if len(sys.argv) > 3 else "3x3x64").split("x"))
    kv = sys.argv[4] if len(sys.argv) > 4 else "auto"
    if heads == 3:
        alphas = torch.tensor([[20.0, 40.0, 70.0]]).double()
        betas = torch.tensor([[0.0, 0.1, 0.0]]).double()
        lengths, tail = [96, 80], 48  # spans 20 / ~49 / 70 (+ sinks): one ring wraps in prefill, all in decode
    else:  # spans 16..44 tokens at N 64 / 72, a 24-token decode tail: every ring wraps, in prefill or decode
        alphas = torch.linspace(16.0, 44.0, heads).double()[None]
        betas = torch.zeros(1, heads).double()
        lengths, tail = [72, 64], 24
    sim = make_sim(CudaRingKernels, dtype, alphas, betas, lengths, seed=8, min_span=16, g=g, d=d, scale=d**-0.5, kv=kv)
    if kv != "auto":
        sim.kernels.set_scales(0.5, 0.25)
        sim.k_seen = [[sim.kernels.as_cached(k, k)[0] for k in layer] for layer in sim.k]
        sim.v_seen = [[sim.kernels.as_cached(v, v)[1] for v in layer] for layer in sim.v]
    sim.kernels.allocate(torch.device("cpu"), group=g)  # decode through the split-KV kernel, as on a GPU
    sim.reference_window_delta = delta
    print(f"max_err {drive(sim, chunk=32, tail=tail):.3e}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
