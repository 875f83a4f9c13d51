"""Profiling on a tiny random GQA llama: the recomputed influence equals autograd through an eager attention."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch
from transformers import (
    AttentionInterface,
    AttentionMaskInterface,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)
from transformers.masking_utils import sdpa_mask

from moa_vllm.planner import profile as prof
from moa_vllm.planner.influence import block_sums, influence, offset_sums
from tests.planner.tiny_llama import tiny_config

EAGER_STORE = "test_eager_store"
_STORED: dict[int, torch.Tensor] = {}


def _eager_storing(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """Plain causal attention that keeps A (with its gradient) per layer."""
    group = query.shape[1] // key.shape[1]
    key, value = key.repeat_interleave(group, 1), value.repeat_interleave(group, 1)
    n = query.shape[2]
    scores = (query @ key.transpose(-1, -2)) * scaling
    attn = scores.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf")).softmax(-1)
    attn.retain_grad()
    _STORED[module.layer_idx] = attn
    return (attn @ value).transpose(1, 2), None


AttentionInterface.register(EAGER_STORE, _eager_storing)
AttentionMaskInterface.register(EAGER_STORE, sdpa_mask)


@pytest.fixture(scope="module")
def tiny_model() -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(tiny_config(vocab_size=97, layers=2, heads=6, kv_heads=2)).eval().requires_grad_(False)


def _reference_loss(model, ids: torch.Tensor, answer_start: int, context_weight: float) -> torch.Tensor:
    """The profiled loss written out with the model's own forward: mean answer CE + weight x mean context CE."""
    embeds = model.get_input_embeddings()(ids[None]).detach().requires_grad_(True)
    logits = model(inputs_embeds=embeds).logits[0, :-1].float()
    ce = torch.nn.functional.cross_entropy(logits, ids[1:], reduction="none")
    return ce[answer_start - 1 :].mean() + context_weight * ce[: answer_start - 1].mean()


def _autograd_reference(model, ids: list[int], answer_start: int, sinks: int, block: int, context_weight=1.0):
    model.set_attn_implementation(EAGER_STORE)
    _STORED.clear()
    loss = _reference_loss(model, torch.tensor(ids), answer_start, context_weight)
    loss.backward()
    blocks, offsets = [], []
    for layer in range(len(_STORED)):
        attn, grad = _STORED[layer][0].detach(), _STORED[layer].grad[0]
        heads, kv_heads = attn.shape[0], model.config.num_key_value_heads
        e = torch.stack([influence(attn[h], grad[h]).abs().tril() for h in range(heads)])
        per_kv = e.view(kv_heads, heads // kv_heads, *e.shape[1:]).sum(1)  # GQA: sum over the query group
        blocks.append(torch.stack([block_sums(x, block) for x in per_kv]))
        offsets.append(torch.stack([offset_sums(x, sinks) for x in per_kv]))
    return torch.stack(blocks).double().numpy(), torch.stack(offsets).double().numpy(), float(loss.detach())


def test_recomputed_influence_matches_autograd_through_eager_attention(tiny_model):
    ids = torch.randint(0, 97, (90,), generator=torch.Generator().manual_seed(1)).tolist()
    ref_blocks, ref_offsets, ref_loss = _autograd_reference(tiny_model, ids, 70, sinks=4, block=16)
    prof.use_capture_attention(tiny_model)
    got = prof.sample_influence(tiny_model, ids, 70, sinks=4, block=16)
    assert got.blocks.shape == (2, 2, 6, 6) and got.offsets.shape == (2, 2, 90)
    assert got.loss == pytest.approx(ref_loss, rel=1e-5)
    np.testing.assert_allclose(got.blocks, ref_blocks, rtol=1e-4, atol=1e-9)
    np.testing.assert_allclose(got.offsets, ref_offsets, rtol=1e-4, atol=1e-9)
    assert got.offsets.sum() > 0


@pytest.mark.parametrize("family", ["qwen2", "mistral"])
def test_other_families_profile_like_autograd(family: str):
    """qwen2 (q/k/v biases) and mistral load through the same attention interface; GQA 4 -> 2."""
    fields = tiny_config(vocab_size=61, heads=4, kv_heads=2).to_dict()
    keep = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
    kwargs = {k: fields[k] for k in keep} | {"num_key_value_heads": 2, "max_position_embeddings": 256}
    torch.manual_seed(3)
    if family == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(**kwargs))
    else:
        model = MistralForCausalLM(MistralConfig(sliding_window=None, **kwargs))
    model.eval().requires_grad_(False)
    ids = torch.randint(0, 61, (50,), generator=torch.Generator().manual_seed(2)).tolist()
    ref_blocks, ref_offsets, _ = _autograd_reference(model, ids, 40, sinks=2, block=8)
    prof.use_capture_attention(model)
    got = prof.sample_influence(model, ids, 40, sinks=2, block=8)
    np.testing.assert_allclose(got.blocks, ref_blocks, rtol=1e-4, atol=1e-9)
    np.testing.assert_allclose(got.offsets, ref_offsets, rtol=1e-4, atol=1e-9)


def test_answer_only_loss_leaves_the_last_layer_blind_to_the_context(tiny_model):
    """With context weight 0 only answer-predicting rows carry loss: the last layer's prompt rows get no gradient.
    With the context part every layer sees gradient on prompt rows too."""
    prof.use_capture_attention(tiny_model)
    ids = list(range(1, 61))
    answer_only = prof.sample_influence(tiny_model, ids, 40, sinks=0, block=1, context_weight=0.0)  # token level
    assert np.all(answer_only.blocks[:, :, 59, :] == 0)  # the last position predicts nothing
    assert np.all(answer_only.blocks[:, :, 39:59, :].sum(axis=-1) > 0)
    assert np.all(answer_only.blocks[-1, :, 1:39, :] == 0)  # last layer, prompt rows: no gradient
    assert np.all(np.triu(answer_only.blocks, 1) == 0)  # causal part only
    with_context = prof.sample_influence(tiny_model, ids, 40, sinks=0, block=1, context_weight=1.0)
    assert np.all(with_context.blocks[-1, :, 1:39, :].sum(axis=-1) > 0)
    assert with_context.context_loss > 0 and with_context.answer_loss > 0
    assert with_context.loss == pytest.approx(with_context.answer_loss + with_context.context_loss, rel=1e-6)


def test_answer_only_influence_matches_autograd(tiny_model):
    ids = torch.randint(0, 97, (70,), generator=torch.Generator().manual_seed(4)).tolist()
    ref_blocks, ref_offsets, ref_loss = _autograd_reference(tiny_model, ids, 50, 4, 16, context_weight=0.0)
    prof.use_capture_attention(tiny_model)
    got = prof.sample_influence(tiny_model, ids, 50, sinks=4, block=16, context_weight=0.0)
    assert got.loss == pytest.approx(ref_loss, rel=1e-5)
    np.testing.assert_allclose(got.offsets, ref_offsets, rtol=1e-4, atol=1e-9)


def test_level_accumulator_averages_samples_of_shorter_length():
    acc = prof.LevelAccumulator.empty(128, layers=1, kv_heads=1, block=64)
    short = prof.SampleInfluence(np.ones((1, 1, 1, 1)), np.ones((1, 1, 60)), 1.0)
    full = prof.SampleInfluence(np.full((1, 1, 2, 2), 3.0), np.full((1, 1, 128), 3.0), 2.0)
    acc.add(short)
    acc.add(full)
    assert acc.mean_blocks()[0, 0, 0, 0] == 2.0 and acc.mean_blocks()[0, 0, 1, 1] == 1.5
    assert acc.mean_offsets()[0, 0, 0] == 2.0 and acc.mean_offsets()[0, 0, 100] == 1.5
    with pytest.raises(ValueError):
        acc.add(prof.SampleInfluence(np.ones((1, 1, 3, 3)), np.ones((1, 1, 129)), 0.0))


def test_planner_imports_no_vllm():
    code = (
        "import sys; import moa_vllm.planner.cli, moa_vllm.planner.chain, moa_vllm.planner.profile, "
        "moa_vllm.planner.calibrate, moa_vllm.planner.report; "
        "bad = [m for m in sys.modules if m == 'vllm' or m.startswith('vllm.')]; assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
