"""Position-ordered prefix blocks next to the rings (prefix caching), plain torch.

A prefix block of a layer is an ordinary vLLM block: [H, page] tokens, cell h of block b (one-head page id
b * H + h) holds positions [i * page, (i + 1) * page) of KV head h, where i is the block's index in the request's
prefix columns. Prefill writes every full prompt block's K/V there too (`prefix_write_slots`); a request that hit
the cache copies, per head, exactly what its ring holds after the hit (sinks + the last window positions) from the
hit's blocks into its fresh ring (`restore_ring`). Null columns (block id 0: the scheduler had no room) are
skipped when writing; a hit over a null column cannot happen and fails loudly.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from moa_vllm.ops.page_format import PageFormat
from moa_vllm.ops.ring_layout import slot_positions

Write = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], None]  # (cell_view, slots, k, v)


def prefix_write_slots(
    prefix_ids: torch.Tensor, heads: int, page: int, start: int, count: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(token, head, flat one-head slot) for positions start .. start+count-1 of every head, over prefix_ids [C]
    (the row's prefix block ids; positions must lie below C * page). Positions in null blocks are left out."""
    pos = torch.arange(start, start + count, device=prefix_ids.device)
    block = prefix_ids.long()[torch.div(pos, page, rounding_mode="floor")]  # [count]
    head = torch.arange(heads, device=prefix_ids.device)
    flat = (block[:, None] * heads + head[None, :]) * page + (pos % page)[:, None]  # [count, H]
    keep = (block > 0)[:, None].expand(-1, heads)
    token = (pos - start)[:, None].expand(-1, heads)
    return token[keep], head[None, :].expand(count, -1)[keep], flat[keep]


def restore_ring(
    cell_view: torch.Tensor,
    fmt: PageFormat,
    write: Write,
    prefix_ids: torch.Tensor,
    tables: torch.Tensor,
    spans: torch.Tensor,
    sinks: int,
    hit: int,
    scales: tuple[float, float] = (1.0, 1.0),
    dtype: torch.dtype | None = None,
) -> None:
    """Fill a fresh ring (tables [H, P] one-head page ids, spans [H]) with what it holds after positions 0..hit-1,
    read from the hit's prefix blocks prefix_ids[: hit / page] (an fp8 cache's with its (k, v) scales, into dtype,
    which `write` quantizes again: fp8 -> value -> fp8 is exact at the same scale)."""
    page = fmt.page
    heads = spans.shape[0]
    if hit % page:
        raise RuntimeError(f"moa-vllm: a prefix-cache hit of {hit} tokens is not a whole number of {page}-token blocks")
    ids = prefix_ids[: hit // page].long()
    if ids.shape[0] * page < hit or bool((ids <= 0).any()):
        raise RuntimeError(
            f"moa-vllm: a prefix-cache hit of {hit} tokens has {ids.shape[0]} prefix blocks, some null; refusing to "
            "restore a ring from blocks that were never written"
        )
    held = int(torch.clamp(spans, max=hit).max())
    pos = slot_positions(torch.tensor([hit], device=spans.device), spans[None], sinks, held)[0]  # [H, held]
    head, slot = (pos >= 0).nonzero(as_tuple=True)
    position = pos[head, slot]
    blocks = torch.unique(torch.div(position, page, rounding_mode="floor"))  # sorted: the blocks actually read
    pages = ids[blocks][None, :] * heads + torch.arange(heads, device=ids.device)[:, None]  # [H, nb]
    k, v = fmt.read(cell_view, pages, scales, dtype)  # [H, nb * page, D]
    local = torch.searchsorted(blocks, torch.div(position, page, rounding_mode="floor")) * page + position % page
    flat = tables[head, torch.div(slot, page, rounding_mode="floor")].long() * page + slot % page
    write(cell_view, flat, k[head, local], v[head, local])
