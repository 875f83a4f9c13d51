"""One vLLM engine per plan (moa backend), all prompts of the plan in one generate call."""

from __future__ import annotations

import gc
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from benchmarks.accuracy.fidelity import TopK, topk_from_prompt_logprobs


@dataclass(frozen=True)
class EngineSettings:
    model_dir: Path
    max_model_len: int = 8192
    max_num_batched_tokens: int = 2048  # prompt logprobs hold [tokens, vocab] float32: 2048 x 49152 = 400 MB
    max_num_seqs: int = 8
    kv_cache_gib: int = 3
    topk: int = 20
    kv_cache_dtype: str = "auto"  # fp8 / fp8_e4m3 / fp8_e5m2: quantized rings (stock: vLLM's fp8 cache)


@dataclass(frozen=True)
class PlanRun:
    answers: list[str]
    topks: list[TopK]
    engine_start_s: float
    generate_s: float


def configure_environment(settings: EngineSettings) -> None:
    """Before vLLM is imported: in-process engine core, a bounded KV budget, the worker on every core."""
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(settings.kv_cache_gib))
    os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")


def run_plan(
    settings: EngineSettings,
    plan: Path | None,
    passkey_prompts: list[list[int]],
    answer_tokens: int | Sequence[int],
    fidelity_prompts: list[list[int]],
) -> PlanRun:
    """Greedy answers to the passkey prompts (`answer_tokens` for all, or one budget per prompt) and top-k prompt
    logprobs of the fidelity texts under one plan (None: stock vLLM, its own attention backend)."""
    configure_environment(settings)
    from vllm import LLM, SamplingParams
    from vllm.distributed import cleanup_dist_env_and_memory

    moa = {} if plan is None else {"attention_backend": "moa", "additional_config": {"moa": {"plan": str(plan)}}}
    start = time.perf_counter()
    llm = LLM(
        model=str(settings.model_dir),
        max_model_len=settings.max_model_len,
        max_num_batched_tokens=settings.max_num_batched_tokens,
        max_num_seqs=settings.max_num_seqs,
        max_logprobs=settings.topk,
        dtype="float32",  # this 135M model answers well only in float32 on the CPU wheel
        enforce_eager=True,
        seed=0,
        kv_cache_dtype=settings.kv_cache_dtype,
        **moa,
    )
    engine_start_s = time.perf_counter() - start
    budgets = [answer_tokens] * len(passkey_prompts) if isinstance(answer_tokens, int) else list(answer_tokens)
    if len(budgets) != len(passkey_prompts):
        raise ValueError(f"{len(budgets)} answer budgets for {len(passkey_prompts)} prompts")
    # max_tokens=1 sets N = prompt + 1 for the spans; only the prompt logprobs are used.
    score = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=settings.topk)
    prompts = [{"prompt_token_ids": p} for p in passkey_prompts + fidelity_prompts]
    params = [SamplingParams(max_tokens=b, temperature=0.0) for b in budgets] + [score] * len(fidelity_prompts)
    start = time.perf_counter()
    outputs = llm.generate(prompts, params, use_tqdm=False)
    generate_s = time.perf_counter() - start
    answers = [o.outputs[0].text for o in outputs[: len(passkey_prompts)]]
    topks = [
        topk_from_prompt_logprobs(o.prompt_logprobs, ids, settings.topk)
        for o, ids in zip(outputs[len(passkey_prompts) :], fidelity_prompts)
    ]
    llm.llm_engine.engine_core.shutdown()
    del llm
    gc.collect()
    cleanup_dist_env_and_memory()
    return PlanRun(answers, topks, round(engine_start_s, 2), round(generate_s, 2))
