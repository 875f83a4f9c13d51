"""The BST language model end to end: corpus -> tokenizer -> token streams -> training -> a servable folder.

``prepare`` caches its products in a work folder (tokenizer, train stream, held-out documents), so the BST and the
baseline train on byte-identical data and a rerun skips what exists. ``train_checkpoint`` writes an HF-style folder
that ``moa-vllm serve DIR`` serves with text prompts:

DIR/config.json, model.safetensors   the model (weights stored in bfloat16 to keep the folder a few MB)
DIR/tokenizer.json, tokenizer_config.json
DIR/metrics.json                     training wall time, tokens, corpus digest, the command that made it
"""

from __future__ import annotations

import dataclasses
import json
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer

from moa_vllm.bst.corpus import corpus_digest, source_files, split_files, stdlib_root
from moa_vllm.bst.lm_data import encode_files, join_stream, long_documents
from moa_vllm.bst.lm_train import LMTrainSettings, lm_config, train_lm
from moa_vllm.bst.tokenizer import load_tokenizer, save_tokenizer, train_tokenizer

DEFAULT_VOCAB = 4096
DATA_NAME = "data.pt"
SAVED_DTYPE = torch.bfloat16


@dataclass
class Prepared:
    tokenizer: Tokenizer
    tokenizer_dir: Path
    stream: torch.Tensor  # training stream, int32
    heldout: dict[str, torch.Tensor]  # relpath -> every token of each held-out file, int32
    info: dict[str, Any]


def prepare(work: str | Path, root: Path | None = None, vocab_size: int = DEFAULT_VOCAB) -> Prepared:
    """Tokenizer trained on the train split only, the joined train stream and the held-out files' tokens."""
    work = Path(work)
    tok_dir, data_file = work / "tokenizer", work / DATA_NAME
    if data_file.is_file() and (tok_dir / "tokenizer.json").is_file():
        data = torch.load(data_file, weights_only=False)
        return Prepared(load_tokenizer(tok_dir), tok_dir, data["stream"], data["heldout"], data["info"])
    start = time.perf_counter()
    files = source_files(root)
    train, heldout = split_files(files)
    tok = train_tokenizer((f.text for f in train), vocab_size)
    save_tokenizer(tok, tok_dir)
    train_ids, heldout_ids = encode_files(tok, train), encode_files(tok, heldout)
    stream = join_stream(tok, train_ids)
    info = {
        "root": str(root or stdlib_root()),
        "python": platform.python_version(),
        "train_files": len(train),
        "heldout_files": len(heldout),
        "train_tokens": int(stream.numel()),
        "heldout_tokens": int(sum(t.numel() for t in heldout_ids)),
        "train_bytes": sum(len(f.text.encode()) for f in train),
        "train_digest": corpus_digest(train),
        "heldout_digest": corpus_digest(heldout),
        "vocab_size": tok.get_vocab_size(),
        "prepare_wall_s": round(time.perf_counter() - start, 1),
    }
    heldout_map = {f.relpath: ids for f, ids in zip(heldout, heldout_ids)}
    torch.save({"stream": stream, "heldout": heldout_map, "info": info}, data_file)
    return Prepared(tok, tok_dir, stream, heldout_map, info)


def heldout_documents(prepared: Prepared, length: int) -> list[tuple[str, torch.Tensor]]:
    """The held-out files with at least ``length`` tokens, cut to their first ``length``."""
    return long_documents(prepared.heldout, length)


def train_checkpoint(
    out: str | Path,
    work: str | Path,
    use_ssm: bool,
    settings: LMTrainSettings,
    command: str | None = None,
    log: Callable[[dict[str, Any]], None] | None = None,
    root: Path | None = None,
    config_overrides: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Prepare (or reuse) the data in ``work``, train in ``work/ssm|no-ssm``, write the servable folder ``out``.

    ``root`` is the corpus folder (default: the stdlib; tests pass a small one); ``config_overrides`` replaces
    fields of the shipped LM config (a resumed run refuses a state trained under another config)."""
    work = Path(work)
    prepared = prepare(work, root)
    config = dataclasses.replace(lm_config(prepared.tokenizer.get_vocab_size(), use_ssm), **(config_overrides or {}))
    model, summary = train_lm(config, prepared.stream, settings, work / ("ssm" if use_ssm else "no-ssm"), log)
    folder = model.to(SAVED_DTYPE).save_pretrained(out)
    save_tokenizer(prepared.tokenizer, folder)
    metrics = {
        "use_ssm": use_ssm,
        "parameters": sum(p.numel() for p in model.parameters()),
        "settings": dataclasses.asdict(settings),
        "torch_threads": torch.get_num_threads(),
        **summary,
        "corpus": prepared.info,
        "saved_dtype": str(SAVED_DTYPE).removeprefix("torch."),
        "device": "CPU",
        "command": command,
    }
    (folder / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    return metrics
