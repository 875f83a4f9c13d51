"""Trained BST checkpoints: an HF-style model folder plus the task it was trained on and its training metrics.

DIR/config.json         BSTConfig, architectures ["BSTForCausalLM"], model_type "bst" (what vLLM reads)
DIR/model.safetensors   weights
DIR/task.json           the task's parameters, so held-out samples can be drawn again (benchmarks, tests)
DIR/metrics.json        training wall time, eval accuracy, the command that made it
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from moa_vllm.bst.model import BSTForCausalLM
from moa_vllm.bst.tasks import Task, task_from_dict

TASK_NAME = "task.json"
METRICS_NAME = "metrics.json"


@dataclass
class Checkpoint:
    model: BSTForCausalLM
    task: Task
    metrics: dict[str, Any]


def save_checkpoint(model: BSTForCausalLM, folder: str | Path, task: Task, metrics: dict[str, Any]) -> Path:
    """Write the model folder, ``task.json`` and ``metrics.json`` into ``folder``."""
    path = model.save_pretrained(folder)
    (path / TASK_NAME).write_text(json.dumps(task.to_dict(), indent=2) + "\n")
    (path / METRICS_NAME).write_text(json.dumps(metrics, indent=2) + "\n")
    return path


def load_checkpoint(folder: str | Path, dtype: torch.dtype | None = None) -> Checkpoint:
    """Inverse of :func:`save_checkpoint`; the model comes back in eval mode."""
    path = Path(folder)
    model = BSTForCausalLM.from_pretrained(path, dtype=dtype)
    task = task_from_dict(json.loads((path / TASK_NAME).read_text()))
    metrics_file = path / METRICS_NAME
    metrics = json.loads(metrics_file.read_text()) if metrics_file.is_file() else {}
    return Checkpoint(model=model, task=task, metrics=metrics)
