"""The LM tokenizer: byte-level BPE that round-trips any text and loads through transformers (what vLLM uses)."""

from __future__ import annotations

from pathlib import Path

import pytest

from moa_vllm.bst.tokenizer import EOS_TOKEN, eos_id, load_tokenizer, save_tokenizer, train_tokenizer

TEXTS = [
    "def add(a, b):\n    return a + b\n",
    "class Point:\n    def __init__(self, x, y):\n        self.x = x\n        self.y = y\n",
    "import os\nfor name in os.listdir('.'):\n    print(name)\n",
] * 20


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tokenizer(train_tokenizer(TEXTS, vocab_size=300), tmp_path_factory.mktemp("tok"))


def test_round_trip_is_lossless_even_for_unseen_bytes(folder: Path) -> None:
    tok = load_tokenizer(folder)
    for text in ["def add(a, b):\n    return a + b\n", "naïve = '日本' \t\r\n  # ünïcödé", ""]:
        assert tok.decode(tok.encode(text).ids) == text
    assert tok.get_vocab_size() == 300
    # Merges learnt from the texts: frequent code compresses below one token per byte.
    assert len(tok.encode(TEXTS[1]).ids) < len(TEXTS[1].encode()) / 2


def test_eos_is_special_and_transformers_loads_the_same_tokenizer(folder: Path) -> None:
    from transformers import AutoTokenizer

    tok = load_tokenizer(folder)
    hf = AutoTokenizer.from_pretrained(folder)
    text = "class Point:\n    pass\n"
    assert hf(text)["input_ids"] == tok.encode(text).ids  # no BOS/EOS added
    assert hf.eos_token == EOS_TOKEN and hf.eos_token_id == eos_id(tok)
    assert tok.encode(EOS_TOKEN).ids == [eos_id(tok)]
