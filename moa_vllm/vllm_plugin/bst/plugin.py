"""Registration of the BST model with vLLM: config class, SSM state backend, model architecture."""

from __future__ import annotations

from moa_vllm.bst.config import ARCHITECTURE, MODEL_TYPE

MODEL_PATH = "moa_vllm.vllm_plugin.bst.model:BSTForCausalLM"


def register_bst() -> None:
    """Make ``vllm.LLM(bst_folder)`` work; idempotent, run by the general plugin in every vLLM process."""
    from transformers import AutoConfig
    from vllm import ModelRegistry
    from vllm.v1.attention.backends.registry import MambaAttentionBackendEnum, register_backend

    from moa_vllm.vllm_plugin.bst.config import BSTHFConfig, bst_fingerprint, bst_window_plan, is_bst_config
    from moa_vllm.vllm_plugin.bst.state import STATE_BACKEND_PATH
    from moa_vllm.vllm_plugin.settings import DerivedPlanFamily, register_derived_plan

    # Its windowed attention runs on the moa backend with the trained window as the plan (no plan file).
    register_derived_plan(DerivedPlanFamily("bst", is_bst_config, bst_fingerprint, bst_window_plan))

    AutoConfig.register(MODEL_TYPE, BSTHFConfig, exist_ok=True)
    register_backend(MambaAttentionBackendEnum.CUSTOM, STATE_BACKEND_PATH, is_mamba=True)
    if ARCHITECTURE not in ModelRegistry.get_supported_archs():
        ModelRegistry.register_model(ARCHITECTURE, MODEL_PATH)
