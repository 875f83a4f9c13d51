"""The ``transformers`` config class vLLM needs to read a BST folder (``model_type: "bst"``).

vLLM loads ``config.json`` through ``AutoConfig``, which only knows registered model types. Besides the
:class:`~moa_vllm.bst.config.BSTConfig` fields, the config exposes what vLLM's generic code reads to size the KV
cache: the attention layers run self and context heads in one call, so ``num_key_value_heads`` is
``2 * num_attention_heads`` with the SSM; ``layer_types`` tells vLLM whether the model is hybrid (an SSM state per
request) or, for the no-SSM ablation, attention only.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from transformers import PretrainedConfig

from moa_vllm.bst.config import MODEL_TYPE, BSTConfig

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
