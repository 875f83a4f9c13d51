"""Every monkeypatch moa-vllm applies to vLLM, in one place. All target vLLM 0.32.x (run by the tests) and 0.33.x
(canaries only: each target's import path and parameters, read from its source; canaries.py, compat.py).

- backend_alias: AttentionBackendEnum._member_map_["MOA"] -> CUSTOM, so `--attention-backend moa` resolves.
- cpu_backend_selection: CpuPlatform.get_attn_backend_cls ignores any selected backend; honour CUSTOM.
- config_check: <current platform>.check_and_update_config; select the moa backend for a BST model (its window
  is a derived plan), load and verify the plan in the API-server process, before any worker starts; prefix caching
  stays as vLLM set it (off for the BST).
- layer_kv_spec: Attention.get_kv_cache_spec; full-attention layers never reach the backend's customize_spec,
  so each MoA layer's MoARingSpec (the same for every MoA layer: one KV cache group, per-KV-head rings) is made here.
- admission_lengths: KVCacheManager.allocate_slots, .free and .get_computed_blocks; sign each request with its span
  signature and record its N (on the span grid) and prompt length for the ring managers (which see only request
  ids) before vLLM sizes its allocation, retry a chunk without its optional prefix blocks when they do not fit, give
  back one block of a hit that would leave one token, log the blocks it holds, forget N when it is freed.
- prefix_hash: kv_cache_utils.generate_block_hash_extra_keys; add the request's span signature to every block's
  extra keys, so a prefix-cache hit never mixes spans.
- request_lengths: GPUModelRunner._build_attention_metadata and ._dummy_run (model runner V1; CPUModelRunner
  inherits both); publish each row's request id and N (prompt + max_tokens) into the engine's context
  (moa/engine_context.py) for the metadata builders, which see neither; rows built inside _dummy_run are published
  as dummy rows, capture batches are left to the builders' build_for_cudagraph_capture; _update_states records the
  new and resumed requests (fresh rings, where a prefix-cache hit is restored).
- request_lengths_v2: vllm.v1.worker.gpu.model_runner.GPUModelRunner.prepare_attn / prepare_dummy_attn and
  vllm.v1.worker.gpu.cudagraph_utils.prepare_inputs_to_capture (model runner V2, the GPU wheel's default with
  Triton); the same, from V2's request states; capture batches (FULL and PIECEWISE) as dummy rows; add_requests
  records V2's new requests (a preempted one comes back as new).
  hooks.check_runner_hooks refuses to serve (config time and worker start) when the runner in use lacks its hook.
- beam_search: BeamSearchOnlineMixin.beam_search and BeamSearchOfflineMixin.beam_search; refused with the moa
  backend unless the server's span_length reaches max_model_len (every beam step is a new request with another N,
  so without one span length for all steps the spans would change along a beam).
- span_hint: SamplingParams._verify_extra_args; a request's `moa_span_length` (extra_args / the OpenAI API's
  vllm_xargs) must be a positive integer, refused where the request is made (a 400 naming the field), never in the
  engine process, whose scheduler reads it (plan/span.span_length).
- engine_death_exit: vllm.entrypoints.launchers.api_server.entry.serve_http; when the engine process died, vLLM
  answers 500s, stops uvicorn and exits 0; with the moa backend the API server says so and exits 1 instead, so a
  supervisor sees the failure.
- engine_inspect: vllm.v1.engine.core.EngineCore gains the utility method moa_inspect (per request: N, ring blocks
  and bytes from the scheduler's KV cache manager), which the `moa_inspect` endpoint plugin calls through the engine
  client's utility call for /moa/requests and the moa_vllm:* gauges.

Each patch is idempotent and is tested in tests/vllm_plugin/test_patches.py.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable
from dataclasses import dataclass

from vllm.logger import init_logger

from moa_vllm.vllm_plugin.hooks import MARK, check_runner_hooks, v2_runner, wrap_once
from moa_vllm.vllm_plugin.settings import BACKEND_PATH, moa_selected

logger = init_logger("vllm.moa_vllm")  # under "vllm" so vLLM's log config prints it
__all__ = ["BACKEND_PATH", "PATCHES", "apply_all", "moa_selected"]
ALIAS = "MOA"
CHECKED = ("0.32", "0.33")  # 0.32: run by the tests; 0.33: canaries hold in its source (canaries.py)


@dataclass(frozen=True)
class Patch:
    name: str
    target: str
    vllm_versions: tuple[str, ...]  # series whose source this patch's canaries were checked against
    apply: Callable[[], None]


# ---- backend_alias ---------------------------------------------------------------------------------------------
def _backend_alias() -> None:
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    # A new enum member would not survive pickling into spawned workers; an alias of CUSTOM does.
    AttentionBackendEnum._member_map_.setdefault(ALIAS, AttentionBackendEnum.CUSTOM)


# ---- cpu_backend_selection ---------------------------------------------------------------------------------------
def _cpu_backend_selection() -> None:
    from vllm.platforms.cpu import CpuPlatform
    from vllm.v1.attention.backend import AttentionType
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    def make(original):
        def get_attn_backend_cls(cls, selected_backend, attn_selector_config, num_heads=None):
            if (
                selected_backend == AttentionBackendEnum.CUSTOM
                and not attn_selector_config.use_mla
                and attn_selector_config.attn_type == AttentionType.DECODER
            ):
                return AttentionBackendEnum.CUSTOM.get_path()
            return original(selected_backend, attn_selector_config, num_heads)

        return get_attn_backend_cls

    wrap_once(CpuPlatform, "get_attn_backend_cls", make, classmethod_=True)


# ---- config_check --------------------------------------------------------------------------------------------------
def select_moa_for_derived(vllm_config) -> None:
    """A model family with a derived plan (the BST: its trained window) runs its attention on the moa backend:
    select it unless the user chose a backend, and refuse any other one, whose layers would get no window at all."""
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    from moa_vllm.plan import PlanError
    from moa_vllm.vllm_plugin.settings import derived_family

    if vllm_config.model_config is None:
        return
    family = derived_family(vllm_config.model_config.hf_config)
    if family is None:
        return
    if vllm_config.attention_config.backend is None:
        vllm_config.attention_config.backend = AttentionBackendEnum.CUSTOM
    if not moa_selected(vllm_config):
        raise PlanError(
            f"a {family.name.upper()} model runs its attention on the moa backend, not "
            f"{vllm_config.attention_config.backend.name}: drop --attention-backend"
        )


def refuse_unsupported_features(vllm_config) -> None:
    """Features that would silently corrupt rings: one clear error each, before any worker starts."""
    from moa_vllm.plan import PlanError

    if vllm_config.speculative_config is not None:
        raise PlanError(
            "speculative decoding is not supported with --attention-backend moa: rejected draft tokens would "
            "overwrite ring slots that later queries still need; drop --speculative-config"
        )
    if vllm_config.kv_transfer_config is not None:
        raise PlanError(
            "KV connectors (--kv-transfer-config) are not supported with --attention-backend moa: external KV "
            "blocks cannot be placed in per-request rings"
        )
    if getattr(vllm_config.parallel_config, "use_ubatching", False):
        raise PlanError(
            "micro-batching (--enable-dbo / --ubatch-size) is not supported with --attention-backend moa: both "
            "micro-batches of a step would share one ring step; drop the flag"
        )
    if getattr(vllm_config.model_config, "runner_type", "generate") == "pooling":
        raise PlanError(
            "pooling models (--runner pooling / embedding, reward, classification) are not supported with "
            "--attention-backend moa: rings are sized for generation requests"
        )


def _check_moa_config(vllm_config) -> None:
    from moa_vllm.plan import PlanError
    from moa_vllm.vllm_plugin.settings import plan_from_vllm_config

    select_moa_for_derived(vllm_config)
    if not moa_selected(vllm_config):
        if isinstance(vllm_config.additional_config, dict) and "moa" in vllm_config.additional_config:
            raise PlanError(
                "additional_config.moa.plan is set but the attention backend is not moa: add --attention-backend moa"
            )
        return
    if vllm_config.model_config is None:
        return
    refuse_unsupported_features(vllm_config)
    check_runner_hooks(vllm_config)
    global _moa_serving, _beam_refusal
    _moa_serving = True
    _beam_refusal = beam_search_refusal(vllm_config)
    plan = plan_from_vllm_config(vllm_config)  # resolves (one log line names the source) and checks the plan
    max_len = vllm_config.model_config.max_model_len
    logger.info(
        "moa-vllm: %s plan, %d sinks, density at max_model_len=%d: %.3f",
        plan.metadata.method,
        plan.sink_tokens,
        max_len,
        plan.density(max_len),
    )
    configure_prefix_caching(vllm_config)


def configure_prefix_caching(vllm_config) -> None:
    """Prefix caching stays as vLLM set it (on by default, --no-enable-prefix-caching off), except for a model family
    with a derived plan (the BST: its SSM state has no prefix checkpoints here), where it is turned off."""
    from moa_vllm.vllm_plugin.settings import derived_family, span_floor, span_grid

    cache = vllm_config.cache_config
    if cache.enable_prefix_caching and derived_family(vllm_config.model_config.hf_config) is not None:
        logger.info("moa-vllm: prefix caching is off for this model (its SSM state is not cached)")
        cache.enable_prefix_caching = False
    if cache.enable_prefix_caching:
        logger.info(
            "moa-vllm: prefix caching on for MoA layers (position-ordered prefix blocks; spans taken at N, a client's "
            "moa_span_length and at least %d tokens, rounded up to a grid of %d steps per octave)",
            span_floor(vllm_config),
            span_grid(vllm_config),
        )


def _config_check() -> None:
    from vllm.platforms import current_platform

    def make(original):
        def check_and_update_config(cls, vllm_config):
            original(vllm_config)
            _check_moa_config(vllm_config)

        return check_and_update_config

    wrap_once(type(current_platform), "check_and_update_config", make, classmethod_=True)


# ---- layer_kv_spec -------------------------------------------------------------------------------------------------
def moa_layer_spec(layer, vllm_config):
    """The MoARingSpec of a MoA attention layer: the plan's rules for every layer and KV head and the TP layout, the
    same for every MoA layer, so that vLLM puts them all in one KV cache group."""
    from moa_vllm.vllm_plugin.moa.backend import layer_index
    from moa_vllm.vllm_plugin.moa.kv_spec import MoARingSpec
    from moa_vllm.vllm_plugin.settings import span_floor, span_grid

    plan = layer.impl.plan
    layer_index(layer.layer_name)  # a layer name without an index is refused here, before any cache is made
    return MoARingSpec(
        block_size=vllm_config.cache_config.block_size,
        num_kv_heads=layer.num_kv_heads,
        head_size=layer.head_size,
        head_size_v=layer.head_size_v,
        dtype=layer.kv_cache_torch_dtype,
        sink_tokens=plan.sink_tokens,
        min_span=plan.min_span,
        alphas=tuple(tuple(r.alpha for r in rules) for rules in plan.rules),
        betas=tuple(tuple(r.beta for r in rules) for rules in plan.rules),
        tp_size=vllm_config.parallel_config.tensor_parallel_size,
        span_grid=span_grid(vllm_config),
        span_floor=span_floor(vllm_config),
        prefix_blocks=bool(vllm_config.cache_config.enable_prefix_caching),
    )


def _layer_kv_spec() -> None:
    from vllm.model_executor.layers.attention.attention import Attention

    def make(original):
        def get_kv_cache_spec(self, vllm_config):
            from moa_vllm.vllm_plugin.moa.backend import MoAImpl

            if isinstance(getattr(self, "impl", None), MoAImpl):
                return moa_layer_spec(self, vllm_config)
            return original(self, vllm_config)

        return get_kv_cache_spec

    wrap_once(Attention, "get_kv_cache_spec", make)


# ---- admission_lengths -------------------------------------------------------------------------------------------
def held_blocks(kv_cache_manager, request_id: str) -> int:
    """Blocks a request holds in the MoA group (one block = one page of every KV head of every MoA layer)."""
    from moa_vllm.vllm_plugin.moa.kv_spec import held, ring_managers

    return sum(held(m, request_id) for m in ring_managers(kv_cache_manager))


def admission_length(kv_cache_manager, request) -> tuple[int, int]:
    """(L, N) of a request as its rings are sized (plan/span.served_length): its span length, from its N, its
    client's hint and the server's floor on the span grid, and its own N, the cap of every span."""
    from moa_vllm.plan.span import served_length
    from moa_vllm.vllm_plugin.moa.kv_spec import ring_managers
    from moa_vllm.vllm_plugin.settings import span_hint

    managers = ring_managers(kv_cache_manager)
    spec = managers[0].kv_cache_spec if managers else None
    return served_length(
        request.num_prompt_tokens,
        request.max_tokens,
        kv_cache_manager.max_model_len,
        spec.span_grid if spec else 0,
        span_hint(request.sampling_params),
        spec.span_floor if spec else 0,
    )


def ring_block_bytes(kv_cache_manager) -> int:
    from moa_vllm.vllm_plugin.moa.kv_spec import ring_managers

    managers = ring_managers(kv_cache_manager)
    return managers[0].kv_cache_spec.block_bytes if managers else 0


def moa_block_size(kv_cache_manager) -> int:
    from moa_vllm.vllm_plugin.moa.kv_spec import ring_managers

    managers = ring_managers(kv_cache_manager)
    return managers[0].block_size if managers else 0  # 0: no MoA layers


def single_token_prompt_chunk(request, num_new_tokens: int, block_size: int) -> bool:
    """A one-token chunk inside the prompt's full blocks: its row looks like a decode row, whose replayed CUDA graph
    would not write the prefix block, so the request stops caching there (blocks before it stay cached)."""
    end = request.num_prompt_tokens // block_size * block_size
    return num_new_tokens == 1 and request.num_computed_tokens < end


def _admission_lengths() -> None:
    from vllm.v1.core.kv_cache_manager import KVCacheManager

    from moa_vllm.vllm_plugin.moa import request_lengths

    def make_allocate(original):
        @functools.wraps(original)
        def allocate_slots(self, request, *args, **kwargs):
            rid = request.request_id
            first = not request_lengths.is_admitted(rid)
            sign_request(self, request)
            n, own = admission_length(self, request)
            request_lengths.admit(rid, n, request.num_prompt_tokens, own)
            num_new = args[0] if args else kwargs.get("num_new_tokens", 0)
            caching = self.enable_caching and moa_block_size(self) > 0
            if caching and single_token_prompt_chunk(request, num_new, moa_block_size(self)):
                request_lengths.set_caching(rid, False)
            result = original(self, request, *args, **kwargs)
            if result is None and caching and request_lengths.caching_allowed(rid):
                # No room for the chunk's prefix blocks as well: they are optional, the request must not wait or
                # preempt another for them. Retry without; the request stops caching (null prefix columns).
                request_lengths.set_caching(rid, False)
                result = original(self, request, *args, **kwargs)
                if result is None:  # not even the ring fits: nothing was allocated, caching may resume next time
                    request_lengths.set_caching(rid, True)
                else:
                    logger.debug("moa-vllm: request %s continues without prefix blocks (no room)", rid)
            if first and result is not None and logger.isEnabledFor(10):  # DEBUG
                blocks = held_blocks(self, rid)
                page = ring_block_bytes(self)
                logger.debug("moa-vllm: request %s N=%d holds %d blocks (%d bytes)", rid, n, blocks, blocks * page)
            return result

        return allocate_slots

    def make_free(original):
        @functools.wraps(original)
        def free(self, request, *args, **kwargs):
            original(self, request, *args, **kwargs)
            request_lengths.forget(request.request_id)

        return free

    def make_lookup(original):
        @functools.wraps(original)
        def get_computed_blocks(self, request, *args, **kwargs):
            sign_request(self, request)  # the first use of the request's block hashes
            blocks, hit, *rest = original(self, request, *args, **kwargs)
            block = moa_block_size(self)
            if block and hit and hit >= request.num_tokens - 1:
                # A hit leaving one token would make the request's first step a single-token "decode" row, whose
                # replayed CUDA graph skips the ring restore: give back one block of the hit.
                hit -= block
                blocks = self.truncate_computed_blocks(blocks, hit) if hit else self.empty_kv_cache_blocks
            return (blocks, hit, *rest)

        return get_computed_blocks

    wrap_once(KVCacheManager, "allocate_slots", make_allocate)
    wrap_once(KVCacheManager, "free", make_free)
    wrap_once(KVCacheManager, "get_computed_blocks", make_lookup)


# ---- prefix_hash ---------------------------------------------------------------------------------------------------
SIGNATURE_ATTR = "_moa_span_signature"


def sign_request(kv_cache_manager, request) -> None:
    """Give the request its span signature (plan/prefix.py) and hash its blocks again with it, before the scheduler
    uses any block hash of it (its first lookup or allocation). The rules come from the ring specs the scheduler
    holds, so this does not depend on when the plugin was loaded in the engine-core process. A no-op for a request
    already signed, without block hashes (caching off) or on an engine without MoA layers."""
    import numpy as np

    from moa_vllm.plan.prefix import signature_for
    from moa_vllm.plan.span import request_length
    from moa_vllm.vllm_plugin.moa.kv_spec import ring_managers
    from moa_vllm.vllm_plugin.settings import span_hint

    if getattr(request, SIGNATURE_ATTR, None) is not None or not kv_cache_manager.enable_caching:
        return
    managers = ring_managers(kv_cache_manager)
    if not managers:
        return
    spec = managers[0].kv_cache_spec
    alphas = np.array(spec.alphas, dtype=np.float64)
    betas = np.array(spec.betas, dtype=np.float64)
    max_len = kv_cache_manager.max_model_len
    n = request_length(request.num_prompt_tokens, request.max_tokens, max_len)
    hint = span_hint(request.sampling_params)
    signature = signature_for(alphas, betas, spec.min_span, n, max_len, spec.span_grid, hint, spec.span_floor)
    setattr(request, SIGNATURE_ATTR, signature)
    if request.block_hashes:  # hashed when the request was made, without the signature: again, with it
        request.block_hashes.clear()
        request.update_block_hashes()


def is_signed(request) -> bool:
    return getattr(request, SIGNATURE_ATTR, None) is not None


def _prefix_hash() -> None:
    from vllm.v1.core import kv_cache_utils

    def make_extra_keys(original):
        @functools.wraps(original)
        def generate_block_hash_extra_keys(request, start_token_idx, end_token_idx, start_mm_idx):
            extra, mm_idx = original(request, start_token_idx, end_token_idx, start_mm_idx)
            signature = getattr(request, SIGNATURE_ATTR, None)
            if signature is not None:
                extra = (*(extra or ()), ("moa_spans", signature(end_token_idx)))
            return extra, mm_idx

        return generate_block_hash_extra_keys

    wrap_once(kv_cache_utils, "generate_block_hash_extra_keys", make_extra_keys)


# ---- request_lengths ----------------------------------------------------------------------------------------------
def publish_request_lengths(context, runner, num_reqs: int, num_reqs_padded: int | None = None) -> None:
    """Model runner V1: each row's request id and N, from the runner's request states; rows past num_reqs up to
    num_reqs_padded (CUDA-graph padding) are rows of no request."""
    req_ids, prompts, max_tokens = [], [], []
    for req_id in runner.input_batch.req_ids[:num_reqs]:
        state = runner.requests.get(req_id)
        if state is None:
            raise RuntimeError(f"moa-vllm: batch row of request {req_id!r} has no request state in the model runner")
        params = getattr(state, "sampling_params", None)
        req_ids.append(req_id)
        prompts.append(state.num_prompt_tokens)
        max_tokens.append(params.max_tokens if params is not None else None)
    padding = max(0, (num_reqs_padded or num_reqs) - num_reqs)
    req_ids += [None] * padding
    prompts += [runner.max_model_len] * padding
    max_tokens += [None] * padding
    context.publish_requests(req_ids, prompts, max_tokens, runner.max_model_len)


def _request_lengths() -> None:
    import inspect

    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    from moa_vllm.vllm_plugin.moa.engine_context import engine_context

    def make(original):
        signature = inspect.signature(original)

        @functools.wraps(original)
        def _build_attention_metadata(self, *args, **kwargs):
            if moa_selected(self.vllm_config):
                context = engine_context(self.vllm_config)
                bound = signature.bind(self, *args, **kwargs).arguments
                if bound.get("for_cudagraph_capture"):
                    pass  # the builders' build_for_cudagraph_capture publishes the capture's dummy rows
                elif context.dummy_runs:  # inside _dummy_run: warm-up / profiling rows of no request
                    context.publish_dummy(bound.get("num_reqs_padded") or bound["num_reqs"], self.max_model_len)
                else:
                    publish_request_lengths(context, self, bound["num_reqs"], bound.get("num_reqs_padded"))
            return original(self, *args, **kwargs)

        return _build_attention_metadata

    def make_dummy_run(original):
        @functools.wraps(original)
        def _dummy_run(self, *args, **kwargs):
            if not moa_selected(self.vllm_config):
                return original(self, *args, **kwargs)
            context = engine_context(self.vllm_config)
            context.dummy_runs += 1
            try:
                return original(self, *args, **kwargs)
            finally:
                context.dummy_runs -= 1

        return _dummy_run

    def make_update_states(original):
        @functools.wraps(original)
        def _update_states(self, scheduler_output, *args, **kwargs):
            if moa_selected(self.vllm_config):
                record_fresh(engine_context(self.vllm_config), scheduler_output)
            return original(self, scheduler_output, *args, **kwargs)

        return _update_states

    wrap_once(GPUModelRunner, "_build_attention_metadata", make)
    wrap_once(GPUModelRunner, "_dummy_run", make_dummy_run)
    wrap_once(GPUModelRunner, "_update_states", make_update_states)


def record_fresh(context, scheduler_output) -> None:
    """Requests whose block lists the runner is about to (re)assign: new ones and (V1) ones resumed after
    preemption. Their rings are laid out afresh, and a prefix-cache hit is restored into them, at their next step.
    New requests' span hints are kept until vLLM says they finished."""
    from moa_vllm.vllm_plugin.settings import span_hint

    for rid in getattr(scheduler_output, "finished_req_ids", None) or ():
        context.span_hints.pop(rid, None)
    for req in scheduler_output.scheduled_new_reqs:
        context.fresh_ids.add(req.req_id)
        hint = span_hint(getattr(req, "sampling_params", None))
        if hint is not None:  # the client's span length, which the scheduler sized the rings with
            context.span_hints[req.req_id] = hint
    cached = getattr(scheduler_output, "scheduled_cached_reqs", None)
    context.fresh_ids.update(getattr(cached, "resumed_req_ids", None) or ())


# ---- request_lengths_v2 -------------------------------------------------------------------------------------------
V2_WARMUP_ID = re.compile(r"_warmup_\d+_$")  # vllm/v1/worker/gpu/warmup.py: f"_warmup_{i}_"


def publish_request_lengths_v2(context, runner, input_batch) -> None:
    """Model runner V2: N = min(prompt + max_tokens, max_model_len) from its request states (max_seq_len); rows
    past num_reqs up to num_reqs_after_padding are rows of no request."""
    import numpy as np

    num_reqs = input_batch.num_reqs
    idx = np.asarray(input_batch.idx_mapping_np)[:num_reqs]
    lengths = np.minimum(runner.req_states.max_seq_len[idx], runner.max_model_len).tolist()
    padding = max(0, (getattr(input_batch, "num_reqs_after_padding", None) or num_reqs) - num_reqs)
    # V2's kernel warm-up adds fake requests (ids _warmup_<i>_) straight to the runner with one block each, fewer
    # than their rings would need: they run as rows of no request (their outputs are discarded)
    req_ids = [None if V2_WARMUP_ID.match(r) else r for r in input_batch.req_ids[:num_reqs]] + [None] * padding
    prompt_len = getattr(runner.req_states, "prompt_len", None)
    prompts = None if prompt_len is None else np.asarray(prompt_len.np)[idx].tolist() + [0] * padding
    context.publish(req_ids, lengths + [runner.max_model_len] * padding, prompts=prompts,
                    max_model_len=runner.max_model_len)  # fmt: skip


def _request_lengths_v2() -> None:
    from moa_vllm.vllm_plugin.moa.engine_context import engine_context

    runner_v2 = v2_runner()
    if runner_v2 is None:  # check_runner_hooks refuses to serve on V2 without this hook
        return

    def make(original):
        @functools.wraps(original)
        def prepare_attn(self, input_batch, *args, **kwargs):
            if moa_selected(self.vllm_config):
                publish_request_lengths_v2(engine_context(self.vllm_config), self, input_batch)
            return original(self, input_batch, *args, **kwargs)

        return prepare_attn

    def make_dummy(original):
        @functools.wraps(original)
        def prepare_dummy_attn(self, input_batch, *args, **kwargs):
            if moa_selected(self.vllm_config):
                engine_context(self.vllm_config).publish_dummy(
                    getattr(input_batch, "num_reqs_after_padding", None) or input_batch.num_reqs, self.max_model_len
                )
            return original(self, input_batch, *args, **kwargs)

        return prepare_dummy_attn

    def make_capture(original):
        @functools.wraps(original)
        def prepare_inputs_to_capture(num_reqs, num_tokens, model_state, *args, **kwargs):
            # V2 builds its capture batches (FULL and PIECEWISE) here, past prepare_attn / prepare_dummy_attn
            config = getattr(model_state, "vllm_config", None)
            if config is not None and moa_selected(config):
                engine_context(config).publish_dummy(num_reqs, config.model_config.max_model_len)
            return original(num_reqs, num_tokens, model_state, *args, **kwargs)

        return prepare_inputs_to_capture

    def make_add(original):
        @functools.wraps(original)
        def add_requests(self, scheduler_output, *args, **kwargs):
            if moa_selected(self.vllm_config):  # V2 re-adds a preempted request as a new one
                record_fresh(engine_context(self.vllm_config), scheduler_output)
            return original(self, scheduler_output, *args, **kwargs)

        return add_requests

    wrap_once(runner_v2, "prepare_attn", make)
    wrap_once(runner_v2, "prepare_dummy_attn", make_dummy)
    wrap_once(runner_v2, "add_requests", make_add)
    from vllm.v1.worker.gpu import cudagraph_utils

    wrap_once(cudagraph_utils, "prepare_inputs_to_capture", make_capture)


# ---- beam_search ----------------------------------------------------------------------------------------------------
_moa_serving = False  # set by config_check in the API-server / LLM process when the moa backend is selected
_beam_refusal: str | None = None  # set with it: why this server refuses beam search (None: it serves it)

BEAM_SEARCH_REFUSAL = (
    "moa-vllm: beam search with --attention-backend moa needs one span length for every step of the search (each "
    "beam step is a new request whose N, and so its spans, would differ, and vLLM's beam search passes no "
    "moa_span_length to its steps): start the server with --additional-config "
    "'{{\"moa\": {{\"span_length\": {max_len}}}}}' (span_length >= max_model_len = {max_len}), or use sampling "
    "or greedy decoding"
)


def beam_search_refusal(vllm_config) -> str | None:
    """None when every beam step gets the spans at max_model_len (the server's span_length reaches it), so all steps
    of a search have equal spans and each step's prefix is a cache hit; else the refusal naming the setting."""
    from moa_vllm.vllm_plugin.settings import span_floor

    max_len = vllm_config.model_config.max_model_len
    return None if span_floor(vllm_config) >= max_len else BEAM_SEARCH_REFUSAL.format(max_len=max_len)


def _beam_search() -> None:
    from vllm.entrypoints.generate.beam_search.offline import BeamSearchOfflineMixin
    from vllm.entrypoints.generate.beam_search.online import BeamSearchOnlineMixin

    def make_async(original):
        @functools.wraps(original)
        async def beam_search(self, *args, **kwargs):
            if _moa_serving and _beam_refusal:
                raise ValueError(_beam_refusal)
            async for item in original(self, *args, **kwargs):
                yield item

        return beam_search

    def make_sync(original):
        @functools.wraps(original)
        def beam_search(self, *args, **kwargs):
            if _moa_serving and _beam_refusal:
                raise ValueError(_beam_refusal)
            return original(self, *args, **kwargs)

        return beam_search

    wrap_once(BeamSearchOnlineMixin, "beam_search", make_async)
    wrap_once(BeamSearchOfflineMixin, "beam_search", make_sync)


# ---- span_hint -----------------------------------------------------------------------------------------------------
def _span_hint() -> None:
    from vllm.exceptions import VLLMValidationError
    from vllm.sampling_params import SamplingParams

    from moa_vllm.vllm_plugin.settings import SPAN_HINT_KEY, span_hint

    def make(original):
        @functools.wraps(original)
        def _verify_extra_args(self, *args, **kwargs):
            original(self, *args, **kwargs)
            try:
                span_hint(self)
            except ValueError as err:
                raise VLLMValidationError(str(err), parameter=SPAN_HINT_KEY) from None

        return _verify_extra_args

    wrap_once(SamplingParams, "_verify_extra_args", make)


ENGINE_DEATH_EXIT_STATUS = 1


def _engine_death_exit() -> None:
    from vllm.entrypoints.launchers.api_server import entry

    def make(original):
        @functools.wraps(original)
        async def serve_http(app, *args, **kwargs):
            engine = getattr(getattr(app, "state", None), "engine_client", None)  # vLLM drops app.state at shutdown
            shutdown = await original(app, *args, **kwargs)
            if _moa_serving and engine is not None and engine.errored and not engine.is_running:
                await shutdown
                logger.error("moa-vllm: the engine process died; the API server exits with status %d",
                             ENGINE_DEATH_EXIT_STATUS)  # fmt: skip
                raise SystemExit(ENGINE_DEATH_EXIT_STATUS)
            return shutdown

        return serve_http

    wrap_once(entry, "serve_http", make)


# ---- engine_inspect ----------------------------------------------------------------------------------------------
def _engine_inspect() -> None:
    """EngineCore.moa_inspect: a utility method (vLLM dispatches utility calls by name with getattr) returning what
    each request's rings hold; the API server's /moa/requests and gauges call it (vllm_plugin/inspect/)."""
    from vllm.v1.engine.core import EngineCore

    from moa_vllm.vllm_plugin.inspect.report import UTILITY, engine_report

    if getattr(EngineCore.__dict__.get(UTILITY), MARK, False):
        return

    def moa_inspect(self):
        return engine_report(self)

    setattr(moa_inspect, MARK, True)
    setattr(EngineCore, UTILITY, moa_inspect)


PATCHES: tuple[Patch, ...] = (
    Patch("backend_alias", "AttentionBackendEnum._member_map_", CHECKED, _backend_alias),
    Patch("cpu_backend_selection", "CpuPlatform.get_attn_backend_cls", CHECKED, _cpu_backend_selection),
    Patch("config_check", "<platform>.check_and_update_config", CHECKED, _config_check),
    Patch("layer_kv_spec", "Attention.get_kv_cache_spec", CHECKED, _layer_kv_spec),
    Patch("admission_lengths", "KVCacheManager.allocate_slots/free/get_computed_blocks", CHECKED, _admission_lengths),
    Patch("prefix_hash", "kv_cache_utils.generate_block_hash_extra_keys", CHECKED, _prefix_hash),
    Patch(
        "request_lengths",
        "GPUModelRunner._build_attention_metadata/_dummy_run/_update_states",
        CHECKED,
        _request_lengths,
    ),
    Patch(
        "request_lengths_v2",
        "gpu.model_runner.GPUModelRunner.prepare_attn/prepare_dummy_attn/add_requests, "
        "gpu.cudagraph_utils.prepare_inputs_to_capture",
        CHECKED,
        _request_lengths_v2,
    ),
    Patch("beam_search", "BeamSearchOnlineMixin/BeamSearchOfflineMixin.beam_search", CHECKED, _beam_search),
    Patch("span_hint", "SamplingParams._verify_extra_args", CHECKED, _span_hint),
    Patch("engine_death_exit", "launchers.api_server.entry.serve_http", CHECKED, _engine_death_exit),
    Patch("engine_inspect", "EngineCore.moa_inspect (new utility method)", CHECKED, _engine_inspect),
)


def apply_all() -> None:
    for patch in PATCHES:
        patch.apply()
