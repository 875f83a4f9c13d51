"""The range of a model's cached keys and values on calibration text, per layer: what an fp8 KV cache's per-layer
scales are made from (`Plan.kv_amax`, `Plan.fp8_scales`).

vLLM takes fp8 scales only from a checkpoint that carries them; without any it stores K/V at scale 1.0, where a small
model's keys use a narrow slice of float8's range (benchmarks/results/fp8_quantizer: nearest rounding at calibrated
scales kept 10/12 passkey answers of the masked model, 7/12 at scale 1). Keys are measured after RoPE, as the cache
holds them: they are read from the model's own KV cache after a forward pass, so any architecture transformers runs
is measured the same way.
"""

from __future__ import annotations

import random

import torch

from moa_vllm.planner.calibrate import docs_corpus, filler_ids

DEFAULT_TEXTS = 8
DEFAULT_TOKENS = 2048


def calibration_windows(tokenizer, texts: int, tokens: int, seed: int = 0) -> list[list[int]]:
    """`texts` windows of `tokens` ids of the planner's calibration text (Python's docs, or story sentences)."""
    rng, corpus = random.Random(seed), docs_corpus()
    return [filler_ids(tokenizer, rng, corpus, tokens)[0] for _ in range(texts)]


@torch.no_grad()
def measure_kv_amax(model, windows: list[list[int]]) -> list[tuple[float, float]]:
    """[layer] (largest |K|, largest |V|) over every token, head and dimension the windows put in the KV cache."""
    amax: list[tuple[float, float]] | None = None
    device = next(model.parameters()).device
    for ids in windows:
        cache = model(torch.tensor([ids], device=device), use_cache=True).past_key_values
        seen = [(float(k.abs().max()), float(v.abs().max())) for k, v in _layers(cache)]
        amax = seen if amax is None else [(max(a, c), max(b, d)) for (a, b), (c, d) in zip(amax, seen)]
    if amax is None:
        raise ValueError("measure_kv_amax needs at least one calibration window")
    return amax


def _layers(cache) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(keys, values) of each layer of a transformers cache (DynamicCache's layers, or the legacy tuple form)."""
    if hasattr(cache, "layers"):
        return [(layer.keys, layer.values) for layer in cache.layers]
    return [(k, v) for k, v in cache]
