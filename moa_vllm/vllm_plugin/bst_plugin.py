"""Registration of the BST model with vLLM: config class, SSM state backend, model architecture."""

from __future__ import annotations

from moa_vllm.bst.config import ARCHITECTURE, MODEL_TYPE

MODEL_PATH = "moa_vllm.vllm_plugin.bst_model:BSTForCausalLM"


def register_bst() -> None:
    """Make ``vllm.LLM(bst_folder)`` work; idempotent, run by the general plugin in every vLLM process."""
    from transformers import AutoConfig
    from vllm import ModelRegistry
    from vllm.v1.attention.backends.registry import MambaAttentionBackendEnum, register_backend

    from moa_vllm.vllm_plugin.bst_config import BSTHFConfig
    from moa_vllm.vllm_plugin.bst_state import STATE_BACKEND_PATH

    AutoConfig.register(MODEL_TYPE, BSTHFConfig, exist_ok=True)
    register_backend(MambaAttentionBackendEnum.CUSTOM, STATE_BACKEND_PATH, is_mamba=True)
    if ARCHITECTURE not in ModelRegistry.get_supported_archs():
        ModelRegistry.register_model(ARCHITECTURE, MODEL_PATH)
