"""Byte-level BPE tokenizer for the BST language model, trained with Hugging Face ``tokenizers``.

Byte-level means every string encodes (no unknown token) and decoding is lossless. The folder it writes
(``tokenizer.json`` + ``tokenizer_config.json``) is what ``transformers.AutoTokenizer`` and therefore vLLM load, so a
checkpoint folder with these files serves text prompts as is.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

EOS_TOKEN = "<|endoftext|>"  # separates files in the training stream; the only special token
TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"


def train_tokenizer(texts: Iterable[str], vocab_size: int) -> Tokenizer:
    """A byte-level BPE with ``vocab_size`` entries (the 256 bytes, merges, and the EOS token) learnt on ``texts``."""
    tok = Tokenizer(models.BPE())
    # No prefix space: source code is whitespace-sensitive and the first token of a file is not mid-sentence.
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def save_tokenizer(tok: Tokenizer, folder: str | Path) -> Path:
    """Write ``tokenizer.json`` and a ``tokenizer_config.json`` that ``AutoTokenizer`` reads as a fast tokenizer."""
    path = Path(folder)
    path.mkdir(parents=True, exist_ok=True)
    tok.save(str(path / TOKENIZER_FILE))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "eos_token": EOS_TOKEN,
        "bos_token": None,
        "unk_token": None,
        "pad_token": EOS_TOKEN,
        "add_bos_token": False,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": 1 << 20,  # no position limit (RoPE in a window + SSM); vLLM takes its own max_model_len
    }
    (path / TOKENIZER_CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    return path


def load_tokenizer(folder: str | Path) -> Tokenizer:
    return Tokenizer.from_file(str(Path(folder) / TOKENIZER_FILE))


def eos_id(tok: Tokenizer) -> int:
    token = tok.token_to_id(EOS_TOKEN)
    if token is None:
        raise ValueError(f"tokenizer has no {EOS_TOKEN!r} token")
    return token
