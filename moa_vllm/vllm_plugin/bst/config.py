"""The ``transformers`` config class vLLM needs to read a BST folder (``model_type: "bst"``).

vLLM loads ``config.json`` through ``AutoConfig``, which only knows registered model types. Besides the
:class:`~moa_vllm.bst.config.BSTConfig` fields, the config exposes what vLLM's generic code reads to size the KV
cache: the attention layers run self and context heads in one call, so ``num_key_value_heads`` is
``2 * num_attention_heads`` with the SSM; ``layer_types`` tells vLLM whether the model is hybrid (an SSM state per
request) or, for the no-SSM ablation, attention only. The same head count is what the moa backend's window plan
(:func:`bst_window_plan`, derived here, no plan file) and its fingerprint check see.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from transformers import PretrainedConfig

from moa_vllm.bst.config import ARCHITECTURE, MODEL_TYPE, BSTConfig
from moa_vllm.plan import ModelFingerprint, Plan, window_plan

_FIELDS = {f.name for f in dataclasses.fields(BSTConfig)}


class BSTHFConfig(PretrainedConfig):
    model_type = MODEL_TYPE

    def __init__(self, **kwargs: Any) -> None:
        own = {k: kwargs.pop(k) for k in list(kwargs) if k in _FIELDS}
        bst = BSTConfig(**own)
        for name, value in dataclasses.asdict(bst).items():
            setattr(self, name, value)
        self.num_key_value_heads = bst.attention_heads_total
        self.head_dim = bst.head_dim
        # Spellings transformers accepts. vLLM reads an all-"full_attention" list as "not hybrid, no state pages"; the
        # window itself is set on every attention layer, not taken from here.
        self.layer_types = ["hybrid_sliding" if bst.use_ssm else "full_attention"] * bst.num_hidden_layers
        for derived in ("num_key_value_heads", "head_dim", "layer_types"):
            kwargs.pop(derived, None)  # recomputed above; a saved copy of this config carries them
        kwargs.setdefault("tie_word_embeddings", False)
        super().__init__(**kwargs)


def bst_config(hf_config: PretrainedConfig) -> BSTConfig:
    """The model hyperparameters carried by vLLM's ``hf_config``."""
    return BSTConfig(**{name: getattr(hf_config, name) for name in _FIELDS if hasattr(hf_config, name)})


def is_bst_config(hf_config: Any) -> bool:
    """True for vLLM's ``hf_config`` of a BST folder (an object, or its ``to_dict()``)."""
    model_type = hf_config.get("model_type") if isinstance(hf_config, dict) else getattr(hf_config, "model_type", None)
    return model_type == MODEL_TYPE


def bst_fingerprint(hf_config: Any) -> ModelFingerprint:
    """The heads the attention layers really run: self and context heads share one call, so query and KV heads are
    both ``attention_heads_total`` (``num_attention_heads`` counts only the self-attention heads)."""
    bst = bst_config(_as_hf_config(hf_config))
    return ModelFingerprint(
        architecture=ARCHITECTURE,
        num_layers=bst.num_hidden_layers,
        num_query_heads=bst.attention_heads_total,
        num_kv_heads=bst.attention_heads_total,
        head_dim=bst.head_dim,
    )


def bst_window_plan(hf_config: Any) -> Plan:
    """The moa plan the BST is served with: every (layer, KV head) keeps exactly the trained window W, no sinks."""
    window = bst_config(_as_hf_config(hf_config)).sliding_window
    return window_plan(bst_fingerprint(hf_config), window, notes="derived from the BST config (sliding_window)")


def _as_hf_config(hf_config: Any) -> PretrainedConfig:
    return hf_config if isinstance(hf_config, PretrainedConfig) else BSTHFConfig(**hf_config)
