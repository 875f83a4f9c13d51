"""`moa-vllm serve BST_FOLDER`: vLLM's OpenAI server for a BST checkpoint (no plan file, no backend flag).

A BST model's attention runs on the moa backend with a window plan derived from its config (the plugin selects the
backend and builds the plan in every vLLM process), so no plan file or ``--attention-backend`` is passed. The
checkpoints of the synthetic tasks have no tokenizer: the server runs with ``--skip-tokenizer-init`` and takes
token-id prompts (``"prompt": [ids]`` on /v1/completions; ``"return_token_ids": true`` returns the generated ids).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from moa_vllm.bst.config import MODEL_TYPE


def is_bst_folder(model: str | None) -> bool:
    """True for a local folder whose config.json names the BST model type."""
    if model is None:
        return False
    config = Path(model) / "config.json"
    return config.is_file() and json.loads(config.read_text()).get("model_type") == MODEL_TYPE


def bst_server_argv(model: str, extra: list[str]) -> list[str]:
    from moa_vllm.serve import DEFAULT_HOST, SERVER_MODULE, _has_flag

    argv = [sys.executable, "-m", SERVER_MODULE, "--model", model, "--no-enable-prefix-caching"]
    defaults = {"--host": DEFAULT_HOST, "--dtype": "float32"}  # the SSM and the reference run in float32
    for flag, value in defaults.items():
        if not _has_flag(extra, flag):
            argv += [flag, value]
    if not (Path(model) / "tokenizer.json").is_file() and not _has_flag(extra, "--skip-tokenizer-init"):
        argv.append("--skip-tokenizer-init")
    return argv + extra


def serve_bst(model: str, extra: list[str]) -> None:
    """Replace this process by the vLLM OpenAI server for the BST folder ``model``."""
    from moa_vllm.serve import server_env

    argv = bst_server_argv(model, extra)
    print("moa-vllm: exec " + " ".join(argv), file=sys.stderr, flush=True)
    os.execve(argv[0], argv, server_env(extra))
