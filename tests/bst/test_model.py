"""BST causal LM: incremental decode == full forward, causality, ablation, save/load, constant decode state."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from moa_vllm.bst import BSTConfig, BSTForCausalLM
from tests.bst.helpers import VARIANTS, tiny_model, token_ids

L = 40


@pytest.mark.parametrize("variant", list(VARIANTS))
@torch.no_grad()
def test_token_by_token_decode_matches_full_forward(variant: str) -> None:
    model, ids = tiny_model(variant), token_ids(2, L)
    full = model(ids)
    state = model.initial_state(2)
    steps = []
    for t in range(L):
        logits, state = model.forward_chunk(ids[:, t : t + 1], state)
        steps.append(logits)
    torch.testing.assert_close(torch.cat(steps, 1), full, rtol=0, atol=1e-10)


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("bounds", [(0, 40), (0, 5, 6, 40), (0, 13, 26, 39, 40), (0, 8, 16, 24, 32, 40)])
@torch.no_grad()
def test_chunked_prefill_matches_full_forward(variant: str, bounds: tuple[int, ...]) -> None:
    model, ids = tiny_model(variant), token_ids(2, L)
    state = model.initial_state(2)
    chunks = []
    for a, b in zip(bounds, bounds[1:]):
        logits, state = model.forward_chunk(ids[:, a:b], state)
        chunks.append(logits)
    torch.testing.assert_close(torch.cat(chunks, 1), model(ids), rtol=0, atol=1e-10)


@pytest.mark.parametrize("variant", list(VARIANTS))
@torch.no_grad()
def test_causal(variant: str) -> None:
    model, ids = tiny_model(variant), token_ids(1, L)
    position = 21
    changed = ids.clone()
    changed[0, position] = (ids[0, position] + 1) % 50
    a, b = model(ids), model(changed)
    torch.testing.assert_close(b[:, :position], a[:, :position], rtol=0, atol=1e-12)
    assert not torch.allclose(b[:, position], a[:, position])


@torch.no_grad()
def test_generate_greedy_matches_naive_greedy() -> None:
    model, prompt = tiny_model("sh"), token_ids(2, 11)
    out = model.generate_greedy(prompt, max_new_tokens=12)
    assert out.shape == (2, 23) and torch.equal(out[:, :11], prompt)
    seq = prompt
    for _ in range(12):
        seq = torch.cat([seq, model(seq)[:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(out, seq)
    one = model.generate_greedy(prompt[0], max_new_tokens=3)
    assert one.dim() == 1 and torch.equal(one, out[0, :14])


def test_no_ssm_ablation_has_no_ssm_parameters() -> None:
    ablation, bst = tiny_model("no_ssm"), tiny_model("sh")
    names = [n for n, _ in ablation.named_parameters()]
    assert not [n for n in names if "ssm" in n or "context" in n]
    assert any(".ssm." in n for n, _ in bst.named_parameters())
    assert sum(p.numel() for p in ablation.parameters()) < sum(p.numel() for p in bst.parameters())
    assert all(state.ssm is None for state in ablation.initial_state(1))


@pytest.mark.parametrize("variant", list(VARIANTS))
@torch.no_grad()
def test_decode_state_size_is_independent_of_length(variant: str) -> None:
    model = tiny_model(variant, dtype=torch.float32)

    def state_after(n: int) -> list[tuple[tuple[int, ...], torch.dtype]]:
        ids = token_ids(1, n)
        state = model.initial_state(1)
        for a in range(0, n - 1, 256):  # chunked prefill, then one decode step
            _, state = model.forward_chunk(ids[:, a : min(a + 256, n - 1)], state)
        _, state = model.forward_chunk(ids[:, n - 1 :], state)
        assert [s.length for s in state] == [n] * len(state)
        return [(tuple(t.shape), t.dtype) for s in state for t in s.tensors()]

    short, long = state_after(100), state_after(1000)
    assert short == long
    if variant != "no_ssm":
        assert torch.complex64 in {dtype for _, dtype in long}  # SSM state stays complex64 in a float32 model


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("variant", ["sh", "mh"])
@torch.no_grad()
def test_save_load_round_trip(tmp_path: Path, variant: str, dtype: torch.dtype) -> None:
    model, ids = tiny_model(variant, dtype=dtype), token_ids(2, 20)
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["architectures"] == ["BSTForCausalLM"] and config["model_type"] == "bst"
    assert config["torch_dtype"] == str(dtype).removeprefix("torch.")
    assert (tmp_path / "model.safetensors").is_file()
    loaded = BSTForCausalLM.from_pretrained(tmp_path)
    assert loaded.config == model.config and loaded.dtype == dtype
    assert torch.equal(loaded(ids), model(ids))


def test_config_round_trip_and_validation() -> None:
    config = BSTConfig(context_mode="mh", ssm_init="inv", use_ssm=True)
    assert BSTConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ValueError):
        BSTConfig.from_dict({**config.to_dict(), "hidden_sise": 3})
    with pytest.raises(ValueError):
        BSTConfig.from_dict({**config.to_dict(), "model_type": "llama"})
    with pytest.raises(ValueError):
        BSTConfig(hidden_size=30, num_attention_heads=4)
    with pytest.raises(ValueError):
        BSTConfig(context_mode="mf")  # type: ignore[arg-type]
