"""Decode over per-KV-head rings in one Triton kernel that looks each page up in vLLM's block table itself.

Once the step's token is written, ring (r, h) holds exactly the keys its query sees, in slots 0..n-1 (n =
min(seq_len, span)); softmax does not care about order, so decode is unmasked attention over those slots. Slot s
is token s % PAGE of the ring's page j = s // PAGE, and page j is entry flat = base + j * stride of the request's
flat page list of the layer, i.e. cell flat % H of block block_table[r, flat // H] (moa_vllm/ops/ring_layout.py,
`RingPages`). The kernel computes that per key tile, so no [rings, pages] page table exists: the decode metadata is
vLLM's own block table plus two int32 per ring, whatever max_num_seqs and max_model_len are.

One program per (ring, segment), the ring's G query heads as its rows. With SEGMENTS > 1 (split-KV: few rings and
long spans still fill a GPU) each program takes an equal share of the ring's slots, writes its normalised partial
output and log-sum-exp to a scratch the caller owns, and `_merge` combines the segments. A ring with no keys (a
padding row: span 0) gives zeros.

With TRITON_INTERPRET=1 set before Triton is imported it runs on CPU tensors (tests/kernels).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from moa_kernels.ring_prefill import FP8_CELLS, cell_strides


def _ring_decode(
    Q,  # [R, Hq, D] one query token per row
    Out,  # [R, Hq, D]
    Cells,  # [pages, 2 * PAGE, D] one-KV-head cells: K page then V page, token-major, D contiguous
    BlockTable,  # [R, B] int32: vLLM's block table of the layer
    Base,  # [R * H] int32: flat page list index of each ring's page 0
    Stride,  # [R * H] int32: ... and the step between its pages
    Visible,  # [R * H] int32: keys in each ring (the step's own included)
    PartOut,  # [R * H, SEGMENTS, G_PAD, BLOCK_D] float32 (SEGMENTS > 1)
    PartLse,  # [R * H, SEGMENTS, G_PAD] float32
    stride_qr,
    stride_qh,
    stride_or,
    stride_oh,
    stride_cp,
    stride_cs,
    stride_br,
    heads,
    cells_per_block,  # C = layers x heads one-KV-head cells per vLLM block (CellMap)
    block_stride,  # cells between blocks b and b + 1 of one layer page
    layer_stride,  # cells between layer pages j and j + 1 of one block
    scale,
    k_scale,
    v_scale,
    G: tl.constexpr,
    G_PAD: tl.constexpr,
    PAGE: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr,
    SEGMENTS: tl.constexpr,
    KV_FP8: tl.constexpr,
):
    ring = tl.program_id(0)
    seg = tl.program_id(1)
    r = ring // heads
    h = ring % heads
    n = tl.load(Visible + ring)
    base = tl.load(Base + ring)
    step = tl.load(Stride + ring)
    share = tl.cdiv(tl.cdiv(n, SEGMENTS), BLOCK_N) * BLOCK_N
    lo = seg * share
    hi = tl.minimum(lo + share, n)

    g = tl.arange(0, G_PAD)
    d = tl.arange(0, BLOCK_D)
    g_ok = g < G
    d_ok = d < HEAD_DIM
    q_ptr = Q + r.to(tl.int64) * stride_qr + (h * G + g)[:, None] * stride_qh + d[None, :]
    q = tl.load(q_ptr, mask=g_ok[:, None] & d_ok[None, :], other=0.0).to(tl.float32)

    m_i = tl.full([G_PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([G_PAD], tl.float32)
    acc = tl.zeros([G_PAD, BLOCK_D], tl.float32)
    table_row = BlockTable + r.to(tl.int64) * stride_br
    for start in range(lo, hi, BLOCK_N):
        s = start + tl.arange(0, BLOCK_N)
        live = s < hi
        flat = base + (s // PAGE) * step
        block = tl.load(table_row + flat // cells_per_block, mask=live, other=0).to(tl.int64)
        within = flat % cells_per_block
        page_id = block * block_stride + (within // heads) * layer_stride + within % heads
        cell = Cells + page_id[:, None] * stride_cp + (s % PAGE)[:, None] * stride_cs + d[None, :]
        kv_mask = live[:, None] & d_ok[None, :]
        k = tl.load(cell, mask=kv_mask, other=0.0).to(tl.float32)
        v = tl.load(cell + PAGE * stride_cs, mask=kv_mask, other=0.0).to(tl.float32)
        if KV_FP8:
            k = k * k_scale
            v = v * v_scale
        scores = tl.sum(q[:, None, :] * k[None, :, :], axis=2) * scale  # [G_PAD, BLOCK_N]
        scores = tl.where(live[None, :], scores, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(scores, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp(m_i - m_safe)
        probs = tl.exp(scores - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(probs, 1)
        acc = acc * alpha[:, None] + tl.sum(probs[:, :, None] * v[None, :, :], axis=1)
        m_i = m_new

    result = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    if SEGMENTS == 1:
        o_ptr = Out + r.to(tl.int64) * stride_or + (h * G + g)[:, None] * stride_oh + d[None, :]
        tl.store(o_ptr, result.to(Out.dtype.element_ty), mask=g_ok[:, None] & d_ok[None, :])
    else:
        lse = tl.where(l_i > 0, m_i + tl.log(l_i), float("-inf"))
        part = ring.to(tl.int64) * SEGMENTS + seg
        tl.store(PartOut + (part * G_PAD + g)[:, None] * BLOCK_D + d[None, :], result)
        tl.store(PartLse + part * G_PAD + g, lse)


def _merge(
    Out,
    PartOut,
    PartLse,
    stride_or,
    stride_oh,
    heads,
    G: tl.constexpr,
    G_PAD: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    SEGMENTS: tl.constexpr,
):
    """One program per ring: the segments' partial outputs weighted by exp(lse - max lse)."""
    ring = tl.program_id(0)
    r = ring // heads
    h = ring % heads
    seg = tl.arange(0, SEGMENTS)
    g = tl.arange(0, G_PAD)
    d = tl.arange(0, BLOCK_D)
    part = ring.to(tl.int64) * SEGMENTS + seg  # [S]
    lse = tl.load(PartLse + (part * G_PAD)[:, None] + g[None, :])  # [S, G_PAD]
    top = tl.max(lse, 0)
    top = tl.where(top == float("-inf"), 0.0, top)
    weight = tl.exp(lse - top[None, :])  # empty segments: 0
    parts = tl.load(PartOut + ((part * G_PAD)[:, None, None] + g[None, :, None]) * BLOCK_D + d[None, None, :])
    total = tl.sum(weight, 0)
    result = tl.sum(weight[:, :, None] * parts, 0) / tl.where(total > 0, total, 1.0)[:, None]
    o_ptr = Out + r.to(tl.int64) * stride_or + (h * G + g)[:, None] * stride_oh + d[None, :]
    tl.store(o_ptr, result.to(Out.dtype.element_ty), mask=(g < G)[:, None] & (d < HEAD_DIM)[None, :])


_decode_kernel = triton.jit(_ring_decode)
_merge_kernel = triton.jit(_merge)


def split_scratch(rings: int, segments: int, group: int, head_dim: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """The split-KV scratch for up to `rings` rings (allocate once: a captured CUDA graph keeps its address)."""
    g_pad, d_pad = triton.next_power_of_2(group), triton.next_power_of_2(head_dim)
    f32 = dict(dtype=torch.float32, device=device)
    return torch.empty(rings, segments, g_pad, d_pad, **f32), torch.empty(rings, segments, g_pad, **f32)


def ring_decode(
    query: torch.Tensor,  # [R, H * G, D]
    cells: torch.Tensor,  # [pages, 2 * page, D] one-KV-head cells (float8 for an fp8 cache)
    block_table: torch.Tensor,  # [R, B] int32, vLLM's block table of the layer
    base: torch.Tensor,  # [R, H] int32 (RingPages.base)
    stride: torch.Tensor,  # [R, H] int32 (RingPages.stride)
    visible: torch.Tensor,  # [R * H] int32: keys in each ring
    scale: float,
    out: torch.Tensor,  # [R, H * G, D]
    *,
    segments: int = 1,
    scratch: tuple[torch.Tensor, torch.Tensor] | None = None,
    scales: tuple[float, float] = (1.0, 1.0),
    block_n: int | None = None,
    cell_map=None,
) -> None:
    """Decode attention of each row's query heads over its H rings, into out. `segments` > 1 splits every ring's
    keys over that many programs (a power of two; needs `split_scratch` for at least R * H rings). float8 cells hold
    value / scale: `scales` are the layer's (k, v) scales. `cell_map`: where a block's cells lie in `cells`
    (ring_prefill.cell_strides; None: one layer page per block)."""
    rows, hq, head_dim = query.shape
    heads = base.shape[1]
    group = hq // heads
    page = cells.shape[1] // 2
    rings = rows * heads
    if rings == 0:
        return
    if base.shape != (rows, heads) or stride.shape != (rows, heads) or visible.shape != (rings,):
        raise ValueError(
            f"moa_kernels.ring_decode: base {tuple(base.shape)} / stride {tuple(stride.shape)} must be [{rows}, "
            f"{heads}] and visible {tuple(visible.shape)} [{rings}]"
        )
    for name, tensor in (("query", query), ("cells", cells), ("out", out), ("block_table", block_table)):
        if tensor.stride(-1) != 1:
            raise ValueError(f"moa_kernels.ring_decode: {name} must be contiguous in its last dimension")
    if segments > 1 and (scratch is None or scratch[1].shape[0] < rings or scratch[1].shape[1] != segments):
        raise ValueError(f"moa_kernels.ring_decode: {segments} segments need a split scratch for {rings} rings")
    g_pad, d_pad = triton.next_power_of_2(group), triton.next_power_of_2(head_dim)
    part_out, part_lse = scratch if segments > 1 else (out, out)  # unused without segments
    interpret = bool(triton.knobs.runtime.interpret)
    _decode_kernel[(rings, segments)](
        query,
        out,
        cells,
        block_table,
        base.contiguous().view(-1),
        stride.contiguous().view(-1),
        visible,
        part_out,
        part_lse,
        query.stride(0),
        query.stride(1),
        out.stride(0),
        out.stride(1),
        cells.stride(0),
        cells.stride(1),
        block_table.stride(0),
        heads,
        *cell_strides(cell_map, heads),
        scale,
        float(scales[0]),
        float(scales[1]),
        G=group,
        G_PAD=g_pad,
        PAGE=page,
        HEAD_DIM=head_dim,
        BLOCK_D=d_pad,
        BLOCK_N=block_n or (16 if interpret else 64),
        SEGMENTS=segments,
        KV_FP8=cells.dtype in FP8_CELLS,
        num_warps=4,
    )
    if segments > 1:
        _merge_kernel[(rings,)](
            out, part_out, part_lse, out.stride(0), out.stride(1), heads,
            G=group, G_PAD=g_pad, HEAD_DIM=head_dim, BLOCK_D=d_pad, SEGMENTS=segments, num_warps=4,
        )  # fmt: skip
