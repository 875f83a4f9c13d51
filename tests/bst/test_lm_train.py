"""LM training: it learns, both variants see the same data, and an interrupted run resumes to the same weights."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from moa_vllm.bst.lm_train import LMTrainSettings, close_context_path, lm_config, train_lm
from moa_vllm.bst.model import BSTForCausalLM
from tests.bst.helpers import tiny_config

# A stream with structure a tiny model can pick up quickly: a repeated random phrase.
STREAM = torch.randint(0, 50, (37,), generator=torch.Generator().manual_seed(0)).repeat(40).int()
SETTINGS = LMTrainSettings(steps=6, tokens_per_step=64, seq_lengths=(16, 32), warmup_steps=2, checkpoint_every=3)


class Stop(Exception):
    pass


def weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_training_lowers_the_loss(tmp_path: Path) -> None:
    settings = LMTrainSettings(
        steps=30, tokens_per_step=64, seq_lengths=(16, 32), lr=1e-2, warmup_steps=2, checkpoint_every=5
    )
    records: list[dict] = []
    _, summary = train_lm(tiny_config(), STREAM, settings, tmp_path, records.append)
    assert [r["step"] for r in records] == [5, 10, 15, 20, 25, 30]
    assert [r["length"] for r in records[:2]] == [16, 32]  # the 5th step (index 4) ran 16, the 10th ran 32
    assert records[-1]["loss"] < 0.6 * records[0]["loss"]
    assert summary["steps"] == 30 and summary["tokens_seen"] == 30 * 64


def test_interrupted_training_resumes_to_identical_weights(tmp_path: Path) -> None:
    straight, _ = train_lm(tiny_config(), STREAM, SETTINGS, tmp_path / "straight")

    def stop_after_first_checkpoint(record: dict) -> None:
        raise Stop

    with pytest.raises(Stop):
        train_lm(tiny_config(), STREAM, SETTINGS, tmp_path / "resumed", stop_after_first_checkpoint)
    resumed, summary = train_lm(tiny_config(), STREAM, SETTINGS, tmp_path / "resumed")
    assert summary["steps"] == 6
    expected, got = weights(straight), weights(resumed)
    assert all(torch.equal(expected[k], got[k]) for k in expected)


def test_resume_refuses_other_settings(tmp_path: Path) -> None:
    train_lm(tiny_config(), STREAM, SETTINGS, tmp_path)
    other = LMTrainSettings(steps=9, tokens_per_step=64, seq_lengths=(16, 32), warmup_steps=2, checkpoint_every=3)
    with pytest.raises(ValueError, match="another config or settings"):
        train_lm(tiny_config(), STREAM, other, tmp_path)


def test_settings_and_config_checks() -> None:
    with pytest.raises(ValueError, match="must divide"):
        LMTrainSettings(tokens_per_step=100, seq_lengths=(30,))
    bst, base = lm_config(4096), lm_config(4096, use_ssm=False)
    assert bst.sliding_window == base.sliding_window and bst.hidden_size == base.hidden_size
    assert bst.use_ssm and not base.use_ssm


def test_bst_starts_as_its_windowed_baseline_and_learns_the_context_path(tmp_path: Path) -> None:
    torch.manual_seed(0)
    bst = BSTForCausalLM(tiny_config())
    close_context_path(bst)
    baseline = BSTForCausalLM(tiny_config(use_ssm=False))
    # Copy the shared weights; the baseline's attention has only the self heads' queries and output columns.
    shared = {k: v for k, v in bst.state_dict().items() if k in baseline.state_dict()}
    heads = bst.config.num_attention_heads * bst.config.head_dim
    for name, value in shared.items():
        if name.endswith("q_proj.weight"):
            shared[name] = value[:heads]
        elif name.endswith("o_proj.weight"):
            shared[name] = value[:, :heads]
    baseline.load_state_dict(shared)
    ids = STREAM[None, :48].long()
    torch.testing.assert_close(bst(ids), baseline(ids))
    trained, _ = train_lm(tiny_config(), STREAM, SETTINGS, tmp_path)
    assert all(p.abs().sum() > 0 for layer in trained.layers for p in layer.context_kv.parameters())
