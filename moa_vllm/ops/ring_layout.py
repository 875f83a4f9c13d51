"""Where each (request, layer, KV head) ring lives and which slots a step reads and writes; plain torch, batched.

Rings are page aligned (moa_vllm/plan/ring.py): head h of a request's layer starts at page first[h] of the
request's flat page list of that layer, and page j of that list is cell j % H of block j // H. Kernels see the
layer's cache as one-KV-head pages, [num_blocks * H, ...], so page id = block * H + cell, and every ring is a
"virtual sequence" with its own page table: its slot s is token s % page of table[s // page]. Where every head of
a request's layer has the same number of pages P (dense and uniform layers; short requests whose spans all clamp
to N) the rings interleave instead: page k of head h is flat page k * H + h, i.e. cell h of block k, which is
vLLM's own layout, so a kernel can read all H rings of the request as one sequence with H KV heads (same blocks).

Everything here is vectorised over layers ([L, R, H] spans), so one call per step serves every layer.
"""

from __future__ import annotations

from typing import NamedTuple

import torch


def ring_spans(alphas: torch.Tensor, betas: torch.Tensor, n: torch.Tensor, min_span: int) -> torch.Tensor:
    """Spans [L, R, H] for rules [L, H] and request lengths n [R]; same rounding as moa_vllm.plan.span."""
    n64 = n.to(torch.float64)[None, :, None]
    raw = torch.floor(alphas.to(torch.float64)[:, None, :] + betas.to(torch.float64)[:, None, :] * n64 + 0.5)
    return torch.minimum(torch.clamp(raw, min=float(min_span)), n64).to(torch.int64)


def ring_pages(spans: torch.Tensor, page: int) -> torch.Tensor:
    return torch.div(spans + page - 1, page, rounding_mode="floor")


def blocks_needed(spans: torch.Tensor, page: int, heads: int) -> torch.Tensor:
    """Blocks [..., R] each request holds in each layer for spans [..., R, H] (same as plan.ring.blocks_for_spans)."""
    return torch.div(ring_pages(spans, page).sum(-1) + heads - 1, heads, rounding_mode="floor")


def flat_pages(pages: torch.Tensor, width: int) -> torch.Tensor:
    """Index [..., H, width] of each ring's page j in the request's flat page list of its layer, for pages
    [..., H]: packed (head h from first[h] = pages of heads 0..h-1) or, where all H rings have equal pages,
    interleaved (k * H + h). Entries j >= pages are meaningless (callers mask them)."""
    return flat_index(pages, torch.arange(width, device=pages.device))


class RingPages(NamedTuple):
    """Where each ring's page j sits in its request's flat page list of the layer: flat = base + j * stride
    ([..., R, H] int32 each; packed rings: base first[h], stride 1; interleaved: base h, stride H). Page j's one-head
    page id is then block_table[r, flat // H] * H + flat % H, which a kernel can look up itself: no page table."""

    base: torch.Tensor
    stride: torch.Tensor


def ring_page_layout(pages: torch.Tensor) -> RingPages:
    """The layout rule of `flat_pages` as (base, stride) for pages [..., H] (every ring's page count)."""
    heads = pages.shape[-1]
    first = torch.cumsum(pages, dim=-1) - pages
    equal = (pages == pages[..., :1]).all(dim=-1, keepdim=True)
    base = torch.where(equal, torch.arange(heads, device=pages.device), first)
    stride = torch.where(equal, heads, 1).expand_as(pages)
    return RingPages(base.to(torch.int32), stride.to(torch.int32).contiguous())


def flat_index(pages: torch.Tensor, j: torch.Tensor) -> torch.Tensor:
    """Index in the request's flat page list of ring page j of each head, for pages [..., H] and j broadcast
    against [..., H, W] (W = 1 for one page per ring): the layout rule of `flat_pages`."""
    layout = ring_page_layout(pages)
    return layout.base.long()[..., None] + j * layout.stride.long()[..., None]


def page_tables(spans: torch.Tensor, block_tables: torch.Tensor, page: int, max_pages: int) -> torch.Tensor:
    """One-head page ids [L, R, H, max_pages] (int32) of every ring; entries past a ring's pages are 0.

    spans [L, R, H]; block_tables [L, R, B] the layer's blocks of each request (vLLM's block table per group).
    """
    layers, rows, heads = spans.shape
    pages = ring_pages(spans, page)
    j = torch.arange(max_pages, device=spans.device)
    flat = flat_pages(pages, max_pages)  # [L, R, H, P] page index in the request's flat page list
    valid = j < pages[..., None]
    blk_index = torch.where(valid, torch.div(flat, heads, rounding_mode="floor"), 0)
    blocks = torch.gather(block_tables.long(), 2, blk_index.view(layers, rows, -1)).view(layers, rows, heads, -1)
    return torch.where(valid, blocks * heads + flat % heads, 0).to(torch.int32)


def layer_page_table(spans: torch.Tensor, block_table: torch.Tensor, page: int, out: torch.Tensor) -> torch.Tensor:
    """One layer's ring page tables written into `out` [R, H, P] (int32) and returned: the rows of `page_tables` for
    spans [R, H] and the layer's block table [R, B]; entries past a ring's pages are 0.

    The forward derives each layer's tables here, from vLLM's own block table, into one scratch every layer shares
    (RingState), instead of keeping [L, max_rows, H, P] tables: H one-head page ids per vLLM block id are the
    kernels' input, so a persistent copy per layer would cost H x vLLM's block tables. Only torch ops of fixed shape:
    safe inside a captured CUDA graph."""
    heads, width = spans.shape[-1], out.shape[-1]
    pages = ring_pages(spans, page)
    j = torch.arange(width, device=spans.device)
    flat = flat_pages(pages, width)  # [R, H, P] page index in the request's flat page list of this layer
    valid = j < pages[..., None]
    blk_index = torch.where(valid, torch.div(flat, heads, rounding_mode="floor"), 0)
    blocks = torch.gather(block_table.long(), 1, blk_index.view(spans.shape[0], -1)).view_as(flat)
    out.copy_(torch.where(valid, blocks * heads + flat % heads, 0))
    return out


def ring_slot_of(pos: torch.Tensor, spans: torch.Tensor, sinks: int) -> torch.Tensor:
    """Ring slot of position pos (broadcast against spans): pos while pos < sinks, else sinks + (pos - sinks) % w."""
    window = torch.clamp(spans - sinks, min=1)
    return torch.where(pos < sinks, pos, sinks + torch.remainder(pos - sinks, window))


def slot_positions(written: torch.Tensor, spans: torch.Tensor, sinks: int, slots: int) -> torch.Tensor:
    """Position held by ring slots 0..slots-1 once positions 0..written-1 were written; -1 if none.

    written: [R] (broadcast as [R, 1, 1]); spans: [R, H]. Returns [R, H, slots].
    """
    s = torch.arange(slots, device=spans.device)[None, None, :]
    p = written.to(spans.device)[:, None, None]
    w = (spans - sinks)[:, :, None]
    in_ring = s < spans[:, :, None]
    sink_pos = torch.where(s < p, s, -1)
    k = s - sinks
    last = p - 1 - sinks - k  # >= 0 iff some position < p maps to this window slot
    window_pos = sinks + k + torch.div(last, torch.clamp(w, min=1), rounding_mode="floor") * w
    window_pos = torch.where((w > 0) & (last >= 0), window_pos, -1)
    return torch.where(in_ring, torch.where(s < sinks, sink_pos, window_pos), -1)


class DecodeSlotParts(NamedTuple):
    """Where each ring's new decode token goes, short of the block id: the block index in the row's block list, the
    offset inside the block (cell * page + slot in page) and whether the ring has that page at all; [..., R, H]."""

    block_index: torch.Tensor
    offset: torch.Tensor
    held: torch.Tensor


def decode_slot_parts(spans: torch.Tensor, positions: torch.Tensor, sinks: int, page: int) -> DecodeSlotParts:
    """The block-table-free part of `decode_slots` for spans [..., R, H] (every layer at once) and the new tokens'
    positions [R]: computed once per step, so that each layer only looks its block ids up."""
    slot = ring_slot_of(positions[:, None], spans, sinks)  # [..., R, H]
    pages = ring_pages(spans, page)
    k = torch.div(slot, page, rounding_mode="floor")
    flat = flat_index(pages, k[..., None])[..., 0]  # index in the row's flat page list
    heads = spans.shape[-1]
    held = k < pages  # False only for a ring with no pages (a padding row: spans 0)
    block_index = torch.where(held, torch.div(flat, heads, rounding_mode="floor"), 0)
    return DecodeSlotParts(block_index, (flat % heads) * page + slot % page, held)


def decode_slots(block_table: torch.Tensor, parts: DecodeSlotParts, heads: int, page: int) -> torch.Tensor:
    """Flat one-head slot ids [R*H] of the decode rows' new tokens at one layer, from the layer's vLLM block table
    [R, B] and that layer's `decode_slot_parts` [R, H]. Only the one page each ring writes is looked up (no
    [R, H, P] page table: a step whose kernel reads vLLM's block table needs none); a ring with no pages writes
    into the null block's first slot."""
    block = torch.gather(block_table.long(), 1, parts.block_index)
    return torch.where(parts.held, block * (heads * page) + parts.offset, 0).reshape(-1)


def visible_lengths(seq_lens: torch.Tensor, spans: torch.Tensor) -> torch.Tensor:
    """Keys each ring holds after the step's tokens are written: min(seq_len, span), as [L, R*H] int32."""
    return torch.minimum(seq_lens.to(spans.device)[None, :, None], spans).view(spans.shape[0], -1).to(torch.int32)
