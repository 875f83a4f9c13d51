"""Document caches of what lies beyond an attention window: how much could distant context help a windowed LM?

A sliding-window model at position p sees tokens p-W+1 .. p; everything at p-W and before reaches it only through
whatever else it carries (the BST's SSM state). Two classic cache models built from exactly that distant part of the
document bound what it offers, when interpolated with a model's own prediction:

- unigram cache: how often the target token occurs in the distant part (the document's "vocabulary so far");
- bigram copy cache: among distant positions j where token j equals the current token p, how often token j+1 was
  the target, i.e. "what followed this token last time" (identifiers, call patterns: code repeats itself).

A fixed-size state can hold a decayed bag of features (unigram-like) but not an exact copy table over thousands of
tokens, so the split between the two says which kind of distant information a document offers.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class FarCache:
    """Per predicted position p (target token p+1 given tokens 0..p), float64 ``(L - 1,)`` each.

    ``unigram``: share of the target among tokens at positions <= p - W; ``has_unigram``: p >= W (there are some).
    ``copy``: share of the target among the successors j+1 <= p - W of earlier occurrences j of token p.
    ``has_copy``: whether token p occurred at some such j (else ``copy`` is 0 and says nothing).
    """

    unigram: Tensor
    has_unigram: Tensor
    copy: Tensor
    has_copy: Tensor


def far_cache(ids: Tensor, window: int) -> FarCache:
    """Cache probabilities of every target of ``ids`` ``(L,)`` from the part of the prefix outside ``window``."""
    if window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    tokens = ids.tolist()
    n = len(tokens) - 1
    unigram = torch.zeros(n, dtype=torch.float64)
    copy = torch.zeros(n, dtype=torch.float64)
    has_copy = torch.zeros(n, dtype=torch.bool)
    counts: Counter[int] = Counter()
    followers: defaultdict[int, Counter[int]] = defaultdict(Counter)
    for p in range(n):
        far = p - window  # newest position outside the window at p
        if far >= 0:
            counts[tokens[far]] += 1
            if far >= 1:
                followers[tokens[far - 1]][tokens[far]] += 1
        target = tokens[p + 1]
        if far >= 0:
            unigram[p] = counts[target] / (far + 1)
        seen = followers.get(tokens[p])
        if seen:
            copy[p] = seen[target] / seen.total()
            has_copy[p] = True
    has_unigram = torch.arange(n) >= window
    return FarCache(unigram, has_unigram, copy, has_copy)


def interpolated_nll(p_model: Tensor, p_cache: Tensor, available: Tensor, lam: float) -> Tensor:
    """NLL of ``(1 - lam) * p_model + lam * p_cache`` where the cache has an opinion, of ``p_model`` elsewhere."""
    if not 0.0 <= lam < 1.0:
        raise ValueError(f"interpolation weight must be in [0, 1), got {lam}")
    mixed = torch.where(available, (1 - lam) * p_model + lam * p_cache, p_model)
    return -torch.log(mixed)
