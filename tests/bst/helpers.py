"""Tiny BST models for fast float64 tests: W=8 so that 40-token inputs slide the window several times."""

from __future__ import annotations

import dataclasses

import torch

from moa_vllm.bst import BSTConfig, BSTForCausalLM

VARIANTS = {
    "sh": {"use_ssm": True, "context_mode": "sh"},
    "mh": {"use_ssm": True, "context_mode": "mh"},
    "no_ssm": {"use_ssm": False},
    "gated": {"use_ssm": True, "context_mode": "sh", "ssm_input_gate": True},
}


def open_gates(module: torch.nn.Module) -> torch.nn.Module:
    """Bias +1 on every SSM input gate, so most gates are open: with the init's half-shut gates the SSM's share of
    the output is smaller, and equivalence tests should notice a path that skips the gate."""
    from moa_vllm.bst.layer import SSMInputGate

    for m in module.modules():
        if isinstance(m, SSMInputGate):
            torch.nn.init.constant_(m.proj.bias, 1.0)
    return module


def tiny_config(**overrides: object) -> BSTConfig:
    base = BSTConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, sliding_window=8)
    # dt_max 0.5 gives the SSM memories both shorter and longer than the window.
    return dataclasses.replace(base, ssm_dt_max=0.5, **overrides)


def tiny_model(variant: str = "sh", seed: int = 0, dtype: torch.dtype = torch.float64, **overrides: object):
    torch.manual_seed(seed)
    # Larger-than-default init so logits vary enough for decode/causality comparisons to mean something.
    config = tiny_config(initializer_range=0.2, **VARIANTS[variant], **overrides)
    return open_gates(BSTForCausalLM(config)).to(dtype).eval()


def token_ids(batch: int, length: int, seed: int = 1, vocab: int = 50) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))
