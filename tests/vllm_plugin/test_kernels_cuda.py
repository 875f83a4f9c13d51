"""The CUDA ring path as far as a CPU allows: the token-major cell format, the one-head K/V views and the arguments
given to vLLM's Triton `unified_attention` (cu_seqlens_q, seqused_k, block_table over one-KV-head pages) and to
moa_kernels' ring prefill, the survivors' writes, checked end to end through the ring simulation (1) with both
kernels replaced by plain torch implementations of their contracts and (2) with vLLM's real Triton decode kernel
and our real Triton prefill kernel in the Triton interpreter (fp32 and fp16; the interpreter's bf16 tl.dot returns
garbage in Triton 3.9 and vLLM's kernel has no switch around it, so bf16 is covered by (1) and tests/kernels).
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
    """vLLM's real decode kernel and our prefill kernel at 8 KV heads, GQA 4, head dim 128 (one layer, short
    requests: the interpreter runs every program in numpy)."""
    assert _interpret("float32", "0", "8x4x128") < 2e-5


@pytest.mark.compute
def test_real_triton_kernel_in_the_interpreter_fails_on_a_wrong_window():
    assert _interpret("float32", "1") > 1e-3
