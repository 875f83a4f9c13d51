"""Prefill and chunked prefill over per-KV-head rings in one Triton kernel.

A row's chunk holds the queries at positions computed .. computed + n - 1; query q of KV head h sees key k iff
k <= q and (k < sinks or q - k < window[h]), window = span - sinks. The keys come from two places: positions below
`computed` from the ring as it was before the step (slot of p: p below sinks, else sinks + (p - sinks) mod window;
its page j = slot // page is looked up in vLLM's block table: flat = base + j * stride in the row's flat page list,
cell flat % H of block block_table[r, flat // H]; no page table), the others from the chunk's own fresh K/V. One
program takes one (row, query tile, KV head) with the KV head's query heads packed as extra rows, and walks keys in
POSITION order over just two ranges, the sinks below the band and the band [first query - window + 1, last query],
so tiles outside sinks + window are never visited whatever the ring's rotation; one online softmax runs across both
sources. Positions in the band below `computed` are always still in the ring (the band starts after computed -
window), so nothing else is read; stale slots and other requests' pages are never loaded.

The survivors of the chunk (sinks and the last `window` positions) are written into the ring by the caller AFTER
this kernel, so a chunk never overwrites a key one of its own queries still needs.

With TRITON_INTERPRET=1 set before Triton is imported the kernel runs on CPU tensors in Triton's interpreter (the
tests do this in a subprocess); CPU serving uses the torch ring prefill instead (moa_vllm/ops/ring_prefill.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from moa_kernels.blocks import Blocks, pick_blocks

FP8_CELLS = (torch.float8_e4m3fn, torch.float8_e5m2)  # cell dtypes read as quantized values


def _ring_prefill(
    Q,  # [T, Hq, D] the step's queries (only prefill rows' tokens are read)
    KNew,  # [T, H, D] the step's fresh keys
    VNew,
    Cells,  # [pages, 2 * PAGE, D] one-KV-head cells: K page then V page, token-major, D contiguous
    Out,  # [T, Hq, D]
    BlockTable,  # [R, B] int32 vLLM's block table of the layer
    Base,  # [R, H] int32 flat page list index of each ring's page 0 (RingPages)
    Stride,  # [R, H] int32 ... and the step between its pages
    Spans,  # [R, H] int64 ring sizes
    Computed,  # [R] int32 tokens in the rings before the step
    QStart,  # [R + 1] int32 first token of each row in Q
    TileRow,  # [tiles] int32 the row of each query tile
    TileStart,  # [tiles] int32 the tile's first token within its row
    stride_qt,
    stride_qh,
    stride_kt,
    stride_kh,
    stride_vt,
    stride_vh,
    stride_ot,
    stride_oh,
    stride_cp,
    stride_cs,
    stride_br,
    heads,
    cells_per_block,  # C = layers x heads one-KV-head cells per vLLM block (CellMap)
    block_stride,  # cells between blocks b and b + 1 of one layer page
    layer_stride,  # cells between layer pages j and j + 1 of one block
    stride_sr,
    scale,
    sinks,
    k_scale,  # fp8 cells: a ring value is float8 * scale (the fresh chunk comes in already dequantized)
    v_scale,
    G: tl.constexpr,  # query heads per KV head
    G_PAD: tl.constexpr,
    PAGE: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_N: tl.constexpr,
    DOT_FP32: tl.constexpr,  # upcast before tl.dot (the Triton 3.9 interpreter's bf16 dot is wrong)
    PRECISION: tl.constexpr,  # tl.dot input precision: "ieee" for float32 queries (no silent tf32), else "tf32"
    KV_FP8: tl.constexpr,  # the cells hold float8 values (vLLM's fp8 KV cache, per-tensor scales)
):
    BLOCK_M: tl.constexpr = BLOCK_T * G_PAD
    tile = tl.program_id(0)
    h = tl.program_id(1)
    r = tl.load(TileRow + tile)
    t0 = tl.load(TileStart + tile)
    qs = tl.load(QStart + r)
    n = tl.load(QStart + r + 1) - qs
    computed = tl.load(Computed + r)
    window = (tl.load(Spans + r * stride_sr + h) - sinks).to(tl.int32)
    wrap = tl.maximum(window, 1)

    m = tl.arange(0, BLOCK_M)
    t = t0 + m // G_PAD
    g = m % G_PAD
    row_ok = (t < n) & (g < G)
    q_pos = computed + t
    d = tl.arange(0, BLOCK_D)
    d_ok = d < HEAD_DIM
    q_ptr = Q + (qs + t).to(tl.int64)[:, None] * stride_qt + (h * G + g)[:, None] * stride_qh + d[None, :]
    q = tl.load(q_ptr, mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    if DOT_FP32:
        q = q.to(tl.float32)

    last = computed + tl.minimum(t0 + BLOCK_T, n) - 1  # the tile's last query position
    band_lo = tl.maximum(computed + t0 - window + 1, 0)  # oldest key any query of the tile sees by window
    sink_hi = tl.minimum(sinks, band_lo)  # sinks below the band: [0, sink_hi)
    sink_tiles = tl.cdiv(sink_hi, BLOCK_N)
    band_tiles = tl.cdiv(tl.maximum(last + 1 - band_lo, 0), BLOCK_N)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    table_row = BlockTable + r.to(tl.int64) * stride_br
    base = tl.load(Base + r * heads + h)
    step = tl.load(Stride + r * heads + h)
    for i in range(0, sink_tiles + band_tiles):
        in_sinks = i < sink_tiles
        p0 = tl.where(in_sinks, i * BLOCK_N, band_lo + (i - sink_tiles) * BLOCK_N)
        p_end = tl.where(in_sinks, sink_hi, last + 1)
        p = p0 + tl.arange(0, BLOCK_N)
        live = p < p_end
        old = live & (p < computed)  # in the ring
        new = live & (p >= computed)  # in the chunk
        slot = tl.where(p < sinks, p, sinks + (p - sinks) % wrap)
        flat = base + (slot // PAGE) * step
        block = tl.load(table_row + flat // cells_per_block, mask=old, other=0).to(tl.int64)
        within = flat % cells_per_block
        page_id = block * block_stride + (within // heads) * layer_stride + within % heads
        cell = Cells + page_id[:, None] * stride_cp + (slot % PAGE)[:, None] * stride_cs + d[None, :]
        kv_mask = d_ok[None, :]
        k = tl.load(cell, mask=old[:, None] & kv_mask, other=0.0)
        v = tl.load(cell + PAGE * stride_cs, mask=old[:, None] & kv_mask, other=0.0)
        if KV_FP8:  # dequantize into the chunk's dtype: both sources then meet in one dot
            k = (k.to(tl.float32) * k_scale).to(KNew.dtype.element_ty)
            v = (v.to(tl.float32) * v_scale).to(VNew.dtype.element_ty)
        fresh = (qs + p - computed).to(tl.int64)[:, None]
        k_new = tl.load(KNew + fresh * stride_kt + h * stride_kh + d[None, :], mask=new[:, None] & kv_mask, other=0.0)
        v_new = tl.load(VNew + fresh * stride_vt + h * stride_vh + d[None, :], mask=new[:, None] & kv_mask, other=0.0)
        k = tl.where(new[:, None], k_new.to(k.dtype), k)
        v = tl.where(new[:, None], v_new.to(v.dtype), v)
        if DOT_FP32:
            k = k.to(tl.float32)
            v = v.to(tl.float32)

        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale
        seen = (
            live[None, :]
            & (p[None, :] <= q_pos[:, None])
            & ((p[None, :] < sinks) | (q_pos[:, None] - p[None, :] < window))
        )
        s = tl.where(seen, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row that has seen nothing yet stays at 0
        alpha = tl.exp(m_i - m_safe)
        probs = tl.exp(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(probs, 1)
        acc = acc * alpha[:, None] + tl.dot(probs.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new

    result = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    o_ptr = Out + (qs + t).to(tl.int64)[:, None] * stride_ot + (h * G + g)[:, None] * stride_oh + d[None, :]
    tl.store(o_ptr, result.to(Out.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])


_kernel = triton.jit(_ring_prefill)


def interpreting() -> bool:
    """Triton's interpreter is on (TRITON_INTERPRET=1 before triton was imported): kernels run on CPU tensors."""
    return bool(triton.knobs.runtime.interpret)


@dataclass(frozen=True)
class Launch:
    """One step's launch data: the same for every layer, so the caller makes it once per step (`plan_launch`) and
    passes it to each layer's launch: one host->device copy per step instead of four per layer."""

    computed: torch.Tensor  # [R] int32
    query_start_loc: torch.Tensor  # [R + 1] int32
    tile_row: torch.Tensor  # [tiles] int32
    tile_start: torch.Tensor  # [tiles] int32
    tiles: int
    block_t: int


def query_tiles(query_start_loc: list[int], rows: list[int], block_t: int) -> tuple[list[int], list[int]]:
    """(row, first token) of every query tile of the given rows."""
    tile_row, tile_start = [], []
    for r in rows:
        for t0 in range(0, query_start_loc[r + 1] - query_start_loc[r], block_t):
            tile_row.append(r)
            tile_start.append(t0)
    return tile_row, tile_start


def plan_launch(
    computed: list[int], query_start_loc: list[int], rows: list[int], block_t: int, device
) -> Launch | None:
    """The launch data of the rows' query tiles of block_t tokens (pinned, non-blocking copy on CUDA); None if the
    rows have no query."""
    tile_row, tile_start = query_tiles(query_start_loc, rows, block_t)
    if not tile_row:
        return None
    parts = (computed, query_start_loc, tile_row, tile_start)
    host = torch.tensor([x for part in parts for x in part], dtype=torch.int32)
    if torch.device(device).type == "cuda":
        host = host.pin_memory()
    flat = host.to(device, non_blocking=True)
    c, q, r, t = torch.split(flat, [len(part) for part in parts])
    return Launch(c, q, r, t, len(tile_row), block_t)


def cell_strides(cell_map, heads: int) -> tuple[int, int, int]:
    """(cells per block, block stride, layer stride) of a cell map (heads, layers, block_stride, layer_stride):
    cell c of block b is b * block_stride + (c // heads) * layer_stride + c % heads. None: one layer page of
    `heads` cells per block (cell b * heads + c)."""
    if cell_map is None:
        return heads, heads, heads
    h, layers, block_stride, layer_stride = cell_map
    if h != heads:
        raise ValueError(f"moa_kernels: a cell map of {h} heads for rings of {heads} heads")
    return h * layers, block_stride or h * layers, layer_stride or h


def ring_prefill(
    query: torch.Tensor,  # [T, Hq, D]
    key: torch.Tensor,  # [T, H, D] the step's fresh keys
    value: torch.Tensor,  # [T, H, D]
    cells: torch.Tensor,  # [pages, 2 * page, D] token-major one-KV-head cells
    block_table: torch.Tensor,  # [R, B] int32 vLLM's block table of the layer
    base: torch.Tensor,  # [R, H] int32 (RingPages.base: each ring's page j is flat page base + j * stride)
    stride: torch.Tensor,  # [R, H] int32
    spans: torch.Tensor,  # [R, H]
    computed: list[int],  # [R] host: tokens already in each row's rings
    query_start_loc: list[int],  # [R + 1] host
    rows: list[int],  # the rows to compute (e.g. a step's prefill rows); the others' outputs are left alone
    sinks: int,
    scale: float,
    out: torch.Tensor,  # [T, Hq, D]
    *,
    blocks: Blocks | None = None,
    launch: Launch | None = None,
    scales: tuple[float, float] = (1.0, 1.0),
    cell_map=None,
):
    """Attention of the rows' chunks over (their rings before the step) + (their own fresh keys), into out.
    `launch` is the step's `plan_launch` for these rows (made here when not given). float8 cells (an fp8 KV cache)
    hold value / scale: `scales` are the layer's (k, v) scales; key/value then come as the cache will give them back
    (quantized and dequantized by the caller), in the queries' dtype. `cell_map` (`cell_strides`): where a block's
    cells lie in `cells` (all MoA layers' pages in one block; None: one layer page per block).
    Returns the launch handle (on a GPU its compiled kernel: n_regs, n_spills), None if there was nothing to do."""
    heads, head_dim = key.shape[1], key.shape[2]
    group = query.shape[1] // heads
    page = cells.shape[1] // 2
    interpret = interpreting()
    blocks = blocks or pick_blocks(head_dim, group, interpret=interpret)
    if launch is None:
        launch = plan_launch(computed, query_start_loc, rows, blocks.block_t, query.device)
    if launch is None:
        return None
    if launch.block_t != blocks.block_t:
        raise ValueError(f"moa_kernels.ring_prefill: launch planned for {launch.block_t}-token tiles, blocks have "
                         f"{blocks.block_t}")  # fmt: skip
    named = (("query", query), ("key", key), ("value", value), ("cells", cells), ("out", out))
    named += (("block_table", block_table),)
    for name, tensor in named:
        if tensor.stride(-1) != 1:
            raise ValueError(f"moa_kernels.ring_prefill: {name} must be contiguous in its last dimension")
    spans = spans.to(query.device)
    if base.shape != spans.shape or stride.shape != spans.shape:
        raise ValueError(f"moa_kernels.ring_prefill: base {tuple(base.shape)} / stride {tuple(stride.shape)} must "
                         f"match spans {tuple(spans.shape)}")  # fmt: skip
    return _kernel[(launch.tiles, heads)](
        query,
        key,
        value,
        cells,
        out,
        block_table,
        base.contiguous(),
        stride.contiguous(),
        spans,
        launch.computed,
        launch.query_start_loc,
        launch.tile_row,
        launch.tile_start,
        query.stride(0),
        query.stride(1),
        key.stride(0),
        key.stride(1),
        value.stride(0),
        value.stride(1),
        out.stride(0),
        out.stride(1),
        cells.stride(0),
        cells.stride(1),
        block_table.stride(0),
        heads,
        *cell_strides(cell_map, heads),
        spans.stride(0),
        scale,
        sinks,
        float(scales[0]),
        float(scales[1]),
        G=group,
        G_PAD=triton.next_power_of_2(group),
        PAGE=page,
        HEAD_DIM=head_dim,
        BLOCK_D=triton.next_power_of_2(head_dim),
        BLOCK_T=blocks.block_t,
        BLOCK_N=blocks.block_n,
        DOT_FP32=interpret and query.dtype == torch.bfloat16,
        PRECISION="ieee" if query.dtype == torch.float32 else "tf32",
        KV_FP8=cells.dtype in FP8_CELLS,
        num_warps=blocks.num_warps,
        num_stages=blocks.num_stages,
    )
