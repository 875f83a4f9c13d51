"""The only package that touches vLLM internals: backend registration, KV spec/manager, and the patches."""

from __future__ import annotations

_registered = False


def register() -> None:
    """Entry point run by vLLM in every process (API server, engine core, workers); idempotent."""
    global _registered
    if _registered:
        return
    from moa_vllm.vllm_plugin.compat import check_vllm_version

    check_vllm_version()

    from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend
    from vllm.v1.kv_cache_spec_registry import KVCacheSpecRegistry

    from moa_vllm.vllm_plugin.bst.plugin import register_bst
    from moa_vllm.vllm_plugin.moa.kv_spec import MoARingManager, MoARingSpec
    from moa_vllm.vllm_plugin.patches import BACKEND_PATH, apply_all

    register_backend(AttentionBackendEnum.CUSTOM, BACKEND_PATH)
    KVCacheSpecRegistry._ensure_registered()  # built-ins first, or registering ours would skip them
    KVCacheSpecRegistry.register(MoARingSpec, MoARingManager, uniform_type_base_spec=MoARingSpec)
    apply_all()
    register_bst()
    _registered = True
