"""Training: schedule, evaluation counting, a few real steps, the written folder and the CLI (tiny sizes only)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from moa_vllm import cli
from moa_vllm.bst.checkpoint import load_checkpoint
from moa_vllm.bst.model import BSTForCausalLM
from moa_vllm.bst.tasks import RecallTask
from moa_vllm.bst.train import TrainSettings, evaluate, held_out, lr_factor, make_optimizer, run, train
from tests.bst.helpers import tiny_config

TINY_TASK = {"seq_len": 24, "signal_region": 4}
TINY_MODEL = {"hidden_size": 32, "num_attention_heads": 2, "sliding_window": 8, "ssm_state_size": 4}


class Oracle(nn.Module):
    """Predicts the recall answer by reading it off the input (the only signal token), or always ``constant``."""

    def __init__(self, task: RecallTask, constant: int | None = None) -> None:
        super().__init__()
        self.task, self.constant = task, constant

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        logits = torch.zeros(*ids.shape, self.task.vocab_size)
        if self.constant is not None:
            logits[..., self.constant] = 1
        else:
            signal = torch.where(ids < self.task.num_signals, ids, 0).sum(1)
            logits[torch.arange(ids.shape[0]), -1, signal] = 1
        return logits


def test_lr_schedule_warms_up_then_decays_to_a_tenth() -> None:
    s = TrainSettings(steps=100, warmup_steps=10)
    assert lr_factor(0, s) == pytest.approx(0.1) and lr_factor(9, s) == pytest.approx(1.0)
    assert lr_factor(10, s) == pytest.approx(1.0) and lr_factor(100, s) == pytest.approx(0.1)
    values = [lr_factor(i, s) for i in range(10, 101)]
    assert all(a >= b for a, b in zip(values, values[1:]))


def test_evaluate_counts_right_answers() -> None:
    task = RecallTask(seq_len=32, signal_region=8)
    prompts, answers = held_out(task, 256, seed=0)
    assert evaluate(Oracle(task), prompts, answers, batch_size=100) == {"token_accuracy": 1.0, "exact_match": 1.0}
    zero = evaluate(Oracle(task, constant=0), prompts, answers)
    assert zero["token_accuracy"] == pytest.approx((answers == 0).float().mean().item())


def test_held_out_set_differs_from_training_batches() -> None:
    task = RecallTask(seq_len=32, signal_region=8)
    train_prompts, _ = task.sample(8, torch.Generator().manual_seed(0))
    eval_prompts, _ = held_out(task, 8, seed=0)
    assert not torch.equal(train_prompts, eval_prompts)


def test_a_few_steps_lower_the_loss_and_move_the_ssm() -> None:
    torch.manual_seed(0)
    task = RecallTask(**TINY_TASK)
    model = BSTForCausalLM(tiny_config(vocab_size=task.vocab_size, initializer_range=0.02))
    log_dt = model.layers[0].ssm.log_dt.detach().clone()
    losses = train(model, task, TrainSettings(steps=40, batch_size=16, warmup_steps=5))
    assert len(losses) == 40 and not model.training
    assert sum(losses[-10:]) / 10 < sum(losses[:5]) / 5
    assert not torch.equal(model.layers[0].ssm.log_dt, log_dt)


@pytest.mark.parametrize("use_ssm", [True, False])
def test_run_writes_a_loadable_folder_with_consistent_metrics(tmp_path: Path, use_ssm: bool) -> None:
    settings = TrainSettings(steps=3, batch_size=4, eval_samples=32)
    metrics = run("recall", tmp_path, use_ssm, settings, config_overrides=TINY_MODEL, task_params=TINY_TASK)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["architectures"] == ["BSTForCausalLM"] and config["use_ssm"] is use_ssm
    assert json.loads((tmp_path / "metrics.json").read_text()) == metrics
    assert metrics["train_wall_s"] > 0 and metrics["use_ssm"] is use_ssm and metrics["chance"] == 1 / 16
    ckpt = load_checkpoint(tmp_path)
    assert ckpt.task == RecallTask(**TINY_TASK)
    assert any(".ssm." in n for n, _ in ckpt.model.named_parameters()) is use_ssm
    again = evaluate(ckpt.model, *held_out(ckpt.task, 32, settings.seed))
    assert again["token_accuracy"] == pytest.approx(metrics["eval_accuracy"])


def test_cli_train_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "ckpt"
    cli.main(["bst", "train", "--task", "copy", "--out", str(out), "--steps", "2", "--batch-size", "2",
              "--eval-samples", "8", "--no-ssm", "--seed", "3"])  # fmt: skip
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["use_ssm"] is False and metrics["settings"]["seed"] == 3 and metrics["task"]["name"] == "copy"
    assert metrics["command"].startswith("moa-vllm bst train --task copy") and "--no-ssm" in metrics["command"]
    assert str(out) in capsys.readouterr().out
    assert torch.get_num_threads() == 1


def test_cli_recall_recipe_flags_reach_task_config_and_command(tmp_path: Path) -> None:
    out = tmp_path / "ckpt"
    cli.main(["bst", "train", "--task", "recall", "--out", str(out), "--steps", "2", "--batch-size", "2",
              "--eval-samples", "8", "--min-seq-len", "32", "--noise-mix", "subset", "--ssm-init", "real",
              "--ssm-dt-min", "1e-4", "--ssm-dt-max", "1e-3", "--ssm-input-gate"])  # fmt: skip
    config = json.loads((out / "config.json").read_text())
    assert config["ssm_input_gate"] is True and config["ssm_init"] == "real"
    assert (config["ssm_dt_min"], config["ssm_dt_max"]) == (1e-4, 1e-3)
    task = json.loads((out / "task.json").read_text())
    assert task["min_seq_len"] == 32 and task["noise_mix"] == "subset"
    command = json.loads((out / "metrics.json").read_text())["command"]
    for flag in ("--min-seq-len 32", "--noise-mix subset", "--ssm-init real", "--ssm-input-gate"):
        assert flag in command


def test_the_input_gate_trains_without_weight_decay() -> None:
    """The gate trains like the SSM it feeds: no weight decay."""
    model = BSTForCausalLM(tiny_config(ssm_input_gate=True))
    groups = make_optimizer(model, TrainSettings())
    no_decay = {id(p) for g in groups.param_groups if g["weight_decay"] == 0.0 for p in g["params"]}
    gate = [p for n, p in model.named_parameters() if ".ssm_gate." in n]
    assert gate and all(id(p) in no_decay for p in gate)


def test_gate_l1_shuts_more_gates_than_training_without_it() -> None:
    task = RecallTask(**TINY_TASK)

    def written(l1: float) -> float:
        torch.manual_seed(0)
        model = BSTForCausalLM(tiny_config(vocab_size=task.vocab_size, initializer_range=0.02, ssm_input_gate=True))
        train(model, task, TrainSettings(steps=30, batch_size=8, warmup_steps=2, gate_l1=l1))
        ids = task.sample(8, torch.Generator().manual_seed(9))[0]
        with torch.no_grad():
            h = model.layers[0].attn_norm(model.embed_tokens(ids))
            return model.layers[0].ssm_input(h).abs().mean().item()

    assert written(1.0) < 0.5 * written(0.0)
    with pytest.raises(ValueError, match="input gates"):
        train(BSTForCausalLM(tiny_config()), task, TrainSettings(steps=1, gate_l1=0.1))
