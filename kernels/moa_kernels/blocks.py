"""Block sizes of the ring prefill kernel for a shape: query tokens x packed GQA heads per program, key tile, warps."""

from __future__ import annotations

from dataclasses import dataclass

import triton


@dataclass(frozen=True)
class Blocks:
    block_t: int  # query tokens per program; its rows are block_t x group_pad (a KV head's query heads packed)
    block_n: int  # keys per inner-loop tile
    num_warps: int
    num_stages: int


def pick_blocks(head_dim: int, group: int, *, interpret: bool = False) -> Blocks:
    """About 128 rows per program on a GPU (64 above head_dim 128, to stay in registers) and key tiles of 64 (keys
    are gathered through the ring's page table one by one, so a tile need not match the page). The interpreter
    gets 32 rows and 16 keys: its cost is per element, and small tiles exercise the multi-tile paths at test
    shapes. `tl.dot` needs every dimension >= 16, so there are never fewer than 16 rows."""
    group_pad = triton.next_power_of_2(group)
    if interpret:
        rows, block_n, warps, stages = 32, 16, 1, 1
    elif head_dim > 128:
        rows, block_n, warps, stages = 64, 32, 4, 2
    else:
        rows, block_n, warps, stages = 128, 64, 8, 2
    return Blocks(block_t=max(1, rows // group_pad), block_n=block_n, num_warps=warps, num_stages=stages)
