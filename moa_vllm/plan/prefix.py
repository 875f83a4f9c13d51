"""What makes a cached prefix reusable under MoA spans: the span signature of a block, and which blocks are cached.

The KV a request computes at positions < e depends on the spans it attended with, but only through min(span, e)
per (layer, KV head): a head whose span reaches e saw every earlier key, whatever its span. Two requests that share
the tokens of positions < e therefore computed identical KV there iff, for every head, their spans are equal or
both >= e. `SpanSignature(spans)(e)` encodes exactly that (span where span < e, else "all") as a short digest; the
plugin adds it to vLLM's block hash of the block ending at e, so a prefix-cache hit never mixes spans.

Only prompt blocks are cached (`cacheable_blocks`): decode tokens are written into the rings alone.
"""

from __future__ import annotations

import hashlib

import numpy as np

from moa_vllm.plan.span import span_length, span_tokens


class SpanSignature:
    """Per request: the digest of its spans as seen by a block ending at position e (see module docstring)."""

    def __init__(self, spans: np.ndarray) -> None:
        self._spans = np.asarray(spans, dtype=np.int64).reshape(-1)
        self._sorted = np.unique(self._spans)
        self._memo: dict[int, bytes] = {}

    def __call__(self, end: int) -> bytes:
        below = int(np.searchsorted(self._sorted, end, side="left"))  # distinct spans < end: the digest's key
        digest = self._memo.get(below)
        if digest is None:
            seen = np.where(self._spans < end, self._spans, -1)  # -1: the head saw every key before `end`
            digest = hashlib.blake2b(seen.astype("<i8").tobytes(), digest_size=16).digest()
            self._memo[below] = digest
        return digest


def request_spans(
    alphas: np.ndarray, betas: np.ndarray, n: int, min_span: int, cap: int | None = None
) -> np.ndarray:
    """Spans of every (layer, KV head) at length n for a request of `cap` tokens (span.span_tokens, vectorised)."""
    spans = [span_tokens(a, b, n, min_span, cap) for a, b in zip(np.ravel(alphas), np.ravel(betas), strict=True)]
    return np.asarray(spans, dtype=np.int64).reshape(np.shape(alphas))


def signature_for(
    alphas: np.ndarray,
    betas: np.ndarray,
    min_span: int,
    n: int,
    max_model_len: int,
    grid: int,
    hint: int | None = None,
    floor: int = 0,
) -> SpanSignature:
    """The span signature of a request of length n (prompt + max_tokens), spans taken at its span length."""
    length = span_length(n, max_model_len, grid, hint, floor)
    return SpanSignature(request_spans(alphas, betas, length, min_span, n))


def cacheable_blocks(prompt_tokens: int, block_size: int) -> int:
    """Prompt blocks a request writes into position-ordered prefix blocks: the full ones."""
    return prompt_tokens // block_size
