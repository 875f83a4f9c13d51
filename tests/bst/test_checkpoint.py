"""Checkpoint folders: model, task and metrics come back as they were saved."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from moa_vllm.bst.checkpoint import load_checkpoint, save_checkpoint
from moa_vllm.bst.tasks import RecallTask
from tests.bst.helpers import tiny_model, token_ids


@torch.no_grad()
def test_round_trip(tmp_path: Path) -> None:
    model, task = tiny_model("sh", dtype=torch.float32), RecallTask(seq_len=40, signal_region=8)
    metrics = {"eval_accuracy": 0.5, "train_wall_s": 1.0}
    save_checkpoint(model, tmp_path, task, metrics)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["architectures"] == ["BSTForCausalLM"] and config["model_type"] == "bst"
    loaded = load_checkpoint(tmp_path)
    assert loaded.task == task and loaded.metrics == metrics
    ids = token_ids(2, 30)
    assert torch.equal(loaded.model(ids), model(ids))
    assert not loaded.model.training


def test_metrics_are_optional(tmp_path: Path) -> None:
    save_checkpoint(tiny_model("no_ssm"), tmp_path, RecallTask(seq_len=40, signal_region=8), {})
    (tmp_path / "metrics.json").unlink()
    assert load_checkpoint(tmp_path).metrics == {}
