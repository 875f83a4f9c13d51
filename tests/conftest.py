"""Shared fixtures: the embedded model folder, its tokenizer and the shipped plans; a small llama config (no
weights) for tests of plan files and folders."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
PLANS = REPO / "plans" / "SmolLM2-135M-Instruct"

# config.json of a 2-layer llama (4 query heads, 2 KV heads, head dim 16): enough for plan and folder checks
SMALL_LLAMA = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "hidden_size": 64,
}


# vLLM's CPU worker replaces torch.set_num_threads process-wide with a no-op once it binds its threads, so an
# in-process engine would silently pin every later test module's thread count; each module gets the real one back.
_SET_NUM_THREADS = torch.set_num_threads


@pytest.fixture(autouse=True, scope="module")
def _real_set_num_threads():
    yield
    torch.set_num_threads = _SET_NUM_THREADS


@pytest.fixture(scope="session")
def model_dir() -> Path:
    """The embedded model, prepared on first use; MOA_VLLM_MODEL_DIR points at an existing copy instead."""
    if os.environ.get("MOA_VLLM_MODEL_DIR"):
        return Path(os.environ["MOA_VLLM_MODEL_DIR"])
    from moa_vllm.model import prepare_embedded_model

    return prepare_embedded_model(progress=False)


@pytest.fixture(scope="session")
def tokenizer(model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)


HEAVY_MARKERS = ("model", "engine", "server")
HEAVY_FIXTURES = ("model_dir", "tokenizer")  # the embedded model (prepared on first use: tens of seconds)


def pytest_collection_modifyitems(config, items):
    """Every test that needs the embedded model (directly or through a fixture) carries one of the heavy markers, so
    `-m "not engine and not server and not model"` runs no model; an unmarked one fails the run by name."""
    unmarked = [
        item.nodeid
        for item in items
        if set(HEAVY_FIXTURES) & set(getattr(item, "fixturenames", ()))
        and not any(item.get_closest_marker(m) for m in HEAVY_MARKERS)
    ]
    if unmarked:
        raise pytest.UsageError(
            "tests that use the embedded model need a marker (model, engine or server):\n  " + "\n  ".join(unmarked)
        )
