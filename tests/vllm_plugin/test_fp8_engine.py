"""fp8 rings in the real engine (CPU wheel): a dense plan and a heterogeneous sparse plan with --kv-cache-dtype fp8,
the plan's kv_amax giving the per-layer scales, prefill in chunks of 256 tokens that read earlier chunks back from
the fp8 rings, then decode.

Two references. Layer by layer, every step's attention output equals a float64 torch attention with the plan's masks
over the layer's keys and values quantized as float8 of value / scale (nearest), the sharp test. End to end, greedy
tokens agree with the HF model under the same masks and quantization by vLLM's top-5 convention; log-probabilities
cannot be compared tightly there: rounding to float8 makes two float32 implementations whose activations differ by
1e-6 pick the neighbouring float8 value for a few elements, and those flips grow through the layers (measured: mean
|logprob difference| 2-7e-2, against 1e-6 without quantization). A ring block holds a quarter of a float32 one's
bytes."""

from __future__ import annotations

import pytest
import torch

from moa_vllm.data import natural_prompt
from moa_vllm.plan import dense_plan, fingerprint_from_hf_config, load_hf_config, load_plan, save_plan
from moa_vllm.plan.span import served_length
from moa_vllm.vllm_plugin.moa import backend
from moa_vllm.vllm_plugin.settings import DEFAULT_SPAN_GRID
from tests.conftest import PLANS
from tests.vllm_plugin.conftest import close_llm, engine_core, make_llm
from tests.vllm_plugin.hf_reference import ReferenceLM
from tests.vllm_plugin.matching import assert_greedy_close
from tests.vllm_plugin.plans import heterogeneous_plan

pytestmark = [
    pytest.mark.engine,
    pytest.mark.skipif(
        not (torch.cpu._is_avx512_supported() or torch.cpu._is_amx_tile_supported()),
        reason="vLLM's CPU fp8 KV cache needs AVX-512 or AMX",
    ),
]

LENGTHS = [20, 400, 1500]
MAX_TOKENS = 24
MAX_MODEL_LEN = 2048
ATTENTION_TOL = 1e-4  # float32 kernels against float64 over the same float8 values (measured ~1e-6)
E4M3 = torch.float8_e4m3fn


@pytest.fixture(scope="module")
def plans(model_dir, tmp_path_factory):
    """Dense and heterogeneous plans carrying the shipped moa-d0.25 plan's kv_amax (measured on this model)."""
    fp = fingerprint_from_hf_config(load_hf_config(model_dir))
    amax = load_plan(PLANS / "moa-d0.25.json").kv_amax
    assert amax is not None
    folder = tmp_path_factory.mktemp("plans")
    return {
        name: save_plan(plan.model_copy(update={"kv_amax": amax}), folder / f"{name}.json")
        for name, plan in (("dense", dense_plan(fp)), ("hetero", heterogeneous_plan(fp)))
    }


@pytest.fixture(scope="module")
def prompts(tokenizer):
    return [natural_prompt(tokenizer, n, seed=70 + i) for i, n in enumerate(LENGTHS)]


@pytest.fixture(scope="module")
def runs(model_dir, plans, prompts):
    """Per plan: each prompt's greedy tokens and top-5, every layer's attention calls for it, the ring spec.
    One prompt per generate call, so every recorded call belongs to that one request."""
    from vllm import SamplingParams

    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0, logprobs=5, ignore_eos=True)
    out = {}
    with pytest.MonkeyPatch.context() as mp:
        calls: dict[int, list] = {}
        real = backend.ring_forward

        def recording(q, k, v, out_, view, cell_map, page, kernels, step, layer, sinks, scale):
            real(q, k, v, out_, view, cell_map, page, kernels, step, layer, sinks, scale)
            calls.setdefault(layer, []).append((q.clone(), k.clone(), v.clone(), out_.clone(), kernels.k_scale,
                                                kernels.v_scale, scale))  # fmt: skip

        mp.setattr(backend, "ring_forward", recording)
        for name, plan_path in plans.items():
            llm = make_llm(model_dir, plan_path, kv_cache_dtype="fp8", max_model_len=MAX_MODEL_LEN,
                           max_num_batched_tokens=256)  # fmt: skip
            spec = engine_core(llm).scheduler.kv_cache_config.kv_cache_groups[0].kv_cache_spec
            rows = []
            for p in prompts:
                calls.clear()
                o = llm.generate([{"prompt_token_ids": p}], params, use_tqdm=False)[0].outputs[0]
                top5 = [sorted(lp, key=lambda t: -lp[t].logprob)[:5] for lp in o.logprobs]
                rows.append((list(o.token_ids), top5, dict(calls)))
            out[name] = (rows, spec)
            close_llm(llm)
    return out


@pytest.fixture(scope="module")
def reference(model_dir):
    return ReferenceLM(model_dir)


def _as_fp8(x: torch.Tensor, scale: float) -> torch.Tensor:
    """float8 of x / scale, the division in float32 as the cache write does it: one element on the other side of
    a rounding boundary moves by a whole float8 step, which alone can move a layer's output by 1e-2."""
    return (x.float() / scale).clamp(-448, 448).to(E4M3).double() * scale


def _attention_error(calls: dict[int, list], plan, n: tuple[int, int], quantized: bool = True) -> float:
    """Largest |engine - reference| over every layer and step of one request: the step's queries at positions
    [c, c + T) over the layer's keys [0, c + T) under the plan's masks at N = n, float64, K/V as float8 (or not)."""
    worst = 0.0
    windows = torch.tensor(plan.windows(*n))  # n: (span length, the request's own N)
    for layer, steps in calls.items():
        q_all = torch.cat([c[0] for c in steps])
        k_all, v_all = torch.cat([c[1] for c in steps]), torch.cat([c[2] for c in steps])
        ks, vs, scale = steps[0][4], steps[0][5], steps[0][6]
        k_all, v_all = (_as_fp8(k_all, ks), _as_fp8(v_all, vs)) if quantized else (k_all.double(), v_all.double())
        g = q_all.shape[1] // k_all.shape[1]
        start = 0
        for q, _, _, out, *_ in steps:
            end = start + q.shape[0]
            qp, kp = torch.arange(start, end)[:, None], torch.arange(end)[None, :]
            w = windows[layer].repeat_interleave(g)[:, None, None]  # [Hq, 1, 1]
            mask = (kp <= qp) & ((kp < plan.sink_tokens) | (qp - kp < w))
            kk = k_all[:end].repeat_interleave(g, 1)
            vv = v_all[:end].repeat_interleave(g, 1)
            scores = torch.einsum("thd,shd->hts", q.double(), kk) * scale
            ref = torch.einsum("hts,shd->thd", scores.masked_fill(~mask, float("-inf")).softmax(-1), vv)
            worst = max(worst, float((out.double() - ref).abs().max()))
            start = end
    return worst


def _served(plan_path, prompt) -> tuple:
    plan = load_plan(plan_path)
    return plan, served_length(len(prompt), MAX_TOKENS, MAX_MODEL_LEN, DEFAULT_SPAN_GRID)


@pytest.mark.parametrize("i", range(len(LENGTHS)))
@pytest.mark.parametrize("which", ["dense", "hetero"])
def test_every_layers_attention_matches_the_fp8_reference(runs, plans, prompts, which, i):
    plan, n = _served(plans[which], prompts[i])
    calls = runs[which][0][i][2]
    assert len(calls) == len(plan.rules)
    assert sum(c[0].shape[0] for c in calls[0]) == LENGTHS[i] + MAX_TOKENS - 1  # chunks + decode steps, all seen
    assert {c[4] for c in calls[3]} == {plan.fp8_scales(3, 448)[0]}  # the plan's kv_amax set the scales
    err = _attention_error(calls, plan, n)
    print(f"{which} fp8 prompt of {LENGTHS[i]}: max |attention - fp8 reference| {err:.2e}")
    assert err < ATTENTION_TOL


def test_the_attention_reference_without_quantization_fails(runs, plans, prompts):
    plan, n = _served(plans["hetero"], prompts[-1])
    assert _attention_error(runs["hetero"][0][-1][2], plan, n, quantized=False) > 100 * ATTENTION_TOL


def test_sparse_masks_cut_context(plans, prompts):
    plan, n = _served(plans["hetero"], prompts[-1])
    assert max(s for layer in plan.spans(*n) for s in layer) < LENGTHS[-1]


@pytest.mark.parametrize("i", range(len(LENGTHS)))
@pytest.mark.parametrize("which", ["dense", "hetero"])
def test_greedy_tokens_match_the_hf_reference_with_the_same_quantization(runs, reference, plans, prompts, which, i):
    plan = load_plan(plans[which])
    scales = [plan.fp8_scales(layer, torch.finfo(E4M3).max) for layer in range(len(plan.rules))]
    ref = reference.greedy(prompts[i], MAX_TOKENS, plan, MAX_MODEL_LEN, kv_quant=(E4M3, scales))
    tokens, top5, _ = runs[which][0][i]
    assert len(tokens) == MAX_TOKENS
    assert_greedy_close(tokens, top5, ref.tokens, ref.top5, f"{which} fp8, prompt of {LENGTHS[i]} tokens")


def test_an_fp8_ring_block_holds_one_byte_per_value(runs, model_dir):
    config = load_hf_config(model_dir)
    heads = config["num_key_value_heads"]
    head_dim = config["hidden_size"] // config["num_attention_heads"]
    spec = runs["dense"][1]
    assert spec.dtype == torch.uint8
    assert spec.page_size_bytes == heads * spec.block_size * 2 * head_dim  # fp32 rings: 4x this
