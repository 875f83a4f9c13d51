"""The LM pipeline end to end on a small corpus: data cached once, a servable folder with its tokenizer."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from moa_vllm.bst.lm import heldout_documents, prepare, train_checkpoint
from moa_vllm.bst.lm_train import LMTrainSettings
from moa_vllm.bst.model import BSTForCausalLM
from moa_vllm.bst.tokenizer import load_tokenizer

SNIPPET = '''
def handler_{i}(request, retries={i}):
    """Handle request number {i}."""
    for attempt in range(retries):
        if request.ok:
            return request.value * {i}
    raise RuntimeError("gave up after %d tries" % retries)
'''


def corpus(root: Path) -> Path:
    root.mkdir()
    for f in range(40):
        (root / f"mod{f}.py").write_text("".join(SNIPPET.format(i=f * 10 + i) for i in range(1 + f % 7)))
    return root


def test_prepare_caches_a_train_stream_and_heldout_files(tmp_path: Path) -> None:
    root = corpus(tmp_path / "lib")
    first = prepare(tmp_path / "work", root, vocab_size=400)
    assert first.info["train_files"] + first.info["heldout_files"] == 40 and first.info["heldout_files"] > 0
    assert first.stream.numel() == first.info["train_tokens"]
    again = prepare(tmp_path / "work", root, vocab_size=400)  # from the cache: same tensors, same tokenizer
    assert torch.equal(again.stream, first.stream) and again.info == first.info
    docs = heldout_documents(first, 50)
    assert docs and all(ids.numel() == 50 for _, ids in docs)


def test_train_checkpoint_writes_a_loadable_folder_with_tokenizer(tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    root = corpus(tmp_path / "lib")
    settings = LMTrainSettings(steps=2, tokens_per_step=64, seq_lengths=(32, 64), warmup_steps=1, checkpoint_every=1)
    metrics = train_checkpoint(tmp_path / "out", tmp_path / "work", False, settings, command="x", root=root)
    folder = tmp_path / "out"
    saved = json.loads((folder / "metrics.json").read_text())
    assert saved == json.loads(json.dumps(metrics))
    assert saved["steps"] == 2 and saved["use_ssm"] is False and saved["command"] == "x"
    model = BSTForCausalLM.from_pretrained(folder)
    assert model.dtype == torch.bfloat16 and not model.config.use_ssm
    hf = AutoTokenizer.from_pretrained(folder)
    assert hf("def f():")["input_ids"] == load_tokenizer(folder).encode("def f():").ids
    assert model.config.vocab_size == load_tokenizer(folder).get_vocab_size() == len(hf)


@pytest.mark.compute
def test_cli_train_lm_on_the_stdlib_records_its_command(tmp_path: Path) -> None:
    """`moa-vllm bst train-lm` on the real corpus: one step (8 x 1024 tokens), a folder vLLM can serve."""
    from moa_vllm import cli

    out = tmp_path / "lm"
    work = str(tmp_path / "work")
    cli.main(["bst", "train-lm", "--out", str(out), "--work", work, "--steps", "1", "--seed", "3", "--no-ssm"])
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["steps"] == 1 and metrics["tokens_seen"] == 8192 and metrics["use_ssm"] is False
    assert metrics["settings"]["seed"] == 3 and "--seed 3" in metrics["command"]
    assert metrics["corpus"]["heldout_files"] > 0 and metrics["corpus"]["vocab_size"] == 4096
    assert metrics["command"].startswith("moa-vllm bst train-lm --out") and "--no-ssm" in metrics["command"]
    assert (out / "tokenizer.json").is_file() and json.loads((out / "config.json").read_text())["vocab_size"] == 4096


@pytest.mark.compute
def test_cli_train_lm_config_flags_reach_the_saved_config(tmp_path: Path) -> None:
    from moa_vllm import cli

    out, work = tmp_path / "lm", str(tmp_path / "work")
    flags = ["--ssm-state-size", "8", "--ssm-input-gate", "--context-mode", "mh", "--ssm-dt-max", "0.01"]
    cli.main(["bst", "train-lm", "--out", str(out), "--work", work, "--steps", "1", *flags])
    config = json.loads((out / "config.json").read_text())
    assert (config["ssm_state_size"], config["ssm_input_gate"], config["context_mode"]) == (8, True, "mh")
    assert config["ssm_dt_max"] == 0.01 and config["ssm_dt_min"] == 1e-4  # the rest keeps the shipped LM config
    command = json.loads((out / "metrics.json").read_text())["command"]
    assert "--ssm-state-size 8" in command and "--ssm-input-gate" in command and "--context-mode mh" in command


def test_cli_train_lm_refuses_ssm_flags_for_the_baseline(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from moa_vllm import cli

    args = ["bst", "train-lm", "--out", str(tmp_path / "lm"), "--work", str(tmp_path), "--no-ssm", "--ssm-input-gate"]
    with pytest.raises(SystemExit) as exit_info:
        cli.main(args)
    assert exit_info.value.code == 2
    assert "--ssm-input-gate configure the SSM; --no-ssm has none" in capsys.readouterr().err
    assert not (tmp_path / "data.pt").exists()  # refused before any data preparation
