"""Profiling: per-KV-head attention influence of a HF llama / qwen2 / mistral model on calibration samples.

One forward + backward with ordinary (flash) attention captures, per layer, the post-RoPE Q, K, V and dL/dO (the
gradient at the attention output, before o_proj). Afterwards each head's attention A and G = dL/dA = dL/dO V^T are
recomputed exactly, one layer and one head at a time, so no L x L matrix is ever stored: at 4k tokens one head's
matrices are a few 64 MiB tensors.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from transformers import AttentionInterface, AttentionMaskInterface
from transformers.masking_utils import sdpa_mask

from moa_vllm.planner.influence import BLOCK, block_sums, head_influence, offset_sums

CAPTURE_ATTENTION = "moa_influence_capture"


@dataclass
class LayerCapture:
    q: torch.Tensor  # [heads, L, d], post-RoPE
    k: torch.Tensor  # [kv_heads, L, d], post-RoPE
    v: torch.Tensor  # [kv_heads, L, d]
    scaling: float
    grad_out: torch.Tensor | None = None  # [heads, L, d]: dL/dO


@dataclass
class Capture:
    layers: dict[int, LayerCapture] = field(default_factory=dict)


_ACTIVE: list[Capture] = []  # the capture the attention function records into (at most one): use capturing()


@contextmanager
def capturing() -> Iterator[Capture]:
    """Within the block, every forward of a model using the capture attention records each layer's Q, K, V (and,
    after a backward, dL/dO) into the yielded Capture."""
    capture = Capture()
    _ACTIVE.append(capture)
    try:
        yield capture
    finally:
        _ACTIVE.remove(capture)


def _capturing_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """Causal attention of one unpadded sequence that also records its inputs and output gradient.

    The attention mask is not used: profiling runs one sequence without padding, where the mask is plain causal.
    K/V are expanded to the query heads so torch picks its memory-efficient flash kernel (no L x L matrix saved).
    """
    group = query.shape[1] // key.shape[1]
    k_full = key.repeat_interleave(group, dim=1) if group > 1 else key
    v_full = value.repeat_interleave(group, dim=1) if group > 1 else value
    out = F.scaled_dot_product_attention(query, k_full, v_full, is_causal=True, scale=scaling)
    out = out.transpose(1, 2).contiguous()  # [B, L, heads, d], what HF attention functions return
    if _ACTIVE:
        record = LayerCapture(query.detach()[0], key.detach()[0], value.detach()[0], float(scaling))
        _ACTIVE[-1].layers[module.layer_idx] = record
        if out.requires_grad:
            out.register_hook(lambda g, r=record: setattr(r, "grad_out", g.detach()[0].transpose(0, 1)))
    return out, None


AttentionInterface.register(CAPTURE_ATTENTION, _capturing_attention)
AttentionMaskInterface.register(CAPTURE_ATTENTION, sdpa_mask)


def use_capture_attention(model) -> None:
    model.set_attn_implementation(CAPTURE_ATTENTION)


@dataclass(frozen=True)
class LossParts:
    """Mean cross-entropy of the answer tokens and of the context (prompt) tokens, and the profiled combination."""

    answer: torch.Tensor
    context: torch.Tensor
    total: torch.Tensor


def loss_parts(logits: torch.Tensor, ids: torch.Tensor, answer_start: int, context_weight: float) -> LossParts:
    """logits [L - 1, vocab] predicting ids[1:]. The context part (next-token loss over the prompt) reaches every
    layer's attention at every position, so late layers are seen too; the answer part measures the retrieval."""
    ce = F.cross_entropy(logits.float(), ids[1:], reduction="none")
    answer = ce[answer_start - 1 :].mean()
    context = ce[: answer_start - 1].mean() if answer_start > 1 else ce.new_zeros(())
    return LossParts(answer, context, answer + context_weight * context)


def decoder_logits(model, embeds: torch.Tensor, first: int) -> torch.Tensor:
    """Logits [L - 1 - first, vocab] of positions first .. L-2 (each predicting the next token)."""
    hidden = model.get_decoder()(inputs_embeds=embeds, use_cache=False).last_hidden_state[0]
    return model.get_output_embeddings()(hidden[first:-1])


def calibration_loss(model, ids: torch.Tensor, answer_start: int, context_weight: float = 1.0) -> LossParts:
    """The profiled loss: mean answer CE + context_weight * mean context CE. With context_weight 0 only answer
    positions get logits. The input embeddings are the leaf that requires grad: weights need no gradient."""
    embeds = model.get_input_embeddings()(ids[None]).detach().requires_grad_(True)
    if context_weight == 0.0:
        logits = decoder_logits(model, embeds, answer_start - 1)
        answer = F.cross_entropy(logits.float(), ids[answer_start:])
        return LossParts(answer, answer.new_zeros(()), answer)
    return loss_parts(decoder_logits(model, embeds, 0), ids, answer_start, context_weight)


@dataclass
class SampleInfluence:
    blocks: np.ndarray  # float64 [layers, kv_heads, nb, nb]: block sums of |E|, summed over each query group
    offsets: np.ndarray  # float64 [layers, kv_heads, L]: per-offset sums of |E| over keys beyond the sinks
    loss: float
    answer_loss: float = 0.0
    context_loss: float = 0.0


def layer_influence(rec: LayerCapture, sinks: int, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Block and offset sums [kv_heads, ...] of one layer, each KV head summing its query group."""
    heads, kv_heads = rec.q.shape[0], rec.k.shape[0]
    group = heads // kv_heads
    blocks, offsets = [], []
    for kvh in range(kv_heads):
        b_sum, o_sum = None, None
        for h in range(kvh * group, (kvh + 1) * group):
            e = head_influence(rec.q[h], rec.k[kvh], rec.v[kvh], rec.grad_out[h], rec.scaling)
            b, o = block_sums(e, block), offset_sums(e, sinks)
            b_sum, o_sum = (b, o) if b_sum is None else (b_sum + b, o_sum + o)
            del e
        blocks.append(b_sum)
        offsets.append(o_sum)
    return torch.stack(blocks), torch.stack(offsets)


def sample_influence(
    model, ids: list[int], answer_start: int, sinks: int, block: int = BLOCK, context_weight: float = 1.0
) -> SampleInfluence:
    """Influence of every head on one sample (model must use the capture attention)."""
    device = next(model.parameters()).device
    with capturing() as capture, torch.enable_grad():
        parts = calibration_loss(model, torch.tensor(ids, device=device), answer_start, context_weight)
        parts.total.backward()
    num_layers = len(capture.layers)
    blocks, offsets = [], []
    with torch.no_grad():
        for layer in range(num_layers):
            rec = capture.layers.pop(layer)  # frees this layer's captures once reduced
            if rec.grad_out is None:
                raise RuntimeError(f"no gradient reached the attention output of layer {layer}")
            b, o = layer_influence(rec, sinks, block)
            blocks.append(b.double().cpu().numpy())
            offsets.append(o.double().cpu().numpy())
    return SampleInfluence(
        np.stack(blocks),
        np.stack(offsets),
        float(parts.total.detach()),
        float(parts.answer.detach()),
        float(parts.context.detach()),
    )


@dataclass
class LevelAccumulator:
    """Running sums of one length level; the mean over samples is what the planner uses."""

    length: int
    blocks: np.ndarray
    offsets: np.ndarray
    count: int = 0
    losses: list[float] = field(default_factory=list)
    each: list[np.ndarray] = field(default_factory=list)  # per-sample offsets [layers, kv_heads, length]

    @classmethod
    def empty(cls, length: int, layers: int, kv_heads: int, block: int = BLOCK) -> LevelAccumulator:
        nb = -(-length // block)
        return cls(length, np.zeros((layers, kv_heads, nb, nb)), np.zeros((layers, kv_heads, length)))

    def add(self, s: SampleInfluence) -> None:
        """Samples may be shorter than the level; their influence fills the leading blocks and offsets."""
        nb, n = s.blocks.shape[-1], s.offsets.shape[-1]
        if n > self.length:
            raise ValueError(f"sample of {n} tokens is longer than its level {self.length}")
        self.blocks[..., :nb, :nb] += s.blocks
        self.offsets[..., :n] += s.offsets
        one = np.zeros(self.offsets.shape)
        one[..., :n] = s.offsets
        self.each.append(one)
        self.count += 1
        self.losses.append(s.loss)

    def mean_blocks(self) -> np.ndarray:
        return self.blocks / max(self.count, 1)

    def mean_offsets(self) -> np.ndarray:
        return self.offsets / max(self.count, 1)

    def offsets_each(self) -> np.ndarray:
        """[samples, layers, kv_heads, length]: what split-half reliability and the diagnostic need."""
        return np.stack(self.each) if self.each else np.zeros((0, *self.offsets.shape))
