"""The CUDA ring path as far as a CPU allows: the token-major cell format, the one-head K/V views, the block table
and ring layouts (RingPages) given to moa_kernels' Triton ring decode and ring prefill, the survivors' writes,
checked end to end through the ring simulation (1) with both kernels replaced by their torch references and (2)
with the real Triton kernels in the Triton interpreter (fp32 and fp16; bf16 is covered by (1) and tests/kernels).
Not yet run on a GPU."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from moa_vllm.vllm_plugin.moa.kernels_cuda import CudaRingKernels
from tests.vllm_plugin.ring_sim import drive, make_sim, rules


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_ring_path_arguments_match_the_reference(contract, dtype):
    alphas, betas = rules(2, 3, seed=11)
    sim = make_sim(CudaRingKernels, dtype, alphas, betas, [210, 170], seed=6)
    assert drive(sim, chunk=60) < {torch.float32: 2e-5, torch.bfloat16: 4e-2}[dtype]


@pytest.mark.parametrize("g", [4, 8])
def test_cuda_ring_path_at_eight_kv_heads_and_head_dim_128(contract, g):
    alphas, betas = rules(2, 8, seed=13 + g)
    sim = make_sim(CudaRingKernels, torch.bfloat16, alphas, betas, [230, 160], seed=9, g=g, d=128, scale=128**-0.5)
    assert drive(sim, chunk=60) < 4e-2


def _fp8_sim(kv: str, dtype: torch.dtype, seed: int, heads: int = 3, g: int = 3, d: int = 64, lengths=(230, 170)):
    """A CUDA-path simulation over fp8 rings with scales != 1; the reference sees K/V as the cache gives them back."""
    alphas, betas = rules(2, heads, seed=seed)
    sim = make_sim(CudaRingKernels, dtype, alphas, betas, list(lengths), seed=seed + 1, g=g, d=d, scale=d**-0.5, kv=kv)
    sim.kernels.set_scales(0.5, 0.25)
    sim.k_seen = [[sim.kernels.as_cached(k, k)[0] for k in layer] for layer in sim.k]
    sim.v_seen = [[sim.kernels.as_cached(v, v)[1] for v in layer] for layer in sim.v]
    return sim


@pytest.mark.parametrize("kv", ["fp8", "fp8_e4m3", "fp8_e5m2"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_fp8_rings_match_the_reference_over_the_same_quantized_keys(contract, kv, dtype):
    """Decode, prefill and chunked prefill over fp8 rings: the writes
    store float8 of value / scale, every read dequantizes with the layer's scales."""
    sim = _fp8_sim(kv, dtype, seed=50)
    assert float((sim.k_seen[0][0].float() - sim.k[0][0].float()).abs().max()) > 1e-2  # quantization is no no-op
    assert bool((sim.spans < torch.tensor(sim.lengths)[None, :, None] - 60).any())  # some rings wrap
    assert drive(sim, chunk=60) < {torch.float32: 2e-5, torch.bfloat16: 4e-2}[dtype]


def test_cuda_fp8_rings_at_eight_kv_heads_and_head_dim_128(contract):
    sim = _fp8_sim("fp8_e4m3", torch.bfloat16, seed=52, heads=8, g=4, d=128, lengths=(230, 160))
    assert drive(sim, chunk=60) < 4e-2


def test_cuda_fp8_rings_against_unquantized_keys_fail(contract):
    sim = _fp8_sim("fp8_e4m3", torch.float32, seed=54)
    sim.k_seen, sim.v_seen = sim.k, sim.v  # a reference that forgets the quantization
    assert drive(sim, chunk=64) > 1e-2


def test_cuda_fp8_writes_round_to_nearest_and_saturate():
    """What vLLM's CUDA cache writes do: nearest float8 of value / scale, overflow clamped to the largest finite."""
    kernels = CudaRingKernels(torch.float32, 16, 8, kv_cache_dtype="fp8_e4m3")
    kernels.set_scales(0.5, 2.0)
    view = torch.zeros(2, 32, 8, dtype=torch.uint8)
    key = torch.tensor([[1.0e4, -1.0e4, 0.3, 1.06, 0.0, 7.0, -3.3, 0.01]])
    kernels.write(view, torch.tensor([16]), key, key)
    k, v = kernels.read(view, torch.tensor([[1]]))
    assert torch.equal(k[0, 0], (key[0] / 0.5).clamp(-448, 448).to(torch.float8_e4m3fn).float() * 0.5)
    assert float(k[0, 0, 2]) == 0.625 * 0.5  # 0.6 lies between 0.5625 and 0.625: nearest, not toward zero
    assert float(k[0, 0, 0]) == 448 * 0.5 and float(v[0, 0, 1]) == -448 * 2.0


def test_cuda_ring_path_fails_on_a_wrong_window(contract):
    alphas, betas = rules(1, 3, seed=12)
    sim = make_sim(CudaRingKernels, torch.float32, alphas, betas, [220, 200], seed=7)
    sim.reference_window_delta = -1
    assert drive(sim, chunk=64) > 1e-3


def _interpret(*args: str) -> float:
    """tests/vllm_plugin/triton_interpret_run.py in a fresh process (TRITON_INTERPRET must precede every import)."""
    repo = Path(__file__).resolve().parents[2]
    run = subprocess.run(
        [sys.executable, str(repo / "tests" / "vllm_plugin" / "triton_interpret_run.py"), *args],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=repo,
        env={**os.environ, "PYTHONPATH": str(repo)},
    )
    lines = [line for line in run.stdout.splitlines() if line.startswith(("max_err", "skip"))]
    assert run.returncode == 0 and lines, run.stdout[-2000:] + run.stderr[-4000:]
    if lines[-1].startswith("skip"):
        pytest.skip(lines[-1])
    return float(lines[-1].split()[1])


@pytest.mark.compute
@pytest.mark.parametrize("dtype, tol", [("float32", 2e-5), ("float16", 6e-3)])
def test_real_triton_kernel_in_the_interpreter_matches_the_reference(dtype, tol):
    assert _interpret(dtype) < tol


@pytest.mark.compute
def test_real_triton_kernel_in_the_interpreter_at_eight_kv_heads_and_head_dim_128():
    """Our decode and prefill kernels at 8 KV heads, GQA 4, head dim 128 (one layer, short
    requests: the interpreter runs every program in numpy)."""
    assert _interpret("float32", "0", "8x4x128") < 2e-5


@pytest.mark.compute
@pytest.mark.parametrize("kv", ["fp8_e4m3", "fp8_e5m2"])
def test_real_triton_kernels_in_the_interpreter_over_fp8_rings(kv):
    """Our decode and prefill kernels reading float8 cells, fp16
    queries, scales != 1, against the reference over the same quantized K/V."""
    assert _interpret("float16", "0", "3x3x64", kv) < 6e-3


@pytest.mark.compute
def test_real_triton_kernel_in_the_interpreter_fails_on_a_wrong_window():
    assert _interpret("float32", "1") > 1e-3
