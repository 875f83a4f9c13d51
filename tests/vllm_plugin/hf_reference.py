"""Independent reference for sparse plans: the HF transformers model with dense per-head masks.

Nothing here shares code with the plugin's kernel path: no paging, no tiling, a full [q, k] mask per KV head built
from the plan's spans at the request's N, applied in a plain eager attention registered with transformers.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AttentionInterface, AutoModelForCausalLM

from moa_vllm.plan import Plan
from moa_vllm.plan.span import served_length
from moa_vllm.vllm_plugin.settings import DEFAULT_SPAN_GRID

_ACTIVE: dict[str, object] = {}  # plan and N of the generation in progress


def _masked_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    plan: Plan = _ACTIVE["plan"]
    n, cap = _ACTIVE["n"]  # (span length, the request's own N)
    if _ACTIVE.get("kv_quant") is not None:  # fp8 KV: every key and value as the cache holds it
        quant, scales = _ACTIVE["kv_quant"]
        ks, vs = scales[module.layer_idx]
        key, value = _as_fp8(key, quant, ks), _as_fp8(value, quant, vs)
    _, hq, q_len, _ = query.shape
    hkv, k_len = key.shape[1], key.shape[2]
    windows = torch.tensor(plan.windows(n, cap)[module.layer_idx])  # [Hkv]
    q_pos = torch.arange(k_len - q_len, k_len)[:, None]
    k_pos = torch.arange(k_len)[None, :]
    mask = (k_pos <= q_pos) & ((k_pos < plan.sink_tokens) | (q_pos - k_pos < windows[:, None, None]))
    mask = mask.repeat_interleave(hq // hkv, dim=0)  # [Hq, q, k]
    k = key.repeat_interleave(hq // hkv, dim=1)
    v = value.repeat_interleave(hq // hkv, dim=1)
    scores = (query @ k.transpose(-1, -2)) * scaling
    scores = scores.masked_fill(~mask[None], float("-inf"))
    out = scores.softmax(-1) @ v
    return out.transpose(1, 2).contiguous(), None


def _as_fp8(x: torch.Tensor, quant: torch.dtype, scale: float) -> torch.Tensor:
    """x stored as float8 of x / scale (nearest, saturated) and read back."""
    limit = torch.finfo(quant).max
    return ((x / scale).clamp(-limit, limit).to(quant).to(x.dtype)) * scale


AttentionInterface.register("moa_reference", _masked_attention)


@dataclass
class Greedy:
    tokens: list[int]
    top5: list[list[int]]
    logprobs: list[float]  # of the chosen token


class ReferenceLM:
    def __init__(self, model_dir: Path) -> None:
        self.model = AutoModelForCausalLM.from_pretrained(
            model_dir, dtype=torch.float32, attn_implementation="moa_reference"
        ).eval()

    @torch.no_grad()
    def greedy(
        self,
        prompt: list[int],
        max_tokens: int,
        plan: Plan,
        max_model_len: int,
        span_grid: int = DEFAULT_SPAN_GRID,
        kv_quant: tuple[torch.dtype, list[tuple[float, float]]] | None = None,
    ) -> Greedy:
        """Greedy tokens under the plan's masks for N as the engine sizes it (its span grid: prefix caching is on by
        default). kv_quant: (float8 type, per-layer (k_scale, v_scale)) to see K/V as an fp8 cache holds them."""
        _ACTIVE.update(plan=plan, n=served_length(len(prompt), max_tokens, max_model_len, span_grid), kv_quant=kv_quant)
        ids = torch.tensor([prompt])
        out = self.model(ids, use_cache=True)
        tokens, top5, logprobs = [], [], []
        for _ in range(max_tokens):
            logits = out.logits[0, -1].float()
            tok = int(logits.argmax())
            tokens.append(tok)
            top5.append(logits.topk(5).indices.tolist())
            logprobs.append(float(logits.log_softmax(-1)[tok]))
            out = self.model(torch.tensor([[tok]]), past_key_values=out.past_key_values, use_cache=True)
        return Greedy(tokens, top5, logprobs)
