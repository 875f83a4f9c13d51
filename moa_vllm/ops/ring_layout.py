"""Where each (request, layer, KV head) ring lives and which slots a step reads and writes; plain torch, batched.

All MoA layers are one KV cache group: a request has ONE block list, and a vLLM block holds one layer page of
[H, page] tokens for each of the group's L layers, i.e. C = L * H one-KV-head cells. The request's flat page list
is its blocks' cells in order (flat page f = cell f % C of block f // C), and the layers' rings sit at known
offsets in it (moa_vllm/plan/ring.py): layer l's region starts at layer page first_layer_page[l] = the layer pages
of layers 0..l-1 (each layer takes ceil(its head pages / H) layer pages), so offset = H * that. Inside a layer's
region rings are page aligned: head h starts at page first[h] after the region's start. Where every head of a
request's layer has the same number of pages P (dense and uniform layers; short requests whose spans all clamp to
N) the rings interleave instead: page k of head h is region page k * H + h, i.e. cell h of one layer page, which
is vLLM's own layout, so a kernel can read all H rings of the request as one sequence with H KV heads.

Kernels see the whole KV cache region as one-KV-head cells; `CellMap` says where a block's cells are (cell c of
block b is b * block_stride + (c // H) * layer_stride + c % H: vLLM's layer-outer layout gives block_stride H,
layer_stride num_blocks * H), and every ring is a "virtual sequence" with its own page table.

Everything here is vectorised over layers ([L, R, H] spans), so one call per step serves every layer.
"""

from __future__ import annotations

from typing import NamedTuple

import torch


class CellMap(NamedTuple):
    """Where the one-KV-head cells of a vLLM block lie in the cache's region view: cell c (< layers * heads) of
    block b is b * block_stride + (c // heads) * layer_stride + c % heads. One layer (a group of its own):
    `CellMap.single(H)`, cell b * H + c."""

    heads: int
    layers: int = 1
    block_stride: int = 0  # 0: heads * layers (blocks of the group's layer pages side by side)
    layer_stride: int = 0  # 0: heads

    @classmethod
    def single(cls, heads: int) -> CellMap:
        return cls(heads, 1, heads, heads)

    @property
    def per_block(self) -> int:
        return self.heads * self.layers

    @property
    def strides(self) -> tuple[int, int]:
        return (self.block_stride or self.per_block, self.layer_stride or self.heads)

    def cell(self, block: torch.Tensor, within: torch.Tensor) -> torch.Tensor:
        """Cell ids for block ids and cell indices within the block (block 0, vLLM's null block, is null in every
        layer's region, so its cells are safe to write)."""
        sb, sl = self.strides
        return block * sb + torch.div(within, self.heads, rounding_mode="floor") * sl + within % self.heads

    def flat_cell(self, block_table: torch.Tensor, flat: torch.Tensor, dim: int = 1) -> torch.Tensor:
        """Cell ids of flat page indices `flat` (the request's flat page list) through its block table row(s)."""
        c = self.per_block
        block = torch.gather(block_table.long(), dim, torch.div(flat, c, rounding_mode="floor").flatten(dim))
        return self.cell(block.view_as(flat), flat % c)

    def layer_page(self, block: torch.Tensor, layer: int) -> torch.Tensor:
        """Layer-page ids (cell / H) of group layer `layer`'s page in blocks `block` (null blocks -> 0)."""
        sb, sl = self.strides
        return torch.where(block > 0, (block * sb + layer * sl) // self.heads, 0)


def layer_offsets(spans: torch.Tensor, page: int, heads: int) -> torch.Tensor:
    """Flat page offset [L, R] of each layer's ring region in the request's flat page list, for spans [L, R, H]:
    H x the layer pages of the layers before it (each layer page-aligned to a whole layer page)."""
    blocks = blocks_needed(spans, page, heads)  # [L, R] layer pages per layer
    return (torch.cumsum(blocks, dim=0) - blocks) * heads


def ring_spans(
    alphas: torch.Tensor, betas: torch.Tensor, n: torch.Tensor, min_span: int, cap: torch.Tensor | None = None
) -> torch.Tensor:
    """Spans [L, R, H] for rules [L, H] at span lengths n [R] of requests of `cap` [R] tokens (None: n); same rounding
    as moa_vllm.plan.span.span_tokens."""
    n64 = n.to(torch.float64)[None, :, None]
    top = n64 if cap is None else torch.minimum(n64, cap.to(torch.float64)[None, :, None])
    raw = torch.floor(alphas.to(torch.float64)[:, None, :] + betas.to(torch.float64)[:, None, :] * n64 + 0.5)
    return torch.minimum(torch.clamp(raw, min=float(min_span)), top).to(torch.int64)


def ring_pages(spans: torch.Tensor, page: int) -> torch.Tensor:
    return torch.div(spans + page - 1, page, rounding_mode="floor")


def blocks_needed(spans: torch.Tensor, page: int, heads: int) -> torch.Tensor:
    """Blocks [..., R] each request holds in each layer for spans [..., R, H] (same as plan.ring.blocks_for_spans)."""
    return torch.div(ring_pages(spans, page).sum(-1) + heads - 1, heads, rounding_mode="floor")


def flat_pages(pages: torch.Tensor, width: int, offset: torch.Tensor | None = None) -> torch.Tensor:
    """Index [..., H, width] of each ring's page j in the request's flat page list, for pages [..., H] and the
    layer's region offset [...] (`layer_offsets`; None: 0): packed (head h from first[h] = pages of heads
    0..h-1) or, where all H rings have equal pages, interleaved (k * H + h). Entries j >= pages are meaningless
    (callers mask them)."""
    return flat_index(pages, torch.arange(width, device=pages.device), offset)


class RingPages(NamedTuple):
    """Where each ring's page j sits in its request's flat page list: flat = base + j * stride ([..., R, H] int32
    each; packed rings: base offset + first[h], stride 1; interleaved: base offset + h, stride H; offset = the
    layer's region). Page j's one-head page id is then `CellMap.cell(block_table[r, flat // C], flat % C)`, which a
    kernel can look up itself: no page table."""

    base: torch.Tensor
    stride: torch.Tensor


def ring_page_layout(pages: torch.Tensor, offset: torch.Tensor | None = None) -> RingPages:
    """The layout rule of `flat_pages` as (base, stride) for pages [..., H] (every ring's page count) and the
    layers' region offsets [...] (None: 0)."""
    heads = pages.shape[-1]
    first = torch.cumsum(pages, dim=-1) - pages
    equal = (pages == pages[..., :1]).all(dim=-1, keepdim=True)
    base = torch.where(equal, torch.arange(heads, device=pages.device), first)
    if offset is not None:
        base = base + offset[..., None]
    stride = torch.where(equal, heads, 1).expand_as(pages)
    return RingPages(base.to(torch.int32), stride.to(torch.int32).contiguous())


def flat_index(pages: torch.Tensor, j: torch.Tensor, offset: torch.Tensor | None = None) -> torch.Tensor:
    """Index in the request's flat page list of ring page j of each head, for pages [..., H], j broadcast
    against [..., H, W] (W = 1 for one page per ring) and region offsets [...]: the layout rule of `flat_pages`."""
    layout = ring_page_layout(pages, offset)
    return layout.base.long()[..., None] + j * layout.stride.long()[..., None]


def page_tables(spans: torch.Tensor, block_table: torch.Tensor, page: int, max_pages: int,
                cell_map: CellMap | None = None) -> torch.Tensor:
    """One-head page ids [L, R, H, max_pages] (int32) of every ring; entries past a ring's pages are 0.

    spans [L, R, H]; block_table [R, B]: each request's blocks of the one MoA group (vLLM's block table); cell_map:
    the group's blocks (default: L layer pages of H cells side by side).
    """
    layers, rows, heads = spans.shape
    cell_map = cell_map or CellMap(heads, layers)
    pages = ring_pages(spans, page)
    j = torch.arange(max_pages, device=spans.device)
    flat = flat_pages(pages, max_pages, layer_offsets(spans, page, heads))  # [L, R, H, P]
    valid = j < pages[..., None]
    flat = torch.where(valid, flat, 0).permute(1, 0, 2, 3)  # [R, L, H, P]
    ids = cell_map.flat_cell(block_table, flat.reshape(rows, -1)).view_as(flat).permute(1, 0, 2, 3)
    return torch.where(valid, ids, 0).to(torch.int32)


def layer_page_table(
    spans: torch.Tensor,
    block_table: torch.Tensor,
    page: int,
    out: torch.Tensor,
    offset: torch.Tensor | None = None,
    cell_map: CellMap | None = None,
) -> torch.Tensor:
    """One layer's ring page tables written into `out` [R, H, P] (int32) and returned: the rows of `page_tables` for
    spans [R, H], the group's block table [R, B] and the layer's region offsets [R] (None: 0).

    The forward derives each layer's tables here, from vLLM's own block table, into one scratch every layer shares
    (RingState), instead of keeping [L, max_rows, H, P] tables: H one-head page ids per vLLM block id are the
    kernels' input, so a persistent copy per layer would cost H x vLLM's block tables. Only torch ops of fixed shape:
    safe inside a captured CUDA graph."""
    heads, width = spans.shape[-1], out.shape[-1]
    cell_map = cell_map or CellMap.single(heads)
    pages = ring_pages(spans, page)
    j = torch.arange(width, device=spans.device)
    flat = flat_pages(pages, width, offset)  # [R, H, P] page index in the request's flat page list
    valid = j < pages[..., None]
    ids = cell_map.flat_cell(block_table, torch.where(valid, flat, 0))
    out.copy_(torch.where(valid, ids, 0))
    return out


def layer_pages(block_table: torch.Tensor, first: torch.Tensor, width: int, cell_map: CellMap) -> torch.Tensor:
    """Layer-page ids [R, width] (cell / H) of the request's layer pages first[r] .. first[r] + width - 1: an
    interleaved layer's pages, which a kernel reads as one sequence with H KV heads (its cells are vLLM's layout)."""
    q = first.long()[:, None] + torch.arange(width, device=first.device)[None, :]
    block = torch.gather(block_table.long(), 1, torch.div(q, cell_map.layers, rounding_mode="floor"))
    return cell_map.layer_page(block, q % cell_map.layers).to(torch.int32)


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
    """Where each ring's new decode token goes: its flat page index in the row's flat page list, the slot within the
    page and whether the ring has that page at all; [..., R, H]."""

    flat: torch.Tensor
    in_page: torch.Tensor
    held: torch.Tensor


def decode_slot_parts(
    spans: torch.Tensor, positions: torch.Tensor, sinks: int, page: int, offsets: torch.Tensor | None = None
) -> DecodeSlotParts:
    """The block-table-free part of `decode_slots` for spans [..., R, H] (every layer at once), the new tokens'
    positions [R] and the layers' region offsets [..., R]: computed once per step, so that each layer only looks
    its block ids up."""
    slot = ring_slot_of(positions[:, None], spans, sinks)  # [..., R, H]
    pages = ring_pages(spans, page)
    k = torch.div(slot, page, rounding_mode="floor")
    flat = flat_index(pages, k[..., None], offsets)[..., 0]  # index in the row's flat page list
    held = k < pages  # False only for a ring with no pages (a padding row: spans 0)
    return DecodeSlotParts(torch.where(held, flat, 0), slot % page, held)


def decode_slots(block_table: torch.Tensor, parts: DecodeSlotParts, page: int, cell_map: CellMap) -> torch.Tensor:
    """Flat one-head slot ids [R*H] of the decode rows' new tokens at one layer, from the group's vLLM block table
    [R, B] and that layer's `decode_slot_parts` [R, H]. Only the one page each ring writes is looked up (no
    [R, H, P] page table: a step whose kernel reads vLLM's block table needs none); a ring with no pages writes
    into the null block's first slot."""
    cell = cell_map.flat_cell(block_table, parts.flat)
    return torch.where(parts.held, cell * page + parts.in_page, 0).reshape(-1)


def visible_lengths(seq_lens: torch.Tensor, spans: torch.Tensor) -> torch.Tensor:
    """Keys each ring holds after the step's tokens are written: min(seq_len, span), as [L, R*H] int32."""
    return torch.minimum(seq_lens.to(spans.device)[None, :, None], spans).view(spans.shape[0], -1).to(torch.int32)
