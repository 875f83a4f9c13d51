"""The worker's ring metadata: each request's ring layout computed once, kept in persistent tensors, one build per step.

Per step the model runner publishes the batch's request ids and lengths N into the engine's context
(engine_context.py; patches.py, for runner V1 and V2), and each builder passes it to `step_for`. The first MoA
metadata builder called in a step makes the step's `RingStep` for every layer at once: spans [L, R, H] (recomputed
only when the batch's requests change), the rows' ring page tables [L, R, H, P] (a request's tables are computed
when it is first scheduled, from each layer's block table as that layer's builder passes it, checked against the
blocks the scheduler gave it, and reused until it leaves the batch or restarts from position 0), and, at the first
attention call, the decode tensors of all layers: visible lengths [L, R*H] and the slots of the new tokens
[L, R_decode*H]. Builders of later layers only hand out the same step.

CUDA graphs (decode-only batches): a captured graph replays the kernels with the addresses it saw at capture, so
everything the decode path reads lives in buffers allocated once, [L, max_rows, ...], and each build rewrites
them in place; rows past the batch (and padding rows, which have no request) hold spans 0 and page tables of
zeros, so a padded row's write lands in the null block. The decode tensors are derived inside the forward from
those buffers and the runner's own persistent seq_lens, and nothing on the decode path reads a value back to
the host (the build takes lengths from the runner's CPU copies).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from moa_vllm.ops.ring_layout import blocks_needed, decode_slots, page_tables, ring_pages, ring_spans, visible_lengths
from moa_vllm.vllm_plugin.moa.published_batch import PublishedBatch


@dataclass
class RingStep:
    """One step's ring metadata for every MoA layer (layer index = first dim)."""

    serial: int
    req_ids: tuple[str | None, ...]
    num_decodes: int  # rows 0..num_decodes-1 have one query token each
    query_start_loc: list[int]  # [R + 1] host
    computed: list[int]  # [R] host: tokens already in each request's rings before the step
    spans: torch.Tensor  # [L, R, H] int64 (device)
    tables: torch.Tensor  # [L, R, H, P] int32 one-head page ids (device)
    seq_lens: torch.Tensor  # [R] device
    filled_layers: set[int] = field(default_factory=set)
    visible: torch.Tensor | None = None  # [L, R*H] int32
    slots: torch.Tensor | None = None  # [L, num_decodes*H] int64
    prefill_launch: object | None = None  # the device prefill kernel's launch data, made by the step's first layer
    lengths: list[int] = field(default_factory=list)  # [R] N per row (grid-rounded)
    prompts: list[int] | None = None  # [R] prompt tokens per row (None: the runner did not publish them)
    restore: list[int] = field(default_factory=list)  # rows whose fresh ring is restored from a cache hit first
    prefix_ids: dict[int, dict[int, torch.Tensor]] = field(default_factory=dict)  # layer -> row -> prefix block ids
    prefix_rows: list[int] = field(default_factory=list)  # rows with prompt tokens to write or a ring to restore

    def finalize(self, sinks: int, page: int) -> None:
        """Decode tensors of all layers in one go (once per step, at the first attention call)."""
        if self.visible is not None:
            return
        self.visible = visible_lengths(self.seq_lens, self.spans)
        nd = self.num_decodes
        positions = self.seq_lens[:nd].to(torch.int64) - 1
        positions = torch.clamp(positions, min=0)  # padding rows (seq_len 0) write position 0 of a null table
        self.slots = decode_slots(self.tables[:, :nd], self.spans[:, :nd], positions, sinks, page)


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
    ) -> None:
        self.alphas, self.betas = alphas, betas  # [L, H] float64 (CPU)
        self.min_span, self.sinks, self.page = min_span, sinks, page
        self.prefix = prefix  # prefix caching: prefill rows also write position-ordered prefix blocks
        self.heads = alphas.shape[1]
        self.max_model_len = max_model_len
        self.device = device
        widest = ring_spans(alphas, betas, torch.tensor([max_model_len]), min_span)
        self.max_pages = int(ring_pages(widest, page).max())
        self.max_rows = max_rows
        layers = alphas.shape[0]
        self._spans_buf = torch.zeros(layers, max_rows, self.heads, dtype=torch.int64, device=device)
        self._tables_buf = torch.zeros(layers, max_rows, self.heads, self.max_pages, dtype=torch.int32, device=device)
        self._tables: dict[str, torch.Tensor] = {}  # req_id -> [L, H, P] (device)
        self._lengths: dict[str, int] = {}
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
            batch = PublishedBatch(batch.serial, (None,) * rows, lengths, dummy=True)
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
        rows_info = dict(lengths=lengths, prompts=prompts, prefix_rows=prefix_rows)  # both RingStep paths below
        key = tuple(zip(req_ids, lengths, strict=True))
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
                self.step.tables,
                seq_lens,
                filled_layers=set(range(self.alphas.shape[0])),
                **rows_info,
            )
            self._pending = []
            return self.step
        spans = ring_spans(self.alphas, self.betas, torch.tensor(lengths, dtype=torch.int64), self.min_span)
        spans[:, [r for r, rid in enumerate(req_ids) if rid is None]] = 0  # padding rows: no ring
        self._spans_buf.zero_()
        self._spans_buf[:, :rows].copy_(spans)
        self._spans = self._spans_buf[:, :rows]
        self._batch_key = key
        live = set(req_ids)
        for rid in [r for r in self._tables if r not in live]:
            del self._tables[rid]
            self._lengths.pop(rid, None)
        self._tables_buf.zero_()  # rows past the batch and padding rows point at the null block
        tables = self._tables_buf[:, :rows]
        pending: list[int] = []
        for r, rid in enumerate(req_ids):
            cached = self._tables.get(rid) if rid is not None else None
            if cached is not None and computed[r] > 0 and self._lengths.get(rid) == lengths[r] and not fresh[r]:
                tables[:, r].copy_(cached)
            elif rid is not None:
                pending.append(r)  # new, resumed after preemption, N changed or left the batch: lay out again
        self.step = RingStep(
            batch.serial,
            req_ids,
            num_decodes,
            qsl,
            computed,
            self._spans,
            tables,
            seq_lens,
            restore=restore,
            **rows_info,
        )
        self._pending = pending
        return self.step

    def fill_layer(self, layer: int, block_table: torch.Tensor) -> None:
        """Lay out this layer's rings for the step's new rows from the layer's block table (once per request)."""
        step = self.step
        if layer in step.filled_layers:
            return
        step.filled_layers.add(layer)
        if not self._pending:
            return
        rows = torch.tensor(self._pending, device=block_table.device)
        spans = step.spans[layer, rows]  # [r, H]
        need = blocks_needed(spans, self.page, self.heads)
        table = block_table[rows]
        width = table.shape[1]
        if int(need.max()) > width:
            raise RuntimeError(
                f"moa-vllm: layer {layer}: a request needs {int(need.max())} blocks but the block table "
                f"has {width} columns; refusing to read another request's pages"
            )
        cols = torch.arange(width, device=table.device)[None, :]
        missing = ((cols < need[:, None].to(table.device)) & (table <= 0)).any(dim=1)
        if bool(missing.any()):
            bad = [step.req_ids[self._pending[i]] for i in missing.nonzero()[:, 0].tolist()]
            raise RuntimeError(
                f"moa-vllm: layer {layer}: requests {bad} hold fewer blocks than their rings need "
                f"({need.tolist()} blocks); refusing to read another request's pages"
            )
        step.tables[layer, rows] = page_tables(spans[None], table[None], self.page, self.max_pages)[0].to(self.device)
        if len(step.filled_layers) == self.alphas.shape[0]:
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

    def fill_prefix(self, layer: int, block_table: torch.Tensor, ring_blocks: list[int]) -> None:
        """The prefix block ids of this layer's prefill rows (prefix caching): the columns right after each row's
        ring_blocks[r] ring blocks, one per full prompt block the step's tokens reach (as the scheduler gave them)."""
        step = self.step
        if not self.prefix or layer in step.prefix_ids:
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
                    f"moa-vllm: layer {layer}: request {step.req_ids[r]!r} needs {ring_blocks[r]} ring + {cols} "
                    f"prefix columns but the block table has {width}; refusing to write another request's blocks"
                )
            rows[r] = block_table[r, ring_blocks[r] : ring_blocks[r] + cols]
        step.prefix_ids[layer] = rows

    def _commit_pending(self) -> None:
        step = self.step
        for r in self._pending:
            rid = step.req_ids[r]
            self._tables[rid] = step.tables[:, r].clone()
            self._lengths[rid] = int(self._batch_key[r][1])
        self._pending = []


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
