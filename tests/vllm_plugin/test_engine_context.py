"""The per-engine hand-off from the model runner to the MoA builders fails loudly: a batch that was not published
is a RuntimeError (V1 through a real engine, V2 through its patched hook), and a runner without its hook is refused
before serving."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from moa_vllm.plan import PlanError
from moa_vllm.vllm_plugin import hooks, patches, register
from moa_vllm.vllm_plugin.moa.engine_context import EngineContext, engine_context
from moa_vllm.vllm_plugin.moa.ring_state import RingState
from tests.conftest import PLANS


@pytest.fixture(autouse=True, scope="module")
def _registered():
    register()


def _moa_config(**extra) -> SimpleNamespace:
    """The two fields moa_selected reads, as on a config with --attention-backend moa."""
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    return SimpleNamespace(attention_config=SimpleNamespace(backend=AttentionBackendEnum.CUSTOM), **extra)


def test_each_config_gets_its_own_context_and_a_pickled_one_starts_empty():
    import pickle

    a, b = _moa_config(), _moa_config()
    assert engine_context(a) is engine_context(a) and engine_context(a) is not engine_context(b)
    engine_context(a).publish(["r"], [10])
    assert pickle.loads(pickle.dumps(engine_context(a))).published is None


def test_v2_hook_publishes_and_an_unpublished_step_is_refused():
    """The V2 runner cannot run on CPU (it needs Triton's CPU backend); its patched prepare_attn is called with a
    stand-in runner whose pcp_manager answers the original's first branch, so the wrapper itself runs as installed."""
    runner_v2 = hooks.v2_runner()
    if runner_v2 is None:
        pytest.skip("model runner V2 is not importable on this install")
    assert getattr(runner_v2.__dict__["prepare_attn"], hooks.MARK)
    runner = SimpleNamespace(
        vllm_config=_moa_config(),
        max_model_len=1000,
        req_states=SimpleNamespace(max_seq_len=np.array([300, 120])),
        pcp_manager=SimpleNamespace(prepare_attn=lambda batch: ("tables", "slots")),
    )
    batch = SimpleNamespace(num_reqs=2, req_ids=["x", "y"], idx_mapping_np=np.array([1, 0]))
    assert runner_v2.prepare_attn(runner, batch) == ("tables", "slots")
    context = engine_context(runner.vllm_config)
    assert context.published.req_ids == ("x", "y") and context.published.lengths.tolist() == [120, 300]

    state = RingState(torch.full((1, 2), 64.0).double(), torch.zeros(1, 2).double(), 8, 4, 16, 1000, "cpu")
    common = SimpleNamespace(
        num_reqs=2, query_start_loc_cpu=torch.tensor([0, 5, 10]), seq_lens=torch.tensor([5, 5], dtype=torch.int32)
    )
    context.published = None  # the batch is lost before the builders run
    with pytest.raises(RuntimeError, match="published no batch"):
        state.step_for(common, context.published)
    runner_v2.prepare_attn(runner, SimpleNamespace(num_reqs=1, req_ids=["x"], idx_mapping_np=np.array([1])))
    with pytest.raises(RuntimeError, match=r"rows 1..1 of a 2-row batch were never published .*\['x'\]"):
        state.step_for(common, context.published)


def test_a_missing_v2_hook_is_refused_at_startup(monkeypatch):
    config = SimpleNamespace(use_v2_model_runner=True)
    monkeypatch.setattr(hooks, "v2_runner", lambda: None)
    with pytest.raises(PlanError, match="model runner V2 is selected but .* cannot be imported"):
        hooks.check_runner_hooks(config)

    class Unpatched:
        def prepare_attn(self, batch): ...

        def prepare_dummy_attn(self, batch): ...

    monkeypatch.setattr(hooks, "v2_runner", lambda: Unpatched)
    with pytest.raises(PlanError, match="prepare_attn/prepare_dummy_attn is not installed"):
        hooks.check_runner_hooks(config)


def test_the_v1_hooks_are_installed():
    hooks.check_runner_hooks(SimpleNamespace(use_v2_model_runner=False))


@pytest.mark.engine
def test_a_v1_step_whose_batch_was_deleted_raises(model_dir, monkeypatch):
    """A real engine (V1 runner, CPU): after start-up, every real publication is deleted before the builders run;
    the step must fail with the RuntimeError instead of attending with spans of 0."""
    from vllm import SamplingParams

    from tests.vllm_plugin.conftest import close_llm, make_llm

    llm = make_llm(model_dir, PLANS / "uniform-d0.25.json", max_model_len=1024)
    try:
        original = EngineContext.publish_requests

        def publish_then_lose(self, *args, **kwargs):
            original(self, *args, **kwargs)
            self.published = None

        monkeypatch.setattr(EngineContext, "publish_requests", publish_then_lose)
        with pytest.raises(Exception) as info:
            llm.generate(["The capital of France is"], SamplingParams(max_tokens=4, temperature=0))
        chain, e = [], info.value
        while e is not None:
            chain.append(str(e))
            e = e.__cause__ or e.__context__
        assert any("published no batch" in m for m in chain), chain
    finally:
        monkeypatch.undo()
        close_llm(llm)


def test_v2_capture_batches_are_published_as_dummy_rows():
    """V2 builds capture batches (FULL and PIECEWISE) in cudagraph_utils.prepare_inputs_to_capture, past its
    prepare_attn hooks: the patched function publishes the capture's rows as dummy rows before vLLM's own code runs
    (which then fails here on the stand-in inputs, after the publication)."""
    if hooks.v2_runner() is None:
        pytest.skip("model runner V2 is not importable on this install")
    from vllm.v1.worker.gpu import cudagraph_utils

    config = _moa_config(model_config=SimpleNamespace(max_model_len=512))
    model_state = SimpleNamespace(vllm_config=config)
    with pytest.raises(Exception):  # noqa: B017 (vLLM's body on stand-in buffers)
        cudagraph_utils.prepare_inputs_to_capture(3, 3, model_state, None, None, [], None, False)
    published = engine_context(config).published
    assert published.dummy and published.req_ids == (None,) * 3

    state = RingState(torch.full((1, 2), 64.0).double(), torch.zeros(1, 2).double(), 8, 4, 16, 512, "cpu")
    common = SimpleNamespace(  # vLLM padded the capture batch to 4 rows: all of them dummy
        num_reqs=4, query_start_loc_cpu=torch.arange(5), seq_lens=torch.ones(4, dtype=torch.int32)
    )
    step = state.step_for(common, published)
    assert step.req_ids == (None,) * 4 and int(step.spans.abs().sum()) == 0


def test_fresh_rows_are_marked_once_and_grid_rounds_n():
    context = EngineContext(span_grid=8)
    scheduler_output = SimpleNamespace(
        scheduled_new_reqs=[SimpleNamespace(req_id="new")],
        scheduled_cached_reqs=SimpleNamespace(resumed_req_ids={"back"}),
    )
    patches.record_fresh(context, scheduler_output)
    batch = context.publish(["old", "new", "back", None], [100, 1000, 300, 2048], prompts=[90, 900, 200, 0],
                            max_model_len=2048)  # fmt: skip
    assert batch.fresh == (False, True, True, False)
    assert batch.lengths.tolist() == [112, 1024, 320, 2048]  # the span grid (8 steps per octave, multiples of 16)
    assert context.publish(["old", "new", "back"], [100, 1000, 300], max_model_len=2048).fresh == (False,) * 3


def test_hints_and_the_floor_set_the_span_length_and_n_caps_the_spans():
    import pickle

    context = EngineContext(span_grid=1, span_floor=600)
    new = [
        SimpleNamespace(req_id="hinted", sampling_params=SimpleNamespace(extra_args={"moa_span_length": 3000})),
        SimpleNamespace(req_id="plain", sampling_params=SimpleNamespace(extra_args=None)),
    ]
    patches.record_fresh(context, SimpleNamespace(scheduled_new_reqs=new))
    batch = context.publish(["hinted", "plain"], [1000, 100], prompts=[900, 90], max_model_len=8192)
    assert batch.lengths.tolist() == [4096, 1024] and batch.own_lengths().tolist() == [1000, 100]
    state = RingState(torch.zeros(1, 2).double(), torch.ones(1, 2).double(), 4, 4, 16, 8192, "cpu", prefix=True)
    common = SimpleNamespace(
        num_reqs=2, query_start_loc_cpu=torch.tensor([0, 900, 990]), seq_lens=torch.tensor([900, 90]),
        seq_lens_cpu_upper_bound=torch.tensor([900, 90]),
    )  # fmt: skip
    spans = state.step_for(common, batch).spans  # dense rules: span = L, capped by each request's own N
    assert spans[0].tolist() == [[1000, 1000], [100, 100]]
    patches.record_fresh(context, SimpleNamespace(scheduled_new_reqs=[], finished_req_ids={"hinted"}))
    assert context.span_hints == {}
    copy = pickle.loads(pickle.dumps(context))
    assert (copy.span_grid, copy.span_floor) == (1, 600)


def test_a_fresh_ring_past_position_zero_without_prefix_caching_is_refused():
    state = RingState(torch.full((1, 2), 64.0).double(), torch.zeros(1, 2).double(), 8, 4, 16, 1000, "cpu")
    context = EngineContext()
    patches.record_fresh(context, SimpleNamespace(scheduled_new_reqs=[SimpleNamespace(req_id="r")]))
    batch = context.publish(["r"], [500], prompts=[400])
    common = SimpleNamespace(
        num_reqs=1, query_start_loc_cpu=torch.tensor([0, 8]), seq_lens=torch.tensor([264]),
        seq_lens_cpu_upper_bound=torch.tensor([264]),
    )  # fmt: skip
    with pytest.raises(RuntimeError, match="start at positions \\[256\\] in fresh rings, but prefix caching is off"):
        state.step_for(common, batch)
