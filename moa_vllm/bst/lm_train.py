"""Train the BST language model (or its windowed-attention baseline) on the stdlib corpus.

Both models see the same windows in the same order (one seeded generator), the same optimizer and schedule; only
``use_ssm`` differs. Steps alternate between sequence lengths at a fixed token count per step, so the model sees
long sequences (up to the longest evaluated context) without paying for them on every step: attention is windowed
and the SSM is an FFT convolution, so a step costs about the same per token at any length.

Training is resumable: ``WORK/state.pt`` (model, optimizer, step, generator, elapsed time) is written every
``checkpoint_every`` steps and at the end, and a rerun with the same WORK continues from it.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from moa_vllm.bst.config import BSTConfig
from moa_vllm.bst.lm_data import sample_windows
from moa_vllm.bst.model import BSTForCausalLM
from moa_vllm.bst.train import lr_factor, make_optimizer

STATE_NAME = "state.pt"
LOG_NAME = "train_log.jsonl"


@dataclass(frozen=True)
class LMTrainSettings:
    steps: int = 600
    tokens_per_step: int = 8192
    seq_lengths: tuple[int, ...] = (1024, 8192)  # cycled per step; batch = tokens_per_step // length
    lr: float = 2e-3
    ssm_lr: float = 2e-3
    weight_decay: float = 0.1
    warmup_steps: int = 50
    clip_norm: float = 1.0
    seed: int = 0
    checkpoint_every: int = 50
    # Start the SSM's context keys/values at zero, so the BST begins as its windowed baseline and the context path
    # is learnt in rather than adding noise to every context head from step 0 (measured: with a random start the
    # BST trailed the baseline by ~0.1 nats for the whole run). No effect without the SSM.
    zero_init_context: bool = True

    def __post_init__(self) -> None:
        for length in self.seq_lengths:
            if length < 1 or self.tokens_per_step % length:
                raise ValueError(f"sequence length {length} must divide tokens_per_step={self.tokens_per_step}")


def lm_config(vocab_size: int, use_ssm: bool = True) -> BSTConfig:
    """The shipped LM size: 4 layers, hidden 128, 4 heads of 32, window 64, S4D state 16 (about 2M parameters)."""
    return BSTConfig(
        vocab_size=vocab_size,
        hidden_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        sliding_window=64,
        use_ssm=use_ssm,
        context_mode="sh",
        ssm_state_size=16,
        ssm_dt_min=1e-4,
        ssm_dt_max=1e-1,
    )


def close_context_path(model: BSTForCausalLM) -> None:
    """Zero the projection from SSM outputs to context keys/values in every layer (the context heads then read
    zero values; gradients still reach the projection through them)."""
    with torch.no_grad():
        for layer in model.layers:
            if layer.use_ssm:
                for param in layer.context_kv.parameters():
                    param.zero_()


def lm_loss(model: BSTForCausalLM, windows: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy of ``windows`` ``(batch, L + 1)``."""
    logits = model(windows[:, :-1])
    return F.cross_entropy(logits.flatten(0, 1).float(), windows[:, 1:].flatten())


def train_lm(
    config: BSTConfig,
    stream: torch.Tensor,
    settings: LMTrainSettings,
    work: str | Path,
    log: Callable[[dict[str, Any]], None] | None = None,
) -> tuple[BSTForCausalLM, dict[str, Any]]:
    """Train (or resume training) in ``work``; returns the model and a summary (wall time, tokens, last losses)."""
    work = Path(work)
    work.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(settings.seed)
    model = BSTForCausalLM(config)
    if settings.zero_init_context:
        close_context_path(model)
    optimizer = make_optimizer(model, settings)
    base_lrs = [group["lr"] for group in optimizer.param_groups]
    generator = torch.Generator().manual_seed(settings.seed)
    step, elapsed = 0, 0.0
    state_file = work / STATE_NAME
    if state_file.is_file():
        saved = torch.load(state_file, weights_only=False)
        if saved["config"] != config.to_dict() or saved["settings"] != dataclasses.asdict(settings):
            raise ValueError(f"{state_file} was written for another config or settings; use a fresh work folder")
        model.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        generator.set_state(saved["generator"])
        step, elapsed = saved["step"], saved["elapsed_s"]
    recent: list[float] = []
    model.train()
    while step < settings.steps:
        start = time.perf_counter()
        for group, base in zip(optimizer.param_groups, base_lrs):
            group["lr"] = base * lr_factor(step, settings)
        length = settings.seq_lengths[step % len(settings.seq_lengths)]
        windows = sample_windows(stream, settings.tokens_per_step // length, length, generator)
        loss = lm_loss(model, windows)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), settings.clip_norm)
        optimizer.step()
        step += 1
        elapsed += time.perf_counter() - start
        recent = (recent + [loss.item()])[-50:]
        if step % settings.checkpoint_every == 0 or step == settings.steps:
            record = {"step": step, "length": length, "loss": loss.item(), "elapsed_s": round(elapsed, 1)}
            with (work / LOG_NAME).open("a") as f:
                f.write(json.dumps(record) + "\n")
            if log is not None:
                log(record)
            _save_state(state_file, model, optimizer, generator, step, elapsed, config, settings)
    model.eval()
    summary = {
        "steps": step,
        "tokens_seen": step * settings.tokens_per_step,
        "train_wall_s": round(elapsed, 1),
        "mean_loss_last_50": sum(recent) / len(recent) if recent else None,
    }
    return model, summary


def _save_state(
    path: Path,
    model: BSTForCausalLM,
    optimizer: torch.optim.Optimizer,
    generator: torch.Generator,
    step: int,
    elapsed: float,
    config: BSTConfig,
    settings: LMTrainSettings,
) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(
        {
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "generator": generator.get_state(),
            "step": step,
            "elapsed_s": elapsed,
            "config": config.to_dict(),
            "settings": dataclasses.asdict(settings),
        },
        tmp,
    )
    tmp.replace(path)  # a kill mid-write leaves the previous state intact
