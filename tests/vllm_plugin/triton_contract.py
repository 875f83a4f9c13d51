"""vLLM's Triton `unified_attention` as plain torch over its contract (paged varlen attention), for tests that run
the CUDA ring path on a CPU; the `contract` fixture (conftest.py) swaps it and moa_kernels' ring prefill in."""

from __future__ import annotations

import torch


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
    kv_quant_mode=None,
    **split_kv,  # the split-KV scratch: a performance choice, same result
):
    """vLLM's paged varlen attention: sequence i's queries are its last tokens; k/v [pages, page, kv_heads, D]. In
    the FP8_PER_TENSOR mode k/v hold float8 values times the one-value k/v_descale tensors."""
    from vllm.v1.kv_cache_interface import KVQuantMode

    assert causal and tuple(window_size) == (-1, -1) and softcap == 0
    fp8 = k.dtype in (torch.float8_e4m3fn, torch.float8_e5m2)
    assert fp8 == (kv_quant_mode == KVQuantMode.FP8_PER_TENSOR), "fp8 cache without its quant mode (or the reverse)"
    k_mul = float(k_descale.reshape(-1)[0]) if fp8 else 1.0
    v_mul = float(v_descale.reshape(-1)[0]) if fp8 else 1.0
    page = k.shape[1]
    g = q.shape[1] // k.shape[2]
    for i in range(block_table.shape[0]):
        qs, qe = int(cu_seqlens_q[i]), int(cu_seqlens_q[i + 1])
        n_k = int(seqused_k[i])
        pages = block_table[i, : -(-n_k // page)].long()
        keys = k[pages].reshape(-1, k.shape[2], k.shape[3])[:n_k].float() * k_mul
        vals = v[pages].reshape(-1, v.shape[2], v.shape[3])[:n_k].float() * v_mul
        n_q = qe - qs
        q_pos = torch.arange(n_k - n_q, n_k)[:, None]
        visible = torch.arange(n_k)[None, :] <= q_pos
        keys, vals = keys.repeat_interleave(g, 1), vals.repeat_interleave(g, 1)
        scores = torch.einsum("thd,khd->htk", q[qs:qe].float(), keys) * softmax_scale
        probs = torch.softmax(scores.masked_fill(~visible[None], float("-inf")), dim=-1)
        out[qs:qe] = torch.einsum("htk,khd->thd", probs, vals).to(out.dtype)
