"""The embedded model conversion: content, idempotence, repair, and that the result really is the chat model."""

from __future__ import annotations

import json

import pytest
import torch

from moa_vllm.model import is_prepared, prepare_embedded_model
from moa_vllm.model.embedded import MARKER

pytestmark = pytest.mark.model


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    return prepare_embedded_model(tmp_path_factory.mktemp("cache") / "smol", progress=False)


def test_folder_is_a_standard_llama_checkpoint(prepared):
    config = json.loads((prepared / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert (config["num_hidden_layers"], config["num_attention_heads"], config["num_key_value_heads"]) == (30, 9, 3)
    assert config["hidden_size"] // config["num_attention_heads"] == 64
    assert "quantization_config" not in config
    assert (prepared / "model.safetensors").is_file()
    assert "im_start" in (prepared / "chat_template.jinja").read_text()


def test_second_prepare_reuses_the_folder(prepared):
    mtimes = {p.name: p.stat().st_mtime_ns for p in prepared.iterdir()}
    assert prepare_embedded_model(prepared, progress=False) == prepared
    assert {p.name: p.stat().st_mtime_ns for p in prepared.iterdir()} == mtimes


def test_corrupted_file_is_rebuilt(prepared):
    (prepared / "config.json").write_text("{}")
    assert not is_prepared(prepared)
    prepare_embedded_model(prepared, progress=False)
    assert is_prepared(prepared)
    assert json.loads((prepared / "config.json").read_text())["num_hidden_layers"] == 30
    assert json.loads((prepared / MARKER).read_text())["files"]["config.json"]["size"] > 2


def test_greedy_chat_answer(prepared):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(prepared)
    model = AutoModelForCausalLM.from_pretrained(prepared, dtype=torch.float32)
    ids = tok.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )["input_ids"]
    out = model.generate(ids, max_new_tokens=10, do_sample=False)
    assert tok.decode(out[0, ids.shape[1] :]).startswith("The capital of France is Paris")
