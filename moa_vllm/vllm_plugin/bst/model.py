"""BSTForCausalLM for vLLM: the reference model's layers with vLLM's KV cache and state cache underneath.

Per layer, as in :mod:`moa_vllm.bst.layer`: the S4D SSM (:class:`S4DStateLayer`, state in vLLM's per-request state
cache) turns the normed input into context states; their keys/values are concatenated to the token keys/values as
extra heads, and one vLLM ``Attention`` call on the moa backend serves both self-attention and cross-attention to
the context states. Its plan (derived from the config, no file) keeps a ring of exactly W tokens per KV head with
the mask ``q - k < W``; the attention cache therefore holds the last W positions of ``2 * heads`` heads, and the
SSM state one fixed page: per-request memory is constant in sequence length.

Module and parameter names equal the reference model's, so the checkpoint's safetensors load one to one.
Single GPU/CPU process only (no tensor or pipeline parallelism): the model is tiny.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from vllm.config import VllmConfig
from vllm.model_executor.layers.attention import Attention
from vllm.model_executor.models.interfaces import HasInnerState, IsHybrid

from moa_vllm.bst.attention import rotary
from moa_vllm.bst.config import BSTConfig
from moa_vllm.bst.layer import PerHeadContextKV, SharedContextKV, SSMInputGate
from moa_vllm.vllm_plugin.bst.config import bst_config
from moa_vllm.vllm_plugin.bst.state import S4DStateLayer, state_shape
from moa_vllm.vllm_plugin.moa.backend import MoABackend


class BSTDecoderLayer(nn.Module):
    def __init__(self, config: BSTConfig, vllm_config: VllmConfig, prefix: str) -> None:
        super().__init__()
        d, heads = config.hidden_size, config.num_attention_heads
        self.config = config
        self.heads, self.heads_total, self.head_dim = heads, config.attention_heads_total, config.head_dim
        self.attn_norm = nn.RMSNorm(d, eps=config.rms_norm_eps)
        self.q_proj = nn.Linear(d, self.heads_total * self.head_dim, bias=False)
        self.kv_proj = nn.Linear(d, 2 * d, bias=False)
        if config.use_ssm:
            self.ssm = S4DStateLayer(config, prefix=f"{prefix}.ssm")
            self.ssm_gate = SSMInputGate(d) if config.ssm_input_gate else None
            self.context_kv = SharedContextKV(d, heads) if config.context_mode == "sh" else PerHeadContextKV(d, heads)
        # The window W is the moa backend's plan (bst_window_plan: span W, no sinks, i.e. q - k < W), so the layer
        # gets no vLLM-native window: vLLM copies the config's sliding_window into cache_config, which would be a
        # second mask the moa impl refuses.
        self.attn = Attention(
            num_heads=self.heads_total,
            head_size=self.head_dim,
            scale=self.head_dim**-0.5,
            num_kv_heads=self.heads_total,
            cache_config=dataclasses.replace(vllm_config.cache_config, sliding_window=None),
            prefix=f"{prefix}.attn",
            attn_backend=MoABackend,
        )
        self.o_proj = nn.Linear(self.heads_total * self.head_dim, d, bias=False)
        self.mlp_norm = nn.RMSNorm(d, eps=config.rms_norm_eps)
        self.mlp = nn.Sequential(
            nn.Linear(d, config.mlp_size, bias=False), nn.GELU(), nn.Linear(config.mlp_size, d, bias=False)
        )

    def forward(self, positions: Tensor, x: Tensor) -> Tensor:
        """``x`` ``(num_tokens, hidden)``, the flattened batch; ``positions`` each token's position in its request."""
        h = self.attn_norm(x)
        q = self.q_proj(h).unflatten(-1, (self.heads_total, self.head_dim))
        k, v = self.kv_proj(h).unflatten(-1, (2, self.heads, self.head_dim)).unbind(-3)
        if self.config.use_ssm:
            u = h if self.ssm_gate is None else self.ssm_gate(h)
            ck, cv = self.context_kv(F.gelu(self.ssm.contextualize(u))[None])
            k, v = torch.cat([k, ck[0]], dim=-2), torch.cat([v, cv[0]], dim=-2)
        q, k = (self._rotate(t, positions) for t in (q, k))
        attn = self.attn(q.flatten(-2), k.flatten(-2), v.flatten(-2))
        x = x + self.o_proj(attn)
        return x + self.mlp(self.mlp_norm(x))

    def _rotate(self, t: Tensor, positions: Tensor) -> Tensor:
        """The reference's rotary embedding, applied per token at its own position (``t``: tokens, heads, dim)."""
        return rotary(t.transpose(0, 1), positions, self.config.rope_theta).transpose(0, 1)


class BSTForCausalLM(nn.Module, HasInnerState, IsHybrid):
    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        super().__init__()
        config = bst_config(vllm_config.model_config.hf_config)
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(
            BSTDecoderLayer(config, vllm_config, prefix=_join(prefix, f"layers.{i}"))
            for i in range(config.num_hidden_layers)
        )
        self.norm = nn.RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)

    # ---- IsHybrid: the per-request state page, known before the model is built ---------------------------------

    @classmethod
    def get_mamba_state_shape_from_config(cls, vllm_config: VllmConfig) -> tuple[tuple[int, ...]]:
        config = bst_config(vllm_config.model_config.hf_config)
        return (state_shape(config.hidden_size, config.ssm_state_size),)

    @classmethod
    def get_mamba_state_dtype_from_config(cls, vllm_config: VllmConfig) -> tuple[torch.dtype]:
        return (torch.float32,)

    @classmethod
    def get_mamba_state_copy_func(cls) -> tuple:
        """Prefix caching of SSM states (vLLM's "align" mode) is not supported: nothing to copy."""
        return ()

    # ---- vLLM model interface ----------------------------------------------------------------------------------

    def embed_input_ids(self, input_ids: Tensor) -> Tensor:
        return self.embed_tokens(input_ids)

    def forward(
        self,
        input_ids: Tensor | None,
        positions: Tensor,
        intermediate_tensors: object = None,
        inputs_embeds: Tensor | None = None,
        **kwargs: object,
    ) -> Tensor:
        x = inputs_embeds if inputs_embeds is not None else self.embed_input_ids(input_ids)
        for layer in self.layers:
            x = layer(positions, x)
        return self.norm(x)

    def compute_logits(self, hidden_states: Tensor) -> Tensor:
        return self.lm_head(hidden_states)

    def load_weights(self, weights: Iterable[tuple[str, Tensor]]) -> set[str]:
        """Copy checkpoint tensors into the parameters of the same name; unknown names are an error."""
        params = dict(self.named_parameters())
        loaded = set()
        for name, tensor in weights:
            if name not in params:
                raise KeyError(f"checkpoint tensor {name!r} has no parameter in the vLLM BST model")
            with torch.no_grad():
                params[name].copy_(tensor)
            loaded.add(name)
        return loaded


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name
