"""A tiny deterministic tokenizer with the interface the harness uses (no model files needed)."""

from __future__ import annotations

import re

_PIECE = re.compile(r"\d|\s?[A-Za-z@]+|\s|[^\sA-Za-z\d@]")


class WordTokenizer:
    """Words keep their leading space, every digit is its own token (like the embedded model's tokenizer)."""

    def __init__(self) -> None:
        self.vocab: dict[str, int] = {}
        self.pieces: list[str] = []

    def _id(self, piece: str) -> int:
        if piece not in self.vocab:
            self.vocab[piece] = len(self.pieces)
            self.pieces.append(piece)
        return self.vocab[piece]

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return [self._id(p) for p in _PIECE.findall(text)]

    def decode(self, ids: list[int]) -> str:
        return "".join(self.pieces[i] for i in ids)

    def apply_chat_template(self, messages, tokenize=False, add_generation_prompt=True) -> str:
        body = "".join(f"<user>{m['content']}</user>" for m in messages)
        return "<system>Be helpful.</system>" + body + ("<assistant>" if add_generation_prompt else "")
