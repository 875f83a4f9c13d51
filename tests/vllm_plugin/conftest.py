"""Engine fixtures: real in-process vLLM engines (CPU wheel) on the embedded model, float32 for exactness."""

from __future__ import annotations

import gc
import os
from pathlib import Path

import pytest

# Before vLLM is imported: in-process engine core, a small KV budget, both cores for the worker.
os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")


def make_llm(model_dir: Path, plan: Path | None = None, **overrides):
    from vllm import LLM

    kwargs = dict(model=str(model_dir), max_model_len=4096, dtype="float32", enforce_eager=True, seed=0, max_num_seqs=8)
    if plan is not None:
        kwargs.update(attention_backend="moa", additional_config={"moa": {"plan": str(plan)}})
    kwargs.update(overrides)
    return LLM(**kwargs)


def close_llm(llm) -> None:
    from vllm.distributed import cleanup_dist_env_and_memory

    llm.llm_engine.engine_core.shutdown()
    del llm
    gc.collect()
    cleanup_dist_env_and_memory()


def engine_core(llm):
    """The in-process EngineCore (VLLM_ENABLE_V1_MULTIPROCESSING=0)."""
    return llm.llm_engine.engine_core.engine_core


@pytest.fixture
def contract(monkeypatch):
    """Both Triton kernels replaced by their torch references: moa_kernels' ring decode and ring prefill (the kernels
    themselves run in the interpreter tests of test_kernels_cuda.py and in tests/kernels)."""
    from moa_kernels import ring_decode_reference, ring_prefill_reference

    monkeypatch.setattr("moa_vllm.vllm_plugin.moa.kernels_cuda.ring_decode", ring_decode_reference)
    monkeypatch.setattr("moa_vllm.vllm_plugin.moa.kernels_cuda.ring_prefill", ring_prefill_reference)
