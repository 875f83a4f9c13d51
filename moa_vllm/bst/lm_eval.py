"""Held-out perplexity of a causal LM by position bucket: does context far beyond the attention window help?

Each held-out document is scored in one forward from its first token, so the loss at position p is the loss with
exactly p tokens of context. Buckets are half-open position ranges, e.g. [0, 1024), [1024, 2048), [2048, 4096),
[4096, 8192); a model that uses distant context gets better in the later buckets, a windowed model stays flat.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

DEFAULT_EDGES = (0, 1024, 2048, 4096, 8192)


@torch.no_grad()
def position_nll(model: nn.Module, docs: Sequence[Tensor]) -> Tensor:
    """``(docs, L - 1)`` float64 NLL of token p+1 given tokens 0..p, for documents of equal length L."""
    lengths = {d.numel() for d in docs}
    if len(lengths) != 1:
        raise ValueError(f"documents must share one length, got {sorted(lengths)}")
    rows = []
    for doc in docs:
        ids = doc.long()[None]
        logits = model(ids[:, :-1]).double()
        rows.append(F.cross_entropy(logits[0], ids[0, 1:], reduction="none"))
    return torch.stack(rows)


def bucket_perplexity(nll: Tensor, edges: Sequence[int] = DEFAULT_EDGES) -> list[dict[str, float | int]]:
    """Per bucket [lo, hi) of *context length* (the NLL at column p predicts token p+1 from p+1 tokens):
    mean NLL over documents and positions, its perplexity, and the token count."""
    context = torch.arange(1, nll.shape[1] + 1)
    out = []
    for lo, hi in zip(edges[:-1], edges[1:]):
        cols = (context > lo) & (context <= hi)
        if not cols.any():
            raise ValueError(f"no position with context in ({lo}, {hi}]; documents hold {nll.shape[1] + 1} tokens")
        mean = nll[:, cols].mean().item()
        out.append(
            {
                "context_from": lo,
                "context_to": hi,
                "nll": mean,
                "ppl": math.exp(mean),
                "tokens": int(cols.sum().item() * nll.shape[0]),
            }
        )
    return out
