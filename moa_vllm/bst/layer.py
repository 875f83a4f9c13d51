"""The Block-State Transformer layer, sliding-window form.

    h = RMSNorm(x)
    c = GELU(SSM(h))                                   context states, one per position
                                                       (SSM(h * relu(W h + b)) with ``ssm_input_gate``)
    a = WindowAttn(q_self(h), k(h), v(h))              last W tokens
    s = WindowAttn(q_ctx(h), k_ctx(c), v_ctx(c))       last W context states, own position included
    x = x + Out([a ; s]);  x = x + MLP(RMSNorm(x))

The paper splits the sequence into fixed blocks of W; here every token sees the W positions ending at itself
(sliding window), which is what windowed paged attention serves and gives every position the same context size.
Both attentions use the same mask and head size, so they run as one attention call with 2 * heads heads (self heads
first, context heads second); concatenating head outputs then *is* the paper's concatenation before the projection.
Without the SSM (``use_ssm=False``) the layer is a plain sliding-window transformer layer: the ablation.

Decode state per layer is constant in sequence length: the SSM state plus W keys/values for the 2 * heads heads.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moa_vllm.bst.attention import rotary, windowed_attention
from moa_vllm.bst.config import BSTConfig
from moa_vllm.bst.ssm import S4D


@dataclass(frozen=True)
class BSTLayerState:
    """What one layer carries between chunks; the shapes never depend on how many tokens came before.

    ``keys``/``values``: ``(batch, heads_total, W, head_dim)``, the (rotated) keys and values of the last W
    positions in order, oldest first; heads ``[0, heads)`` are self-attention, ``[heads, 2 heads)`` context states.
    Slots for positions before the start of the sequence hold zeros and are masked out.
    ``ssm``: ``(batch, hidden, state_size)`` complex, or None without the SSM. ``length``: tokens seen so far.
    """

    keys: Tensor
    values: Tensor
    ssm: Tensor | None
    length: int

    def tensors(self) -> list[Tensor]:
        return [t for t in (self.keys, self.values, self.ssm) if t is not None]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors())


class SharedContextKV(nn.Module):
    """SH: the whole SSM output (all channels) is projected to keys/values for every head."""

    def __init__(self, hidden: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.proj = nn.Linear(hidden, 2 * hidden, bias=False)

    def forward(self, ctx: Tensor) -> tuple[Tensor, Tensor]:
        """``ctx`` ``(B, T, hidden)`` -> keys, values ``(B, T, heads, head_dim)``."""
        k, v = self.proj(ctx).unflatten(-1, (2, self.heads, -1)).unbind(-3)
        return k, v


class PerHeadContextKV(nn.Module):
    """MH: head j reads only SSM channels [j*head_dim, (j+1)*head_dim) (a block-diagonal projection)."""

    def __init__(self, hidden: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        head_dim = hidden // heads
        bound = 1 / math.sqrt(head_dim)  # nn.Linear's default init for fan_in = head_dim
        self.weight = nn.Parameter(torch.empty(heads, head_dim, 2 * head_dim).uniform_(-bound, bound))

    def forward(self, ctx: Tensor) -> tuple[Tensor, Tensor]:
        kv = torch.einsum("bthc,hcd->bthd", ctx.unflatten(-1, (self.heads, -1)), self.weight)
        k, v = kv.chunk(2, dim=-1)
        return k, v


class SSMInputGate(nn.Module):
    """u = h * relu(W h + b), per channel and per token; the SSM stays linear time-invariant in u.

    Without it every token, relevant or not, writes into the SSM state, and the sum of what irrelevant tokens wrote
    grows with the sequence: what the model learnt to read at the trained length reads differently at 4-8x that
    length. A ReLU gate can close exactly (a token whose gate is shut adds nothing, however many of them follow),
    which a sigmoid gate only approaches (measured: a sigmoid gate initialised nearly closed still let noise tokens
    write ~1/50 of a signal token, enough to drown it after a thousand of them).
    """

    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.proj = nn.Linear(hidden, hidden)
        nn.init.zeros_(self.proj.bias)

    def forward(self, h: Tensor) -> Tensor:
        return h * torch.relu(self.proj(h))


class BSTLayer(nn.Module):
    """Pre-norm BST layer: SSM context states, sliding-window self- and cross-attention, MLP; residual around both."""

    def __init__(self, config: BSTConfig) -> None:
        super().__init__()
        self.config = config
        d, heads = config.hidden_size, config.num_attention_heads
        self.window = config.sliding_window
        self.heads = heads
        self.heads_total = config.attention_heads_total
        self.head_dim = config.head_dim
        self.attn_norm = nn.RMSNorm(d, eps=config.rms_norm_eps)
        self.q_proj = nn.Linear(d, self.heads_total * self.head_dim, bias=False)  # self and context queries
        self.kv_proj = nn.Linear(d, 2 * d, bias=False)
        if config.use_ssm:
            self.ssm = S4D(d, config.ssm_state_size, config.ssm_init, config.ssm_dt_min, config.ssm_dt_max)
            self.ssm_gate = SSMInputGate(d) if config.ssm_input_gate else None
            self.context_kv = SharedContextKV(d, heads) if config.context_mode == "sh" else PerHeadContextKV(d, heads)
        self.o_proj = nn.Linear(self.heads_total * self.head_dim, d, bias=False)
        self.mlp_norm = nn.RMSNorm(d, eps=config.rms_norm_eps)
        self.mlp = nn.Sequential(
            nn.Linear(d, config.mlp_size, bias=False), nn.GELU(), nn.Linear(config.mlp_size, d, bias=False)
        )

    @property
    def use_ssm(self) -> bool:
        return self.config.use_ssm

    def initial_state(
        self, batch: int, dtype: torch.dtype = torch.float32, device: torch.device | str | None = None
    ) -> BSTLayerState:
        """State before the first token; ``dtype`` is the activation dtype (the SSM state is complex64/128)."""
        if device is None:
            device = self.q_proj.weight.device
        shape = (batch, self.heads_total, self.window, self.head_dim)
        keys = torch.zeros(shape, dtype=dtype, device=device)
        ssm = self.ssm.initial_state(batch, dtype, device) if self.use_ssm else None
        return BSTLayerState(keys=keys, values=torch.zeros_like(keys), ssm=ssm, length=0)

    def forward(self, x: Tensor) -> Tensor:
        """Full sequence ``(batch, L, hidden)`` from an empty state; the SSM runs as one FFT convolution."""
        h = self.attn_norm(x)
        ctx = self.ssm(self.ssm_input(h)) if self.use_ssm else None
        q, k, v = self._qkv(h, ctx, start=0)
        return self._finish(x, windowed_attention(q, k, v, self.window))

    def forward_chunk(self, x: Tensor, state: BSTLayerState) -> tuple[Tensor, BSTLayerState]:
        """The next T tokens ``(batch, T, hidden)`` after ``state``; returns the output and the state after them.

        T = 1 is decode (SSM recurrence step); longer chunks are chunked prefill (FFT plus free response).
        """
        h = self.attn_norm(x)
        ssm_state = state.ssm
        ctx = None
        if self.use_ssm:
            if ssm_state is None:
                raise ValueError("this layer has an SSM but the state carries no SSM state")
            u = self.ssm_input(h)
            if h.shape[1] == 1:
                y, ssm_state = self.ssm.step(u[:, 0], ssm_state)
                ctx = y[:, None]
            else:
                ctx, ssm_state = self.ssm.forward_chunk(u, ssm_state)
        q, k, v = self._qkv(h, ctx, start=state.length)
        attn = windowed_attention(q, k, v, self.window, state.keys, state.values, state.length)
        new_state = replace(
            state,
            keys=torch.cat([state.keys, k], dim=-2)[..., -self.window :, :],
            values=torch.cat([state.values, v], dim=-2)[..., -self.window :, :],
            ssm=ssm_state,
            length=state.length + x.shape[1],
        )
        return self._finish(x, attn), new_state

    def ssm_input(self, h: Tensor) -> Tensor:
        """What the SSM reads: the normed input, through the input gate when the config has one."""
        return h if self.ssm_gate is None else self.ssm_gate(h)

    def _qkv(self, h: Tensor, ctx: Tensor | None, start: int) -> tuple[Tensor, Tensor, Tensor]:
        """Queries, keys, values ``(batch, heads_total, T, head_dim)``, rotated for positions start .. start+T-1."""
        q = self.q_proj(h).unflatten(-1, (self.heads_total, self.head_dim))
        k, v = self.kv_proj(h).unflatten(-1, (2, self.heads, self.head_dim)).unbind(-3)
        if ctx is not None:
            ck, cv = self.context_kv(F.gelu(ctx))
            k, v = torch.cat([k, ck], dim=-2), torch.cat([v, cv], dim=-2)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        positions = start + torch.arange(h.shape[1], device=h.device)
        theta = self.config.rope_theta
        return rotary(q, positions, theta), rotary(k, positions, theta), v

    def _finish(self, x: Tensor, attn: Tensor) -> Tensor:
        """Output projection of the concatenated heads, residual, then the MLP block."""
        x = x + self.o_proj(attn.transpose(1, 2).flatten(-2))
        return x + self.mlp(self.mlp_norm(x))
