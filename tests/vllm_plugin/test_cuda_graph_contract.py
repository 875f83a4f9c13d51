"""What full CUDA graphs of decode-only steps need from the moa backend, checked on CPU (no GPU here): the support
level is declared on CUDA only (and can be switched off); the decode forward reads nothing back to the host; the
metadata it reads lives in buffers that keep their addresses across batch changes; a padding row (no request,
seq_len 0, one query, as a padded graph replays it) writes only into the null block and leaves every real ring
and every real output as the reference has them."""

from __future__ import annotations

import contextlib
from types import SimpleNamespace

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from moa_vllm.vllm_plugin.moa.backend import MoAMetadataBuilder, ring_forward
from moa_vllm.vllm_plugin.moa.kernels_cuda import CudaRingKernels
from tests.vllm_plugin.ring_sim import make_sim, rules

SYNCS = {torch.ops.aten._local_scalar_dense.default, torch.ops.aten.nonzero.default}


class NoHostReads(TorchDispatchMode):
    """Fails on every op that hands a tensor's value to the host (item(), int(t), bool(t), nonzero)."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in SYNCS:
            raise AssertionError(f"host sync on the decode path: {func}")
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def no_host_reads():
    def refuse(*_args, **_kwargs):
        raise AssertionError("host read on the decode path")

    with pytest.MonkeyPatch.context() as patch, NoHostReads():
        for name in ("tolist", "numpy", "item", "__int__", "__bool__", "__float__", "__index__"):
            patch.setattr(torch.Tensor, name, refuse, raising=False)
        yield


def test_support_level_is_declared_on_cuda_only(monkeypatch):
    from vllm.platforms import current_platform
    from vllm.v1.attention.backend import AttentionCGSupport

    assert MoAMetadataBuilder.get_cudagraph_support(None, None) == AttentionCGSupport.NEVER  # the CPU wheel
    monkeypatch.setattr(current_platform, "is_cuda", lambda: True)
    assert MoAMetadataBuilder.get_cudagraph_support(None, None) == AttentionCGSupport.UNIFORM_SINGLE_TOKEN_DECODE
    monkeypatch.setenv("MOA_VLLM_CUDA_GRAPHS", "0")
    assert MoAMetadataBuilder.get_cudagraph_support(None, None) == AttentionCGSupport.NEVER


def _sim():
    alphas, betas = rules(2, 3, seed=21)
    sim = make_sim(CudaRingKernels, torch.float32, alphas, betas, [260, 230, 120], seed=9)
    for _ in range(3):  # prompts of requests 0 and 1, then decodes
        sim.step({0: 60, 1: 50})
    return sim


def _build(sim, rows: list[int], counts: dict[int, int], padding: int = 0):
    """What the group's builder does for a step (publish, step_for, fill), with `padding` extra rows of no request."""
    ids = [sim.req_ids[r] for r in rows] + [None] * padding
    batch = sim.context.publish(ids, [sim.lengths[r] for r in rows] + [0] * padding)
    qsl, seq = [0], []
    for r in rows:
        qsl.append(qsl[-1] + counts[r])
        seq.append(sim.done[r] + counts[r])
    for _ in range(padding):
        qsl.append(qsl[-1] + 1)
        seq.append(0)
    common = SimpleNamespace(
        num_reqs=len(rows) + padding,
        query_start_loc_cpu=torch.tensor(qsl),
        seq_lens=torch.tensor(seq, dtype=torch.int32),
        seq_lens_cpu_upper_bound=torch.tensor(seq, dtype=torch.int32),
    )
    sim.state.step_for(common, batch)
    width = sim.tables.shape[1]
    sim.state.fill(torch.cat([sim.tables[rows], torch.zeros(padding, width, dtype=torch.int32)]))
    return sim.state.step


def test_decode_forward_reads_nothing_back_to_the_host(contract, monkeypatch):  # noqa: F811
    sim = _sim()
    calls = []
    monkeypatch.setattr("moa_vllm.vllm_plugin.moa.kernels_cuda.ring_decode", lambda *a, **kw: calls.append(a))
    step = _build(sim, [0, 1], {0: 1, 1: 1})
    q = torch.randn(2, sim.h * sim.g, sim.d)
    kv = torch.randn(2, sim.h, sim.d)
    out = torch.empty_like(q)
    with no_host_reads():
        for layer in range(sim.layers):
            ring_forward(q, kv, kv, out, sim.region, sim.cell_map, sim.page, sim.kernels, step, layer, sim.sinks,
                         sim.scale)  # fmt: skip
    assert len(calls) == sim.layers


def test_metadata_buffers_keep_their_addresses(contract):  # noqa: F811
    sim = _sim()
    first = _build(sim, [0, 1], {0: 1, 1: 1})
    addresses = (first.spans.data_ptr(), sim.kernels._query_start_loc(2, torch.device("cpu")).data_ptr())
    sim.step({0: 1, 1: 1})
    sim.step({2: 40, 0: 1})  # the batch changes: request 1 out, request 2 in
    sim.step({0: 1, 2: 1, 1: 1})
    later = sim.state.step
    assert (later.spans.data_ptr(), sim.kernels._query_start_loc(3, torch.device("cpu")).data_ptr()) == addresses


def test_the_cuda_path_keeps_no_page_tables(contract):  # noqa: F811
    """The CUDA kernels read vLLM's block table: no page-table scratch is allocated, and asking for one fails."""
    sim = _sim()
    step = _build(sim, [0, 1], {0: 1, 1: 1})
    assert sim.state.buffers.tables.numel() == 0
    with pytest.raises(RuntimeError, match="scratch holds 0"):
        step.table(0)


def test_a_padding_row_writes_only_the_null_block(contract):  # noqa: F811
    sim = _sim()
    before = sim.region.clone()
    step = _build(sim, [0, 1], {0: 1, 1: 1}, padding=2)
    assert int(step.spans[:, 2:].abs().sum()) == 0
    tokens = 4
    q = torch.randn(tokens, sim.h * sim.g, sim.d)
    k = torch.randn(tokens, sim.h, sim.d)
    v = torch.randn(tokens, sim.h, sim.d)
    step.num_decodes = tokens  # what a graph captured for 4 decode rows replays
    for layer in range(sim.layers):
        out = torch.zeros_like(q)
        ring_forward(q, k, v, out, sim.region, sim.cell_map, sim.page, sim.kernels, step, layer, sim.sinks,
                     sim.scale)  # fmt: skip
        changed = (sim.region != before) & ~(sim.region.isnan() & before.isnan())
        pages = changed.flatten(1).any(dim=1).nonzero()[:, 0].tolist()
        real = step.decode_slots(layer)[: 2 * sim.h] // sim.page
        null = sim.cell_map.cell(torch.zeros(sim.layers * sim.h, dtype=torch.long), torch.arange(sim.layers * sim.h))
        allowed = set(real.tolist()) | set(null.tolist())  # the real rows' slots + block 0's cells (every layer)
        assert set(pages) <= allowed, (layer, sorted(set(pages) - allowed))
        assert set(real.tolist()) <= set(pages)
        before = sim.region.clone()


def _capture_common(rows: int, width: int) -> SimpleNamespace:
    return SimpleNamespace(
        num_reqs=rows,
        num_actual_tokens=rows,
        query_start_loc_cpu=torch.arange(rows + 1),
        seq_lens=torch.ones(rows, dtype=torch.int32),
        seq_lens_cpu_upper_bound=torch.ones(rows, dtype=torch.int32),
        block_table_tensor=torch.zeros(rows, width, dtype=torch.int32),
    )


def test_a_build_after_the_forward_without_a_publish_is_refused(contract):  # noqa: F811
    """A step whose batch was never published (the runner hook did not run) must not reuse the consumed step
    (its rows would attend with another step's requests) nor run with rows of no request: it raises."""
    sim = _sim()
    used = _build(sim, [0, 1], {0: 1, 1: 1})
    used.finalize(sim.sinks, sim.page, sim.cell_map)
    with pytest.raises(RuntimeError, match="without being published"):
        sim.state.step_for(_capture_common(2, sim.tables.shape[1]), sim.context.published)
    with pytest.raises(RuntimeError, match="published no batch"):
        sim.state.step_for(_capture_common(2, sim.tables.shape[1]), None)


def test_capture_builds_publish_a_dummy_step_of_their_rows(contract):  # noqa: F811
    """vLLM's capture path (build_for_cudagraph_capture, V1 and V2) after a real step: the group's builder
    publishes a dummy batch of the capture's rows (a second build of the same capture reuses it), and no row holds
    a ring."""
    sim = _sim()
    used = _build(sim, [0, 1], {0: 1, 1: 1})
    used.finalize(sim.sinks, sim.page, sim.cell_map)
    builders = []
    for _ in range(2):  # the builder's own state, without a vLLM config to make it from
        builder = MoAMetadataBuilder.__new__(MoAMetadataBuilder)
        builder.context, builder.state, builder.spec = sim.context, sim.state, None
        builders.append(builder)
    common = _capture_common(4, sim.tables.shape[1])
    steps = [b.build_for_cudagraph_capture(common).step for b in builders]
    dummy = steps[0]
    assert all(s is dummy for s in steps) and dummy is not used
    assert sim.context.published.dummy and dummy.req_ids == (None,) * 4 and dummy.visible is None
    assert int(dummy.spans.abs().sum()) == 0
