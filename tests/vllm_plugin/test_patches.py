"""Each monkeypatch in moa_vllm.vllm_plugin.patches, exercised against the installed vLLM (no engine)."""

from __future__ import annotations

import json

import pytest
import torch
from pydantic import ValidationError

from moa_vllm.plan import PlanError
from moa_vllm.vllm_plugin import register
from moa_vllm.vllm_plugin.patches import BACKEND_PATH, apply_all
from tests.conftest import PLANS


@pytest.fixture(autouse=True, scope="module")
def _registered():
    register()


def test_patches_are_idempotent():
    from vllm.entrypoints.generate.beam_search.offline import BeamSearchOfflineMixin
    from vllm.entrypoints.generate.beam_search.online import BeamSearchOnlineMixin
    from vllm.entrypoints.launchers.api_server import entry
    from vllm.platforms.cpu import CpuPlatform
    from vllm.v1.core.kv_cache_manager import KVCacheManager
    from vllm.v1.engine.core import EngineCore
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    def targets():
        return (
            CpuPlatform.__dict__["get_attn_backend_cls"],
            GPUModelRunner._build_attention_metadata,
            GPUModelRunner._dummy_run,
            KVCacheManager.allocate_slots,
            KVCacheManager.free,
            BeamSearchOnlineMixin.beam_search,
            BeamSearchOfflineMixin.beam_search,
            entry.serve_http,
            EngineCore.moa_inspect,
        )

    before = targets()
    assert all(getattr(getattr(t, "__func__", t), "_moa_vllm_patched", False) for t in before)  # applied at all
    apply_all()
    assert targets() == before


def test_backend_alias():
    from vllm.config.attention import AttentionConfig
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    assert AttentionBackendEnum["MOA"] is AttentionBackendEnum.CUSTOM
    assert AttentionConfig.validate_backend_before("moa") is AttentionBackendEnum.CUSTOM
    assert AttentionBackendEnum.CUSTOM.get_path() == BACKEND_PATH


@pytest.mark.parametrize(("selected", "expected"), [("CUSTOM", BACKEND_PATH), ("CPU_ATTN", "cpu_attn")])
def test_cpu_backend_selection(selected, expected):
    from vllm.platforms.cpu import CpuPlatform
    from vllm.v1.attention.backends.registry import AttentionBackendEnum
    from vllm.v1.attention.selector import AttentionSelectorConfig

    cfg = AttentionSelectorConfig(head_size=64, dtype=torch.float32, kv_cache_dtype="auto", block_size=128)
    assert expected in CpuPlatform.get_attn_backend_cls(AttentionBackendEnum[selected], cfg)


# VllmConfig is a pydantic dataclass: a PlanError raised in its __post_init__ reaches the caller wrapped in a
# ValidationError whose message is the PlanError's.
CONFIG_ERRORS = (PlanError, ValidationError)


def _engine_config(model_dir, **kwargs):
    from vllm.engine.arg_utils import EngineArgs

    return EngineArgs(model=str(model_dir), max_model_len=512, **kwargs).create_engine_config()


@pytest.mark.model
@pytest.mark.parametrize("caching", [True, False])
def test_config_check_accepts_plan_and_keeps_prefix_caching_as_asked(model_dir, caching):
    cfg = _engine_config(
        model_dir,
        attention_backend="moa",
        enable_prefix_caching=caching,
        additional_config={"moa": {"plan": str(PLANS / "uniform-d0.25.json")}},
    )
    assert cfg.cache_config.enable_prefix_caching is caching


@pytest.mark.model
@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"attention_backend": "moa"}, "needs a plan file"),
        (
            {"attention_backend": "moa", "additional_config": {"moa": {"plan": "/nope/plan.json"}}},
            "/nope/plan.json: plan file not found",
        ),
        ({"attention_backend": "moa", "additional_config": {"moa": {"path": "x"}}}, "additional_config.moa"),
        ({"additional_config": {"moa": {"plan": str(PLANS / "dense.json")}}}, "add --attention-backend moa"),
    ],
)
def test_config_check_rejects_bad_flags(model_dir, monkeypatch, kwargs, message):
    monkeypatch.delenv("MOA_VLLM_PLAN", raising=False)
    with pytest.raises(CONFIG_ERRORS, match=message):
        _engine_config(model_dir, **kwargs)


@pytest.mark.model
def test_config_check_rejects_plan_for_another_model(model_dir, tmp_path):
    data = json.loads((PLANS / "dense.json").read_text())
    data["model"]["head_dim"] = 128
    path = tmp_path / "wrong.json"
    path.write_text(json.dumps(data))
    with pytest.raises(CONFIG_ERRORS, match="wrong.json: plan does not fit the model: model.head_dim is 128"):
        _engine_config(model_dir, attention_backend="moa", additional_config={"moa": {"plan": str(path)}})


@pytest.fixture
def bst_dir(tmp_path):
    from moa_vllm.bst import BSTConfig, BSTForCausalLM

    config = BSTConfig(vocab_size=10, hidden_size=64, num_attention_heads=2, sliding_window=16)
    return BSTForCausalLM(config).save_pretrained(tmp_path / "bst")


def test_config_check_selects_moa_with_a_window_plan_for_bst(bst_dir, monkeypatch):
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    from moa_vllm.vllm_plugin.settings import plan_from_vllm_config

    monkeypatch.delenv("MOA_VLLM_PLAN", raising=False)
    cfg = _engine_config(bst_dir, skip_tokenizer_init=True, enable_prefix_caching=False)
    assert cfg.attention_config.backend == AttentionBackendEnum.CUSTOM
    plan = plan_from_vllm_config(cfg)  # 2 self + 2 context heads per call: the fingerprint counts 4
    assert (plan.model.num_query_heads, plan.model.num_kv_heads, plan.sink_tokens) == (4, 4, 0)
    assert plan.spans(512) == [[16] * 4] * 2


def test_config_check_rejects_another_backend_for_bst(bst_dir):
    with pytest.raises(CONFIG_ERRORS, match="BST model runs its attention on the moa backend"):
        _engine_config(bst_dir, skip_tokenizer_init=True, attention_backend="CPU_ATTN")


def test_config_check_rejects_a_plan_for_another_model_on_bst(bst_dir):
    with pytest.raises(CONFIG_ERRORS, match="plan does not fit the model: model.num_layers is 30 but the model has 2"):
        plan = {"moa": {"plan": str(PLANS / "dense.json")}}
        _engine_config(bst_dir, skip_tokenizer_init=True, additional_config=plan)


@pytest.mark.model
def test_layer_kv_spec_builds_a_ring_spec_per_layer(model_dir):
    """Attention.get_kv_cache_spec on real MoA layers of the real model config."""
    from vllm.config import set_current_vllm_config
    from vllm.model_executor.layers.attention.attention import Attention

    from moa_vllm.plan import load_plan
    from moa_vllm.plan.ring import layer_blocks
    from moa_vllm.vllm_plugin.moa.kv_spec import MoARingSpec

    cfg = _engine_config(
        model_dir,
        attention_backend="moa",
        block_size=32,
        additional_config={"moa": {"plan": str(PLANS / "uniform-d0.25.json")}},
    )
    with set_current_vllm_config(cfg):
        layer = Attention(
            num_heads=9,
            head_size=64,
            scale=0.125,
            num_kv_heads=3,
            cache_config=cfg.cache_config,
            prefix="model.layers.7.self_attn.attn",
        )
        spec = layer.get_kv_cache_spec(cfg)
    plan = load_plan(PLANS / "uniform-d0.25.json")
    assert isinstance(spec, MoARingSpec)
    assert (spec.sink_tokens, spec.min_span, spec.block_size) == (64, plan.min_span, 32)
    # every layer's rules: the same spec for every MoA layer, so vLLM makes one KV cache group of them
    assert spec.alphas == tuple(tuple(r.alpha for r in rules) for rules in plan.rules)
    assert spec.betas == tuple(tuple(r.beta for r in rules) for rules in plan.rules)
    # 0.25 * 512 = 128 tokens per head = 4 pages of 32; 3 heads -> 12 pages = 4 layer pages of 3 head pages per
    # layer; 30 layers -> 120 layer pages = 4 blocks of one page per layer
    layers = len(plan.rules)
    assert layer_blocks(spec.alphas[7], spec.betas[7], 512, plan.min_span, 32, 3) == 4
    assert spec.blocks_for_length(512) == 4 and spec.num_layers == layers
    assert spec.max_memory_usage_bytes(cfg) == spec.blocks_for_length(512) * spec.page_size_bytes
    assert spec.block_bytes == layers * spec.page_size_bytes


def test_request_lengths_publishes_rows_in_batch_order():
    from types import SimpleNamespace

    from moa_vllm.vllm_plugin.moa.engine_context import EngineContext
    from moa_vllm.vllm_plugin.patches import publish_request_lengths

    def req(prompt, max_tokens):
        return SimpleNamespace(num_prompt_tokens=prompt, sampling_params=SimpleNamespace(max_tokens=max_tokens))

    runner = SimpleNamespace(
        max_model_len=1000,
        input_batch=SimpleNamespace(req_ids=["b", "a", "c"]),
        requests={"a": req(100, 50), "b": req(900, 500), "c": req(10, None)},
    )
    context = EngineContext()
    publish_request_lengths(context, runner, num_reqs=3)
    first = context.published
    assert first.req_ids == ("b", "a", "c") and first.lengths.tolist() == [1000, 150, 1000] and not first.dummy
    publish_request_lengths(context, runner, num_reqs=2, num_reqs_padded=4)
    second = context.published
    assert second.req_ids == ("b", "a", None, None) and second.lengths.tolist()[:2] == [1000, 150]
    assert second.serial == first.serial + 1  # a new step for the builders
    runner.requests.pop("a")
    with pytest.raises(RuntimeError, match="request 'a' has no request state"):
        publish_request_lengths(context, runner, num_reqs=2)


def test_request_lengths_v2_reads_the_v2_request_states():
    """Model runner V2 keeps prompt + max_tokens per request slot (req_states.max_seq_len); rows map to slots."""
    from types import SimpleNamespace

    import numpy as np

    from moa_vllm.vllm_plugin.moa.engine_context import EngineContext
    from moa_vllm.vllm_plugin.patches import publish_request_lengths_v2

    runner = SimpleNamespace(max_model_len=1000, req_states=SimpleNamespace(max_seq_len=np.array([150, 0, 1400, 30])))
    batch = SimpleNamespace(num_reqs=3, req_ids=["x", "y", "z"], idx_mapping_np=np.array([2, 0, 3]))
    context = EngineContext()
    publish_request_lengths_v2(context, runner, batch)
    assert context.published.req_ids == ("x", "y", "z")
    assert context.published.lengths.tolist() == [1000, 150, 30]
    batch.num_reqs_after_padding = 5
    publish_request_lengths_v2(context, runner, batch)
    assert context.published.req_ids == ("x", "y", "z", None, None)
    batch.req_ids = ["_warmup_0_", "y", "_warmup_12_"]  # V2's kernel warm-up requests: rows of no request
    publish_request_lengths_v2(context, runner, batch)
    assert context.published.req_ids == (None, "y", None, None, None)


def test_request_lengths_v2_target_exists():
    """The V2 runner's hook points exist in this vLLM (where the module imports)."""
    try:
        from vllm.v1.worker.gpu.model_runner import GPUModelRunner as RunnerV2
    except ImportError:
        pytest.skip("model runner V2 is not importable on this install")
    assert callable(RunnerV2.prepare_attn) and callable(RunnerV2.prepare_dummy_attn)


def test_beam_search_is_refused_with_moa(monkeypatch):
    from vllm.entrypoints.generate.beam_search.offline import BeamSearchOfflineMixin

    from moa_vllm.vllm_plugin import patches

    monkeypatch.setattr(patches, "_moa_serving", True)
    monkeypatch.setattr(patches, "_beam_refusal", patches.BEAM_SEARCH_REFUSAL.format(max_len=4096))
    with pytest.raises(ValueError, match="needs one span length.*span_length.*4096"):
        BeamSearchOfflineMixin.beam_search(object(), [], None)


def test_beam_search_is_served_when_span_length_reaches_max_model_len():
    from types import SimpleNamespace

    from moa_vllm.vllm_plugin.patches import beam_search_refusal

    def config(moa):
        return SimpleNamespace(model_config=SimpleNamespace(max_model_len=4096), additional_config={"moa": moa})

    assert beam_search_refusal(config({"span_length": 4096})) is None
    assert beam_search_refusal(config({"span_length": 100000})) is None
    assert "span_length" in beam_search_refusal(config({"span_length": 4095}))
    assert "span_length" in beam_search_refusal(config({"span_grid": 1}))


def test_a_bad_span_hint_is_refused_where_the_request_is_made():
    from vllm import SamplingParams
    from vllm.exceptions import VLLMValidationError

    assert SamplingParams(max_tokens=4, extra_args={"moa_span_length": 8192}).extra_args["moa_span_length"] == 8192
    for bad in (0, -5, "many", 1.5, True):
        with pytest.raises(VLLMValidationError, match="moa_span_length: expected a positive integer"):
            SamplingParams(max_tokens=4, extra_args={"moa_span_length": bad})


@pytest.mark.model
@pytest.mark.parametrize(
    "kwargs, message",
    [
        (
            dict(speculative_config={"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_max": 2}),
            "speculative decoding is not supported with --attention-backend moa",
        ),
        (
            dict(kv_transfer_config={"kv_connector": "ExampleConnector", "kv_role": "kv_both"}),
            "KV connectors .* are not supported with --attention-backend moa",
        ),
        (dict(runner="pooling"), "pooling models .* are not supported with --attention-backend moa"),
    ],
)
def test_unsupported_features_are_refused(model_dir, kwargs, message):
    """Each one stops at config time (API-server process, before any worker) with its own message."""
    plan = {"moa": {"plan": str(PLANS / "uniform-d0.25.json")}}
    with pytest.raises(CONFIG_ERRORS, match=message):
        _engine_config(model_dir, attention_backend="moa", additional_config=plan, **kwargs)


def test_micro_batching_is_refused():
    """DBO / ubatching (a GPU feature; the CPU wheel turns it off before our check, so the config is built here)."""
    from types import SimpleNamespace

    from moa_vllm.plan import PlanError
    from moa_vllm.vllm_plugin.patches import refuse_unsupported_features

    config = SimpleNamespace(
        speculative_config=None,
        kv_transfer_config=None,
        parallel_config=SimpleNamespace(use_ubatching=True),
        model_config=SimpleNamespace(runner_type="generate"),
    )
    with pytest.raises(PlanError, match="micro-batching .* is not supported with --attention-backend moa"):
        refuse_unsupported_features(config)
    config.parallel_config.use_ubatching = False
    refuse_unsupported_features(config)


@pytest.mark.parametrize("errored", [True, False])
def test_engine_death_makes_the_api_server_exit_nonzero(monkeypatch, errored):
    """The wrapped serve_http, after uvicorn stopped: a dead engine -> SystemExit(1) once shutdown ran; a healthy
    engine -> the shutdown task is handed back as before. (The real server: tests/server/test_faults.py.)"""
    import asyncio
    from types import SimpleNamespace

    from vllm.entrypoints.launchers.api_server import entry

    from moa_vllm.vllm_plugin import patches

    ran = []

    async def shutdown():
        ran.append(True)

    async def original(app, *args, **kwargs):
        return shutdown()

    monkeypatch.setattr(entry, "serve_http", original)
    monkeypatch.setattr(patches, "_moa_serving", True)
    patches._engine_death_exit()
    engine = SimpleNamespace(errored=errored, is_running=not errored)
    app = SimpleNamespace(state=SimpleNamespace(engine_client=engine))

    async def serve():
        result = await entry.serve_http(app, None)
        await result
        return result

    if errored:
        with pytest.raises(SystemExit) as exit_info:
            asyncio.run(serve())
        assert exit_info.value.code == 1
    else:
        asyncio.run(serve())
    assert ran == [True]


def test_engine_inspect_reports_each_requests_ring_blocks_and_bytes(monkeypatch):
    from types import SimpleNamespace

    from vllm.v1.engine.core import EngineCore

    from moa_vllm.vllm_plugin.moa import request_lengths
    from moa_vllm.vllm_plugin.moa.kv_spec import MoARingManager

    def ring_manager(blocks: dict[str, list[int]], page_bytes: int, layers: int):
        m = object.__new__(MoARingManager)  # only the attributes the report reads
        m.req_to_blocks = {r: [SimpleNamespace(block_id=b, is_null=b == 0) for b in ids] for r, ids in blocks.items()}
        m.kv_cache_spec = SimpleNamespace(block_bytes=page_bytes * layers, num_layers=layers, block_size=32)
        return m

    # one group for both MoA layers (a block: one 1000-byte page of each); "b" also has a released prefix column
    # (the null block): not counted
    group = ring_manager({"a": [1, 2, 4], "b": [3, 5, 6, 7, 0]}, 1000, layers=2)
    other = SimpleNamespace(req_to_blocks={"a": [9] * 50})  # a non-moa group is not counted
    pool = SimpleNamespace(num_gpu_blocks=100, get_num_free_blocks=lambda: 93)
    manager = SimpleNamespace(coordinator=SimpleNamespace(single_type_managers=[group, other]), block_pool=pool)
    running = SimpleNamespace(status=SimpleNamespace(name="RUNNING"))
    scheduler = SimpleNamespace(kv_cache_manager=manager, requests={"a": running, "b": running, "c": running})
    monkeypatch.setattr(request_lengths, "_admitted", {"a": (700, 600), "b": (1500, 1400)})
    engine = SimpleNamespace(scheduler=scheduler)
    report = EngineCore.moa_inspect(engine)
    assert report["serial"] == 1 and EngineCore.moa_inspect(engine)["serial"] == 2  # counted per engine
    assert report["requests"] == [
        {"id": "a", "state": "running", "n": 700, "blocks": 3, "kv_bytes": 6000},
        {"id": "b", "state": "running", "n": 1500, "blocks": 4, "kv_bytes": 8000},
    ]  # "c" holds nothing yet: not listed
    assert report["totals"] == {
        "requests": 2, "blocks": 7, "kv_bytes": 14000, "moa_layers": 2, "block_size": 32, "pool_blocks": 100,
        "pool_free_blocks": 93,
    }  # fmt: skip
