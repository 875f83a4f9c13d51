"""Ring layout of a request's KV cache: how many pages each (layer, KV head) holds and which slot a position uses.

Each (request, layer, KV head) owns a ring of `span` token slots (sinks included, see span.py). A vLLM block of a
layer holds `heads_per_block` head pages (one per KV head of the rank) of `page_tokens` tokens each. A request's
blocks of a layer form one flat list of pages (page j = cell j % heads_per_block of block j // heads_per_block);
head h's ring starts at a page boundary and takes the next ceil(span[h] / page_tokens) pages after the rings of
heads 0..h-1; except where all of the layer's rings have the same page count P, which interleave: head h's page k
is flat page k * heads_per_block + h (cell h of block k, vLLM's own layout), so the H rings of a request read as one
sequence with H KV heads (one kernel call per request instead of H). Page alignment lets every ring be read by
stock paged attention kernels as a one-KV-head "virtual sequence" with its own page table (no kernel takes a
per-sequence start offset). A request needs
ceil(sum of ceil(span / page_tokens) / heads_per_block) blocks of that layer: still less than one page per head
above the plan's own token count. They are allocated once, at admission.

All MoA layers share one KV cache group: a vLLM block holds one layer page (heads_per_block head pages) for each of
the group's L layers, and a request's layers take their layer pages one after another from its one block list
(layer l's region starts after the layer pages of layers 0..l-1), so the request holds
ceil(sum over layers of their layer pages / L) blocks: under one block more than the layers' own pages
(`group_blocks`).

Slot of position p: p itself while p < sinks, else sinks + (p - sinks) mod window. Positions never exceed N - 1, so
a ring whose span is N (dense head, or a short request) never wraps.
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import accumulate

from moa_vllm.plan.span import span_tokens, window_tokens


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def head_pages(spans: Sequence[int], page_tokens: int) -> list[int]:
    """Pages each head's ring takes (rings start at page boundaries)."""
    return [cdiv(s, page_tokens) for s in spans]


def first_pages(spans: Sequence[int], page_tokens: int) -> list[int]:
    """Index (in the request's flat page list of the layer) of each head's first ring page."""
    pages = head_pages(spans, page_tokens)
    return [total - p for total, p in zip(accumulate(pages), pages, strict=True)]


def flat_page(spans: Sequence[int], head: int, k: int, page_tokens: int) -> int:
    """Index in the request's flat page list of the layer of page k of head `head`'s ring."""
    pages = head_pages(spans, page_tokens)
    if len(set(pages)) == 1:
        return k * len(pages) + head
    return first_pages(spans, page_tokens)[head] + k


def blocks_for_spans(spans: Sequence[int], page_tokens: int, heads_per_block: int) -> int:
    """Blocks of one layer a request needs when its heads' rings have these spans."""
    return cdiv(sum(head_pages(spans, page_tokens)), heads_per_block)


def layer_blocks(
    alphas: Sequence[float],
    betas: Sequence[float],
    n: int,
    min_span: int,
    page_tokens: int,
    heads_per_block: int,
    cap: int | None = None,
) -> int:
    """Blocks of one layer for spans at length n of a request of `cap` tokens (None: n), for the KV heads held by
    one rank (their rules given)."""
    spans = [span_tokens(a, b, n, min_span, cap) for a, b in zip(alphas, betas, strict=True)]
    return blocks_for_spans(spans, page_tokens, heads_per_block)


def ring_slot(position: int, sinks: int, span: int) -> int:
    """Slot of `position` in a ring of `span` tokens with `sinks` sink slots first."""
    if position < sinks:
        return position
    window = window_tokens(span, sinks)
    if window <= 0:
        raise ValueError(f"position {position} >= sinks {sinks} but the span {span} has no window")
    return sinks + (position - sinks) % window


def group_blocks(layer_pages: Sequence[int], layers: int) -> int:
    """vLLM blocks of the one MoA group a request holds when its layers take these layer pages (a block holds one
    layer page of each of the group's `layers` layers; the regions are laid out one after another)."""
    return cdiv(sum(layer_pages), layers)
