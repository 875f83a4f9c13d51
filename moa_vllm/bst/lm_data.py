"""Token streams for the BST language model: the training stream (files joined by EOS) and held-out documents.

Training samples are random windows of the stream, so a window may cross a file boundary, where the EOS token tells
the model that the context before it is another file. Held-out documents are whole files long enough for the
longest evaluated context, scored from their first token: position p of a document has exactly p tokens of context.
"""

from __future__ import annotations

import torch
from tokenizers import Tokenizer
from torch import Tensor

from moa_vllm.bst.corpus import SourceFile
from moa_vllm.bst.tokenizer import eos_id


def encode_files(tok: Tokenizer, files: list[SourceFile]) -> list[Tensor]:
    """Token ids of each file, int32 (the stream of the whole stdlib fits comfortably)."""
    encodings = tok.encode_batch([f.text for f in files], add_special_tokens=False)
    return [torch.tensor(e.ids, dtype=torch.int32) for e in encodings]


def join_stream(tok: Tokenizer, encoded: list[Tensor]) -> Tensor:
    """One int32 stream: every file followed by EOS."""
    eos = torch.tensor([eos_id(tok)], dtype=torch.int32)
    return torch.cat([t for ids in encoded for t in (ids, eos)])


def sample_windows(stream: Tensor, batch: int, length: int, generator: torch.Generator) -> Tensor:
    """``(batch, length + 1)`` int64 windows at uniform random offsets (inputs ``[:, :-1]``, targets ``[:, 1:]``)."""
    if stream.numel() < length + 1:
        raise ValueError(f"stream of {stream.numel()} tokens is shorter than a window of {length + 1}")
    starts = torch.randint(0, stream.numel() - length, (batch,), generator=generator)
    offsets = torch.arange(length + 1)
    return stream[starts[:, None] + offsets].long()


def long_documents(encoded: dict[str, Tensor], length: int) -> list[tuple[str, Tensor]]:
    """``(name, first length tokens)`` of every document with at least ``length`` tokens, sorted by name."""
    return [(name, encoded[name][:length].long()) for name in sorted(encoded) if encoded[name].numel() >= length]
