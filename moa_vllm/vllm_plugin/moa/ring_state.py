"""The worker's ring metadata: each request's ring layout computed once, kept in persistent tensors, one build per step.

Per step the model runner publishes the batch's request ids and lengths N into the engine's context
(engine_context.py; patches.py, for runner V1 and V2), and each builder passes it to `step_for`. The first MoA
metadata builder called in a step makes the step's `RingStep` for every layer at once: spans [L, R, H] (recomputed
only when the batch's requests change) and, at the first attention call, the visible lengths of all layers
[L, R*H]. All MoA layers are one KV cache group, so there is one builder call per step and one vLLM block table:
each layer's rings sit at known offsets of the request's block list (`layer_offsets`, derived per step for all
layers), and the cache is addressed as one region of one-KV-head cells (`CellMap`). A request's blocks are checked
against what its rings need when it is first scheduled (and again after a restart or a change of N).

Page tables are not kept. A ring's one-head page ids [R*H, P] cost H x vLLM's block tables per layer; keeping them
for every layer and max_num_seqs rows was ~2 GiB at 8B / 128k / 256 seqs (benchmarks/metadata_bytes.py). On CUDA
the Triton kernels look each page up in vLLM's block table themselves, through each ring's `RingPages` (computed
per step for all layers: `RingStep.layout`), so no page table exists there. On CPU, CPU_ATTN takes rectangular
tables: each layer's forward derives them from its vLLM block table into one scratch all layers share
(`RingStep.table`) where a kernel reads them. The decode tokens' slots are looked up in the block table itself
(`RingStep.decode_slots`: one page per ring, not a table). The scratch ([max_rows * H * P_widest] int32, CPU only)
and the spans buffer are `RingBuffers`, allocated while the model is built (backend.MoAImpl), so vLLM's memory
profiling counts them as model memory.

CUDA graphs (decode-only batches): a captured graph replays the kernels with the addresses it saw at capture, so
everything the decode path reads lives in buffers allocated once: the spans buffer, vLLM's persistent block tables
and seq_lens; each build rewrites the spans in place; rows past the batch (and padding rows, which have no request)
hold spans 0, so they see no keys and a padded row's write lands in the null block. Ring layouts, visible lengths
and slots are derived inside the forward with fixed shapes, and nothing on the decode path reads
a value back to the host (the build takes lengths from the runner's CPU copies).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from moa_vllm.ops.ring_layout import (
    CellMap,
    DecodeSlotParts,
    RingPages,
    blocks_needed,
    decode_slot_parts,
    decode_slots,
    layer_offsets,
    layer_page_table,
    layer_pages,
    ring_page_layout,
    ring_pages,
    ring_spans,
    visible_lengths,
)
from moa_vllm.vllm_plugin.moa.published_batch import PublishedBatch


@dataclass
class RingBuffers:
    """The ring metadata's persistent device memory for one engine: spans [L, max_rows, H] int64 and the page-table
    scratch [max_rows * H * max_pages] int32 that every layer's forward reuses."""

    spans: torch.Tensor
    tables: torch.Tensor
    max_pages: int

    @classmethod
    def allocate(
        cls, layers: int, max_rows: int, heads: int, max_pages: int, device: torch.device, page_tables: bool = True
    ) -> RingBuffers:
        """page_tables False (kernels that read vLLM's block table: CUDA): no scratch at all."""
        return cls(
            torch.zeros(layers, max_rows, heads, dtype=torch.int64, device=device),
            torch.zeros(max_rows * heads * max_pages if page_tables else 0, dtype=torch.int32, device=device),
            max_pages,
        )

    @property
    def nbytes(self) -> int:
        return self.spans.nbytes + self.tables.nbytes


def needs_page_tables(device: torch.device) -> bool:
    """Whether the device's ring kernels read [R, H, P] page tables (CPU_ATTN) rather than vLLM's block table (the
    Triton kernels on CUDA; backend.ring_kernels makes the same switch)."""
    return torch.device(device).type != "cuda"


def widest_pages(alphas: torch.Tensor, betas: torch.Tensor, max_model_len: int, min_span: int, page: int) -> int:
    """Pages of the widest ring any request can have (N = max_model_len): the scratch's row width."""
    return int(ring_pages(ring_spans(alphas, betas, torch.tensor([max_model_len]), min_span), page).max())


@dataclass
class RingStep:
    """One step's ring metadata for every MoA layer (layer index = first dim)."""

    serial: int
    req_ids: tuple[str | None, ...]
    num_decodes: int  # rows 0..num_decodes-1 have one query token each
    query_start_loc: list[int]  # [R + 1] host
    computed: list[int]  # [R] host: tokens already in each request's rings before the step
    spans: torch.Tensor  # [L, R, H] int64 (device)
    seq_lens: torch.Tensor  # [R] device
    page: int
    widths: list[int]  # [L] host: page-table width per layer (the widest ring of the step's rows at that layer)
    scratch: torch.Tensor  # flat int32 (device): the one layer's tables `table` derives
    block_table: torch.Tensor | None = None  # vLLM's block table [R, B] of the MoA group (all layers)
    cell_map: CellMap | None = None  # where a block's cells lie in the cache region (set at the first forward)
    offsets: torch.Tensor | None = None  # [L, R]: each layer's region in its row's flat page list
    visible: torch.Tensor | None = None  # [L, R*H] int32
    decode_parts: DecodeSlotParts | None = None  # [L, num_decodes, H]: the decode tokens' slots short of block ids
    layouts: RingPages | None = None  # [L, R, H]: where each ring's pages sit in its row's flat page list
    prefill_launch: object | None = None  # the device prefill kernel's launch data, made by the step's first layer
    lengths: list[int] = field(default_factory=list)  # [R] span length L per row
    caps: list[int] = field(default_factory=list)  # [R] each row's own N (no span exceeds it)
    prompts: list[int] | None = None  # [R] prompt tokens per row (None: the runner did not publish them)
    restore: list[int] = field(default_factory=list)  # rows whose fresh ring is restored from a cache hit first
    prefix_ids: dict[int, torch.Tensor] = field(default_factory=dict)  # row -> its prefix columns' block ids
    prefix_rows: list[int] = field(default_factory=list)  # rows with prompt tokens to write or a ring to restore

    _table_layer: int | None = None  # the layer whose tables the scratch holds
    _equal_spans: list[bool] | None = None  # per layer: every decode row's H rings have one span (host)
    _head_visible: dict | None = None  # layer -> (key, [num_decodes] int32): shared by layers of equal spans
    kernel_metadata: dict = field(default_factory=dict)  # a kernel's per-call metadata that layers share (CPU_ATTN)

    def finalize(self, sinks: int, page: int, cell_map: CellMap) -> None:
        """The layers' region offsets, visible lengths and the decode tokens' slot parts of all layers in one go
        (once per step, at the first attention call; fixed shapes, from the persistent spans)."""
        if self.visible is None:
            if cell_map.layers != self.spans.shape[0] or cell_map.heads != self.spans.shape[2]:
                raise RuntimeError(
                    f"moa-vllm: the KV cache region holds {cell_map.layers} layer pages of {cell_map.heads} KV heads "
                    f"per block but the plan has {self.spans.shape[0]} layers of {self.spans.shape[2]} heads"
                )
            self.cell_map = cell_map
            self.offsets = layer_offsets(self.spans, page, self.spans.shape[2])
            self.visible = visible_lengths(self.seq_lens, self.spans)
            nd = self.num_decodes
            positions = torch.clamp(self.seq_lens[:nd].to(torch.int64) - 1, min=0)  # padding rows: spans 0
            self.decode_parts = decode_slot_parts(self.spans[:, :nd], positions, sinks, page, self.offsets[:, :nd])

    def layout(self, layer: int) -> RingPages:
        """The layer's RingPages [R, H] (kernels that read vLLM's block table themselves: CUDA), all layers' made at
        the step's first call (inside the forward, fixed shapes); CPU_ATTN's page tables never need them."""
        if self.layouts is None:
            self.layouts = ring_page_layout(ring_pages(self.spans, self.page), self.offsets)
        return RingPages(self.layouts.base[layer], self.layouts.stride[layer])

    def table(self, layer: int, fresh: bool = False) -> torch.Tensor:
        """The layer's ring page tables [R, H, P] (one-head page ids), derived from its vLLM block table into the
        shared scratch; valid until another layer's tables are asked for (layers run one after another). `fresh`
        derives them even if the scratch holds them: a layer's forward starts so, so that a captured graph always
        records the derivation."""
        rows, heads = self.spans.shape[1], self.spans.shape[2]
        width = self.widths[layer]
        if self.scratch.numel() < rows * heads * width:
            raise RuntimeError(
                f"moa-vllm: layer {layer}'s page tables need {rows * heads * width} page ids but the scratch holds "
                f"{self.scratch.numel()} (kernels that read vLLM's block table get none); refusing to write past it"
            )
        out = self.scratch[: rows * heads * width].view(rows, heads, width)
        if self._table_layer != layer or fresh:
            layer_page_table(self.spans[layer], self._blocks(), self.page, out, self.offsets[layer], self.cell_map)
            self._table_layer = layer
        return out

    def row_table(self, layer: int, row: int) -> torch.Tensor:
        """One row's ring page tables [H, P] at this layer (a prefix-cache restore reads them): the scratch's row where
        there is a scratch, else derived on its own (prefill steps only, never inside a captured graph)."""
        if self.scratch.numel():
            return self.table(layer)[row]
        spans = self.spans[layer, row : row + 1]
        out = torch.zeros(1, spans.shape[1], self.widths[layer], dtype=torch.int32, device=spans.device)
        return layer_page_table(spans, self._blocks()[row : row + 1], self.page, out,
                                self.offsets[layer, row : row + 1], self.cell_map)[0]  # fmt: skip

    def layer_pages(self, layer: int) -> torch.Tensor:
        """Layer-page ids [num_decodes, width] of an interleaved layer's decode rows (ring page k of every head is
        cell h of layer page k, vLLM's own layout): the page table of one H-head sequence per request."""
        nd, heads = self.num_decodes, self.spans.shape[2]
        first = torch.div(self.offsets[layer, :nd], heads, rounding_mode="floor")
        return layer_pages(self._blocks()[:nd], first, self.widths[layer], self.cell_map)

    def prefix_pages(self, row: int, layer: int) -> torch.Tensor:
        """Layer-page ids of the row's prefix columns at this layer (null columns stay 0): block b holds the
        layer's positions in its layer page `layer`, vLLM's own layout."""
        return self.cell_map.layer_page(self.prefix_ids[row].long(), layer)

    def equal_spans(self, layer: int) -> bool:
        """Whether every decode row's rings at this layer have the same span (then they are interleaved and one
        kernel call per request reads them all). Reads the spans back to the host once per step: CPU kernels only
        (a CUDA graph may not branch on device data)."""
        if self._equal_spans is None:
            spans = self.spans[:, : self.num_decodes]
            self._equal_spans = (spans == spans[..., :1]).all(dim=2).all(dim=1).tolist()
        return self._equal_spans[layer]

    def head_visible(self, layer: int) -> tuple[tuple, torch.Tensor]:
        """An equal-span layer's keys per decode row [num_decodes] int32, and a key that layers with the same
        decode spans share (the dense plan's layers all do): a kernel may reuse its per-call metadata across them.
        Host reads once per step (CPU kernels only, as `equal_spans`)."""
        if self._head_visible is None:
            nd = self.num_decodes
            rows = self.spans[:, :nd, 0]
            groups: dict[tuple, tuple] = {}
            self._head_visible = {}
            for index, spans in enumerate(rows.tolist()):
                if not self.equal_spans(index):
                    continue
                if tuple(spans) not in groups:
                    visible = torch.minimum(self.seq_lens[:nd].to(rows.device), rows[index]).to(torch.int32)
                    groups[tuple(spans)] = ((self.serial, len(groups)), visible.contiguous())
                self._head_visible[index] = groups[tuple(spans)]
        return self._head_visible[layer]

    def decode_slots(self, layer: int) -> torch.Tensor:
        """Flat one-head slots [num_decodes*H] of the decode rows' new tokens at this layer (from the layer's vLLM
        block table: the scratch is not needed for them). After `finalize`."""
        parts = DecodeSlotParts(*(t[layer] for t in self.decode_parts))
        return decode_slots(self._blocks()[: self.num_decodes], parts, self.page, self.cell_map)

    def _blocks(self) -> torch.Tensor:
        if self.block_table is None:
            raise RuntimeError("moa-vllm: a MoA layer attends but the step's builder passed no block table")
        return self.block_table


class RingState:
    """Per worker process: the plan's rules for this rank's KV heads, live requests' ring tables, the current step."""

    def __init__(
        self,
        alphas: torch.Tensor,
        betas: torch.Tensor,
        min_span: int,
        sinks: int,
        page: int,
        max_model_len: int,
        device: torch.device,
        max_rows: int = 256,
        prefix: bool = False,
        buffers: RingBuffers | None = None,
        page_tables: bool | None = None,
    ) -> None:
        self.alphas, self.betas = alphas, betas  # [L, H] float64 (CPU)
        self.min_span, self.sinks, self.page = min_span, sinks, page
        self.prefix = prefix  # prefix caching: prefill rows also write position-ordered prefix blocks
        self.heads = alphas.shape[1]
        self.max_model_len = max_model_len
        self.device = device = torch.device(device)
        self.max_pages = widest_pages(alphas, betas, max_model_len, min_span, page)
        # Table widths per layer where a CUDA graph may replay a step: fixed (the layer's widest ring), since a
        # captured graph keeps the shapes of its (dummy) capture batch. On CPU each batch's own widest is enough.
        widest = ring_pages(ring_spans(alphas, betas, torch.tensor([max_model_len]), min_span), page)
        self._fixed_widths = None if device.type == "cpu" else [int(w) for w in widest.amax(dim=(1, 2)).tolist()]
        self.max_rows = max_rows
        layers = alphas.shape[0]
        self.page_tables = needs_page_tables(device) if page_tables is None else page_tables
        if buffers is None:
            buffers = RingBuffers.allocate(layers, max_rows, self.heads, self.max_pages, device, self.page_tables)
        _check_buffers(buffers, layers, max_rows, self.heads, self.max_pages if self.page_tables else 0, device)
        self.buffers = buffers
        self._spans_buf = buffers.spans
        self._checked: dict[str, tuple[int, int]] = {}  # req_id -> the (L, N) its blocks were checked at (host)
        self._batch_key: tuple | None = None
        self._spans: torch.Tensor | None = None
        self.step: RingStep | None = None
        self._pending: list[int] = []

    # ---- per step --------------------------------------------------------------------------------------------
    def step_for(self, common, batch: PublishedBatch | None) -> RingStep:
        """The step's RingStep, made by the first builder call after the runner published `batch`; later layers'
        builders of the same step get the same object. Raises when the rows cannot be matched to requests."""
        rows = common.num_reqs
        if batch is None:
            raise RuntimeError(
                f"moa-vllm: attention metadata for {rows} rows was built but the model runner published no batch "
                "(its request_lengths hook did not run on this runner); refusing to guess which request each row is"
            )
        if self.step is not None and self.step.serial == batch.serial:
            if self.step.visible is None and len(self.step.computed) == rows:
                return self.step  # a later layer's builder in the same step
            raise RuntimeError(
                f"moa-vllm: a new batch of {rows} rows reached the builders without being published; the last "
                f"published batch (rows {_named(batch)}) was already used by a forward; refusing to reuse it"
            )
        if batch.dummy and rows != batch.rows:  # a capture / warm-up batch padded by vLLM: every row is dummy
            lengths = torch.full((rows,), self.max_model_len).numpy()
            batch = PublishedBatch(batch.serial, (None,) * rows, lengths, dummy=True)  # caps: the lengths
        if rows > batch.rows:
            raise RuntimeError(
                f"moa-vllm: rows {batch.rows}..{rows - 1} of a {rows}-row batch were never published (published: "
                f"{_named(batch)}); refusing to attend for a row of unknown request"
            )
        dropped = [rid for rid in batch.req_ids[rows:] if rid is not None]
        if dropped:
            raise RuntimeError(
                f"moa-vllm: requests {dropped[:8]} were published for this step but the builders got only {rows} "
                "rows; the runner's rows and the builders' rows disagree"
            )
        if rows > self.max_rows:
            raise RuntimeError(
                f"moa-vllm: a step has {rows} rows but the ring buffers hold {self.max_rows} (max_num_seqs)"
            )
        qsl = common.query_start_loc_cpu[: rows + 1].tolist()
        seq_lens = common.seq_lens[:rows]
        seq_host = _host_seq_lens(common, rows)
        computed = [seq_host[r] - (qsl[r + 1] - qsl[r]) for r in range(rows)]
        req_ids = batch.req_ids[:rows]
        lengths = [int(n) for n in batch.lengths[:rows]]
        caps = [int(n) for n in batch.own_lengths()[:rows]]
        num_decodes = 0
        while num_decodes < rows and qsl[num_decodes + 1] - qsl[num_decodes] == 1:
            num_decodes += 1

        fresh = list(batch.fresh[:rows]) if batch.fresh else [False] * rows
        prompts = None if batch.prompts is None else [int(p) for p in batch.prompts[:rows]]
        restore = [r for r in range(rows) if fresh[r] and computed[r] > 0]
        if restore and not self.prefix:
            raise RuntimeError(
                f"moa-vllm: requests {[req_ids[r] for r in restore]} start at positions "
                f"{[computed[r] for r in restore]} in fresh rings, but prefix caching is off: their keys are nowhere"
            )
        if self.prefix and prompts is None and any(rid is not None for rid in req_ids):
            raise RuntimeError(
                "moa-vllm: prefix caching is on but the model runner published no prompt lengths; refusing to guess "
                "which positions have prefix blocks"
            )
        prefix_rows = self._prefix_rows(req_ids, computed, prompts, restore)
        rows_info = dict(lengths=lengths, caps=caps, prompts=prompts, prefix_rows=prefix_rows)  # both paths below
        key = tuple(zip(req_ids, lengths, caps, strict=True))
        restarted = any(c == 0 for c, rid in zip(computed, req_ids, strict=True) if rid is not None) or any(fresh)
        if key == self._batch_key and self.step is not None and not restarted:
            # Same requests in the same rows: only seq_lens and the step's row split change.
            self.step = RingStep(
                batch.serial,
                req_ids,
                num_decodes,
                qsl,
                computed,
                self._spans,
                seq_lens,
                self.page,
                self._widths,
                self.buffers.tables,
                **rows_info,
            )
            self._pending = []
            return self.step
        spans = ring_spans(
            self.alphas, self.betas, torch.tensor(lengths, dtype=torch.int64), self.min_span,
            torch.tensor(caps, dtype=torch.int64),
        )  # fmt: skip
        spans[:, [r for r, rid in enumerate(req_ids) if rid is None]] = 0  # padding rows: no ring
        self._spans_buf.zero_()  # rows past the batch and padding rows: no ring, tables of the null block
        self._spans_buf[:, :rows].copy_(spans)
        self._spans = self._spans_buf[:, :rows]
        # Each layer's table width: its widest ring in this batch (a capture's dummy rows: the widest at all).
        self._widths = self._fixed_widths or [
            max(int(w), 1) for w in ring_pages(spans, self.page).amax(dim=(1, 2)).tolist()
        ]
        self._batch_key = key
        live = set(req_ids)
        for rid in [r for r in self._checked if r not in live]:
            del self._checked[rid]
        pending: list[int] = []
        for r, rid in enumerate(req_ids):
            known = rid is not None and self._checked.get(rid) == (lengths[r], caps[r])
            if rid is not None and not (known and computed[r] > 0 and not fresh[r]):
                pending.append(r)  # new, resumed after preemption, N changed or left the batch: check again
        self.step = RingStep(
            batch.serial,
            req_ids,
            num_decodes,
            qsl,
            computed,
            self._spans,
            seq_lens,
            self.page,
            self._widths,
            self.buffers.tables,
            restore=restore,
            **rows_info,
        )
        self._pending = pending
        return self.step

    def fill(self, block_table: torch.Tensor) -> None:
        """Keep the MoA group's block table for the forward; check it against the rings of the step's new rows
        (once per request and N): every layer's layer pages, one after another, in whole blocks."""
        step = self.step
        if step.block_table is not None:
            return
        step.block_table = block_table
        if not self._pending:
            return
        rows = torch.tensor(self._pending, device=block_table.device)
        spans = step.spans[:, rows]  # [L, r, H]
        layers = spans.shape[0]
        need = torch.div(blocks_needed(spans, self.page, self.heads).sum(0) + layers - 1, layers, rounding_mode="floor")
        table = block_table[rows]
        width = table.shape[1]
        if int(need.max()) > width:
            raise RuntimeError(
                f"moa-vllm: a request needs {int(need.max())} blocks but the block table has {width} columns; "
                "refusing to read another request's pages"
            )
        cols = torch.arange(width, device=table.device)[None, :]
        missing = ((cols < need[:, None].to(table.device)) & (table <= 0)).any(dim=1)
        if bool(missing.any()):
            bad = [step.req_ids[self._pending[i]] for i in missing.nonzero()[:, 0].tolist()]
            raise RuntimeError(
                f"moa-vllm: requests {bad} hold fewer blocks than their rings need ({need.tolist()} blocks); "
                "refusing to read another request's pages"
            )
        self._commit_pending()

    def _prefix_rows(self, req_ids, computed: list[int], prompts: list[int] | None, restore: list[int]) -> list[int]:
        """Rows that still have full prompt blocks to write (any query length: a chunk may be one token) or a ring
        to restore; none while prefix caching is off."""
        if not self.prefix:
            return []
        page, wanted = self.page, set(restore)
        return [
            r
            for r, rid in enumerate(req_ids)
            if rid is not None and (r in wanted or computed[r] < prompts[r] // page * page)
        ]

    def fill_prefix(self, block_table: torch.Tensor, ring_blocks: list[int]) -> None:
        """The prefix block ids of the step's prefill rows (prefix caching): the columns right after each row's
        ring_blocks[r] ring blocks, one per full prompt block the step's tokens reach (as the scheduler gave them).
        A block holds the prompt block's positions for every layer, each in its own layer page."""
        step = self.step
        if not self.prefix or step.prefix_ids:
            return
        rows: dict[int, torch.Tensor] = {}
        width = block_table.shape[1]
        for r in step.prefix_rows:
            end = step.computed[r] + step.query_start_loc[r + 1] - step.query_start_loc[r]
            cols = min(-(-end // self.page), step.prompts[r] // self.page)
            if cols <= 0:
                continue
            if ring_blocks[r] + cols > width:
                raise RuntimeError(
                    f"moa-vllm: request {step.req_ids[r]!r} needs {ring_blocks[r]} ring + {cols} "
                    f"prefix columns but the block table has {width}; refusing to write another request's blocks"
                )
            rows[r] = block_table[r, ring_blocks[r] : ring_blocks[r] + cols]
        step.prefix_ids = rows

    def _commit_pending(self) -> None:
        for r in self._pending:
            self._checked[self.step.req_ids[r]] = (int(self._batch_key[r][1]), int(self._batch_key[r][2]))
        self._pending = []


def _check_buffers(buffers: RingBuffers, layers: int, rows: int, heads: int, pages: int, device) -> None:
    """Buffers reserved before the KV cache spec was known must fit it: a short scratch would make one layer's
    tables overwrite another request's."""
    want = (layers, rows, heads)
    if tuple(buffers.spans.shape) != want or buffers.tables.numel() < rows * heads * pages:
        raise RuntimeError(
            f"moa-vllm: ring buffers reserved for spans {tuple(buffers.spans.shape)} and "
            f"{buffers.tables.numel()} page ids, but the KV cache needs {want} and {rows * heads * pages} "
            f"(max_num_seqs {rows}, {heads} KV heads, {pages} pages at max_model_len)"
        )
    if buffers.spans.device.type != torch.device(device).type:
        raise RuntimeError(f"moa-vllm: ring buffers on {buffers.spans.device}, the KV cache on {device}")


def _named(batch: PublishedBatch) -> str:
    """The published rows for an error message (request ids, or how many dummy rows)."""
    if batch.dummy:
        return f"{batch.rows} dummy rows"
    shown = list(batch.req_ids[:8])
    return f"{shown}{' ...' if batch.rows > 8 else ''}"


def _host_seq_lens(common, rows: int) -> list[int]:
    """The rows' seq_lens on the host without a device sync: the runner's CPU copy (exact outside async speculative
    decoding, which moa refuses) where it has one, else the tensor itself (a CPU tensor on the CPU wheel)."""
    upper = getattr(common, "seq_lens_cpu_upper_bound", None)
    if upper is not None:
        return upper[:rows].tolist()
    seq_lens = common.seq_lens[:rows]
    return seq_lens.tolist() if seq_lens.device.type == "cpu" else seq_lens.cpu().tolist()
