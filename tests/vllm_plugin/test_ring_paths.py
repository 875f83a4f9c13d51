"""The plugin's ring paths without an engine: decode through vLLM's own CPU_ATTN kernel as per-KV-head virtual
sequences and the torch ring prefill, against the token-exact reference, for random spans, shuffled pages, stale
NaN pages, wrapped rings, mixed decode + chunk steps, fp32/bf16/fp16; persistent metadata equals a fresh build;
a window off by one fails; a row with fewer blocks than its rings need is refused; the same at the geometry of the
models people serve (8 KV heads, GQA 4 and 8, head dim 128)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from moa_vllm.vllm_plugin.moa.engine_context import EngineContext
from moa_vllm.vllm_plugin.moa.kernels_cpu import CpuRingKernels, probe_page_format
from moa_vllm.vllm_plugin.moa.ring_state import RingBuffers, RingState, widest_pages
from tests.vllm_plugin.ring_sim import PAGE, D, drive, make_sim, rules

TOL = {torch.float32: 2e-5, torch.bfloat16: 4e-2, torch.float16: 6e-3}
# vLLM's CPU fp8 KV cache needs AVX-512 or AMX (vllm/v1/attention/backends/cpu_attn.py, _get_attn_isa)
fp8_cpu = pytest.mark.skipif(
    not (torch.cpu._is_avx512_supported() or torch.cpu._is_amx_tile_supported()),
    reason="vLLM's CPU fp8 KV cache needs AVX-512 or AMX",
)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("g", [1, 3])
@pytest.mark.parametrize("q_tile", [16, 512])  # many tiles per chunk (every segment kind) / one tile per chunk
def test_ring_paths_match_the_token_exact_reference(dtype, g, q_tile, monkeypatch):
    monkeypatch.setattr("moa_vllm.ops.ring_prefill.Q_TILE", q_tile)
    alphas, betas = rules(2, 3, seed=int(g))
    sim = make_sim(CpuRingKernels, dtype, alphas, betas, [200, 290, 150], seed=1, g=g)
    assert bool((sim.spans < torch.tensor(sim.lengths)[None, :, None] - 60).any())  # some rings wrap
    assert drive(sim, chunk=70) < TOL[dtype]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("g", [4, 8])
def test_ring_paths_at_eight_kv_heads_and_head_dim_128(dtype, g):
    """Llama-3-8B / 70B attention geometry (8 KV heads of 128 dims, 32 or 64 query heads): 8 virtual sequences
    per layer per request, a 128-wide cell, vLLM's kernel at GQA 4 / 8."""
    alphas, betas = rules(2, 8, seed=20 + g)
    sim = make_sim(CpuRingKernels, dtype, alphas, betas, [260, 170], seed=21, g=g, d=128, scale=128**-0.5)
    assert bool((sim.spans < torch.tensor(sim.lengths)[None, :, None] - 60).any())  # some rings wrap
    assert drive(sim, chunk=70) < TOL[dtype]


@pytest.mark.parametrize("kv", ["auto", pytest.param("fp8_e4m3", marks=fp8_cpu)])
@pytest.mark.parametrize("d, heads, g", [(64, 3, 3), (128, 8, 4)])
def test_equal_span_layers_decode_each_request_as_one_sequence(kv, d, heads, g, monkeypatch):
    """A layer whose heads share one rule (dense / uniform plans) holds interleaved rings (vLLM's own layout) and
    decodes each request with one H-KV-head sequence (decode_heads); a heterogeneous layer beside it keeps the
    virtual sequences. Both against the token-exact reference, rings wrapping; the fast path must be taken."""
    alphas, betas = rules(2, heads, seed=40 + g)
    alphas[0], betas[0] = 50.0, 0.0  # layer 0: every head's span is 50 (a uniform window)
    calls = []
    fast = CpuRingKernels.decode_heads
    monkeypatch.setattr(
        CpuRingKernels, "decode_heads", lambda self, *a, **kw: (calls.append(a[2]), fast(self, *a, **kw))
    )
    sim = make_sim(CpuRingKernels, torch.float32, alphas, betas, [230, 170], seed=41, g=g, d=d, scale=d**-0.5, kv=kv)
    if kv != "auto":
        sim.kernels.set_scales(0.5, 0.25)
        sim.k_seen = [[sim.kernels.as_cached(k, k)[0] for k in layer] for layer in sim.k]
        sim.v_seen = [[sim.kernels.as_cached(v, v)[1] for v in layer] for layer in sim.v]
    assert drive(sim, chunk=70) < (TOL[torch.float32] if kv == "auto" else 2e-4)
    assert calls and set(calls) == {heads}  # layer 0's decode steps, each request one H-head sequence


FP8_TOL = {"fp8_e4m3": 2e-4, "fp8_e5m2": 2e-4}  # fp32 arithmetic over the same quantized values


@fp8_cpu
@pytest.mark.parametrize("kv", ["fp8_e4m3", "fp8_e5m2"])
@pytest.mark.parametrize("d, heads, g", [(64, 3, 3), (128, 8, 4)])
def test_fp8_rings_match_the_reference_over_the_same_quantized_keys(kv, d, heads, g):
    """Decode, prefill, chunked prefill over fp8 rings (scales != 1) against the token-exact reference over K/V as
    the cache gives them back; the unquantized values would differ by far more than the tolerance."""
    alphas, betas = rules(2, heads, seed=30 + g)
    sim = make_sim(CpuRingKernels, torch.float32, alphas, betas, [230, 170], seed=31, g=g, d=d, scale=d**-0.5, kv=kv)
    sim.kernels.set_scales(0.5, 0.25)
    sim.k_seen = [[sim.kernels.as_cached(k, k)[0] for k in layer] for layer in sim.k]
    sim.v_seen = [[sim.kernels.as_cached(v, v)[1] for v in layer] for layer in sim.v]
    assert float((sim.k_seen[0][0] - sim.k[0][0]).abs().max()) > 1e-2  # quantization is not a no-op here
    assert bool((sim.spans < torch.tensor(sim.lengths)[None, :, None] - 60).any())  # some rings wrap
    assert drive(sim, chunk=70) < FP8_TOL[kv]


@fp8_cpu
def test_fp8_rings_against_unquantized_keys_fail():
    alphas, betas = rules(1, 3, seed=33)
    sim = make_sim(CpuRingKernels, torch.float32, alphas, betas, [200], seed=34, kv="fp8_e4m3")
    sim.k_seen, sim.v_seen = sim.k, sim.v  # a reference that forgets the quantization
    assert drive(sim, chunk=64) > 1e-2


@fp8_cpu
@pytest.mark.parametrize("kv", ["fp8_e4m3", "fp8_e5m2"])
def test_probed_fp8_pages_read_back_what_the_kernel_attends_over(kv):
    """The probe's page order and dequantization: values read back are value / scale in the float8 type (exactly
    representable, within its rounding of the input), and the kernel's own attention over the page is torch's
    attention over those values."""
    quant = {"fp8_e4m3": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2}[kv]
    kernels = CpuRingKernels(torch.float32, PAGE, D, kv_cache_dtype=kv)
    kernels.set_scales(0.5, 2.0)
    view = torch.zeros(5, 2 * PAGE, D, dtype=torch.uint8)
    key, value = torch.randn(PAGE, D), torch.randn(PAGE, D)
    kernels.write(view, torch.arange(PAGE) + 3 * PAGE, key, value)
    k, v = kernels.read(view, torch.tensor([[3]]))
    for got, raw, scale in ((k[0], key, 0.5), (v[0], value, 2.0)):
        assert torch.equal((got / scale).to(quant).float() * scale, got)  # on the fp8 grid
        assert float(((got - raw).abs() / raw.abs().clamp(min=scale * 2**-6)).max()) < 0.26  # one step of rounding
    q = torch.randn(1, 3, D)
    out = torch.zeros(1, 3, D)
    table, seq = torch.tensor([[3]], dtype=torch.int32), torch.tensor([PAGE], dtype=torch.int32)
    kernels.decode(q, view, table, seq, 0.125, out)
    ref = torch.softmax(q[0] @ k[0].T * 0.125, dim=-1) @ v[0]
    assert float((out[0] - ref).abs().max()) < 1e-5


@fp8_cpu
def test_cpu_fp8_ring_writes_round_to_nearest_and_saturate():
    """Not CPU_ATTN's own fp8 write (toward zero): nearest float8 of value / scale, overflow clamped, in the probed
    page order, and CPU_ATTN's decode reads exactly those values."""
    kernels = CpuRingKernels(torch.float32, PAGE, D, kv_cache_dtype="fp8_e4m3")
    kernels.set_scales(0.5, 2.0)
    view = torch.zeros(2, 2 * PAGE, D, dtype=torch.uint8)
    key = torch.zeros(1, D)
    key[0, :8] = torch.tensor([1.0e4, -1.0e4, 0.3, 1.06, 0.0, 7.0, -3.3, 0.01])
    kernels.write(view, torch.tensor([PAGE + 2]), key, key)
    k, v = kernels.read(view, torch.tensor([[1]]))
    assert torch.equal(k[0, 2], (key[0] / 0.5).clamp(-448, 448).to(torch.float8_e4m3fn).float() * 0.5)
    assert float(k[0, 2, 2]) == 0.625 * 0.5  # 0.6 lies between 0.5625 and 0.625: nearest (toward zero: 0.5625)
    assert float(k[0, 2, 0]) == 448 * 0.5 and float(v[0, 2, 1]) == -448 * 2.0
    q, out = torch.randn(1, 1, D), torch.zeros(1, 1, D)
    kernels.decode(q, view, torch.tensor([[1]], dtype=torch.int32), torch.tensor([3], dtype=torch.int32), 0.1, out)
    ref = torch.softmax(q[0] @ k[0, :3].T * 0.1, dim=-1) @ v[0, :3]
    assert float((out[0] - ref).abs().max()) < 1e-4


def test_a_window_off_by_one_fails_at_eight_kv_heads():
    alphas, betas = rules(1, 8, seed=22)
    sim = make_sim(CpuRingKernels, torch.float32, alphas, betas, [220, 200], seed=23, g=4, d=128, scale=128**-0.5)
    sim.reference_window_delta = 1
    assert drive(sim, chunk=64) > 1e-3


def test_rings_wrapped_many_times_and_no_sinks(monkeypatch):
    monkeypatch.setattr("moa_vllm.ops.ring_prefill.Q_TILE", 8)
    alphas = torch.tensor([[20.0, 33.0, 40.0]]).double()
    betas = torch.zeros(1, 3).double()
    sim = make_sim(CpuRingKernels, torch.float32, alphas, betas, [260, 180], seed=2, sinks=0, min_span=16)
    assert drive(sim, chunk=45) < TOL[torch.float32]  # 90 decode steps through 20-token rings: 4x+ wraps


def test_a_window_off_by_one_fails():
    alphas, betas = rules(1, 3, seed=5)
    sim = make_sim(CpuRingKernels, torch.float32, alphas, betas, [220, 200], seed=3)
    sim.reference_window_delta = 1
    assert drive(sim, chunk=64) > 1e-3


def test_persistent_metadata_equals_a_fresh_build():
    alphas, betas = rules(2, 3, seed=7)
    sim = make_sim(CpuRingKernels, torch.float32, alphas, betas, [200, 170, 230], seed=4)
    for _ in range(3):
        sim.step({0: 40, 1: 40})
    for _ in range(4):  # steady state: the step reuses the batch's tables
        sim.step({0: 1, 1: 1})
    kept = sim.state.step
    fresh = RingState(alphas, betas, 20, 4, PAGE, 4096, torch.device("cpu"))
    common = SimpleNamespace(
        num_reqs=2,
        query_start_loc_cpu=torch.tensor([0, 1, 2]),
        seq_lens=torch.tensor([sim.done[0], sim.done[1]], dtype=torch.int32),
    )
    batch = EngineContext().publish(sim.req_ids[:2], sim.lengths[:2])
    new = fresh.step_for(common, batch)
    fresh.fill(sim.tables[[0, 1]])
    kept.finalize(4, PAGE, sim.cell_map)
    new.finalize(4, PAGE, sim.cell_map)
    assert torch.equal(kept.spans, new.spans) and torch.equal(kept.visible, new.visible)
    for layer in range(2):
        assert torch.equal(kept.table(layer, fresh=True), new.table(layer, fresh=True))
        assert torch.equal(kept.decode_slots(layer), new.decode_slots(layer))


def test_rows_with_missing_blocks_are_refused():
    alphas, betas = rules(1, 3, seed=9)
    state = RingState(alphas, betas, 20, 4, PAGE, 4096, torch.device("cpu"))
    batch = EngineContext().publish(["a"], [300])
    common = SimpleNamespace(
        num_reqs=1, query_start_loc_cpu=torch.tensor([0, 50]), seq_lens=torch.tensor([50], dtype=torch.int32)
    )
    state.step_for(common, batch)
    with pytest.raises(RuntimeError, match="fewer blocks than their rings need"):
        state.fill(torch.tensor([[7, 0, 0, 0, 0, 0]], dtype=torch.int32))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_probed_key_layout_reads_back_what_the_kernel_wrote(dtype):
    kernels = CpuRingKernels(dtype, PAGE, D)
    fmt = probe_page_format(dtype, PAGE, D, kernels.isa)
    view = torch.zeros(5, 2 * PAGE, D, dtype=dtype)
    key, value = torch.randn(PAGE, D).to(dtype), torch.randn(PAGE, D).to(dtype)
    kernels.write(view, torch.arange(PAGE) + 3 * PAGE, key, value)
    k, v = fmt.read(view, torch.tensor([[3]]))
    assert torch.equal(k[0], key) and torch.equal(v[0], value)


def test_ring_state_uses_reserved_buffers_and_refuses_short_ones():
    alphas, betas = rules(2, 3, seed=11)
    pages = widest_pages(alphas, betas, 4096, 20, PAGE)
    reserved = RingBuffers.allocate(2, 8, 3, pages, torch.device("cpu"))
    state = RingState(alphas, betas, 20, 4, PAGE, 4096, torch.device("cpu"), max_rows=8, buffers=reserved)
    assert state.buffers is reserved and state._spans_buf.data_ptr() == reserved.spans.data_ptr()
    short = RingBuffers.allocate(2, 8, 3, pages - 1, torch.device("cpu"))
    with pytest.raises(RuntimeError, match="ring buffers reserved"):
        RingState(alphas, betas, 20, 4, PAGE, 4096, torch.device("cpu"), max_rows=8, buffers=short)
