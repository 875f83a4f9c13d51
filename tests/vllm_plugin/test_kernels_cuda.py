"""The CUDA ring path as far as a CPU allows: the token-major cell format, the one-head K/V views and the arguments
given to vLLM's Triton `unified_attention` (cu_seqlens_q, seqused_k, block_table over one-KV-head pages), checked
end to end through the ring simulation with the kernel replaced by a plain torch implementation of its documented
contract. The Triton kernel itself only runs on a GPU machine (not yet)."""

from __future__ import annotations

import pytest
import torch

from moa_vllm.vllm_plugin.kernels_cuda import CudaRingKernels
from tests.vllm_plugin.ring_sim import RingSim
from tests.vllm_plugin.test_ring_paths import PAGE, D, _drive, _rules


def unified_attention_contract(
    q,
    k,
    v,
    out,
    cu_seqlens_q,
    max_seqlen_q,
    seqused_k,
    max_seqlen_k,
    softmax_scale,
    causal,
    window_size,
    block_table,
    softcap,
    q_descale,
    k_descale,
    v_descale,
):
    """vLLM's paged varlen attention: sequence i's queries are its last tokens; k/v [pages, page, kv_heads, D]."""
    assert causal and tuple(window_size) == (-1, -1) and softcap == 0
    page = k.shape[1]
    g = q.shape[1] // k.shape[2]
    for i in range(block_table.shape[0]):
        qs, qe = int(cu_seqlens_q[i]), int(cu_seqlens_q[i + 1])
        n_k = int(seqused_k[i])
        pages = block_table[i, : -(-n_k // page)].long()
        keys = k[pages].reshape(-1, k.shape[2], k.shape[3])[:n_k].float()
        vals = v[pages].reshape(-1, v.shape[2], v.shape[3])[:n_k].float()
        n_q = qe - qs
        q_pos = torch.arange(n_k - n_q, n_k)[:, None]
        visible = torch.arange(n_k)[None, :] <= q_pos
        keys, vals = keys.repeat_interleave(g, 1), vals.repeat_interleave(g, 1)
        scores = torch.einsum("thd,khd->htk", q[qs:qe].float(), keys) * softmax_scale
        probs = torch.softmax(scores.masked_fill(~visible[None], float("-inf")), dim=-1)
        out[qs:qe] = torch.einsum("htk,khd->thd", probs, vals).to(out.dtype)


@pytest.fixture
def contract(monkeypatch):
    import vllm.v1.attention.ops.triton_unified_attention as module

    monkeypatch.setattr(module, "unified_attention", unified_attention_contract)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_ring_path_arguments_match_the_reference(contract, dtype):
    alphas, betas = _rules(2, 3, seed=11)
    sim = RingSim(
        CudaRingKernels(dtype, PAGE, D),
        alphas,
        betas,
        [210, 170],
        sinks=4,
        min_span=20,
        page=PAGE,
        g=3,
        d=D,
        dtype=dtype,
        seed=6,
    )
    assert _drive(sim, chunk=60) < {torch.float32: 2e-5, torch.bfloat16: 4e-2}[dtype]


def test_cuda_ring_path_fails_on_a_wrong_window(contract):
    alphas, betas = _rules(1, 3, seed=12)
    sim = RingSim(
        CudaRingKernels(torch.float32, PAGE, D),
        alphas,
        betas,
        [220, 200],
        sinks=4,
        min_span=20,
        page=PAGE,
        g=3,
        d=D,
        dtype=torch.float32,
        seed=7,
    )
    sim.reference_window_delta = -1
    assert _drive(sim, chunk=64) > 1e-3
