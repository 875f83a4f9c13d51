"""Configuration of the Block-State Transformer LM.

Field names follow Hugging Face conventions (``hidden_size``, ``num_attention_heads``, ``sliding_window``, ...) so
the saved ``config.json`` reads naturally to tools that expect an HF-style folder, without depending on
``transformers``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Literal

ContextMode = Literal["sh", "mh"]

MODEL_TYPE = "bst"
ARCHITECTURE = "BSTForCausalLM"

# Keys an HF-style config.json carries that are metadata, not model hyperparameters.
_METADATA_KEYS = frozenset({"architectures", "model_type", "torch_dtype", "tie_word_embeddings"})


@dataclass(frozen=True)
class BSTConfig:
    """Hyperparameters of :class:`~moa_vllm.bst.model.BSTForCausalLM`.

    ``sliding_window`` (W) bounds both attentions: each token attends to the last W tokens and to the last W
    context states, its own position included. ``use_ssm=False`` is the ablation without SSM context states
    (windowed self-attention only). ``context_mode`` picks how SSM outputs become cross-attention keys/values:
    ``"sh"`` projects the whole SSM output to every head, ``"mh"`` gives each head its own group of
    ``head_dim`` SSM channels.
    """

    vocab_size: int = 256
    hidden_size: int = 64
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    sliding_window: int = 32
    intermediate_size: int | None = None  # None: 4 * hidden_size
    use_ssm: bool = True
    context_mode: ContextMode = "sh"
    ssm_state_size: int = 16
    ssm_init: Literal["lin", "inv", "real"] = "lin"
    ssm_dt_min: float = 1e-3
    ssm_dt_max: float = 1e-1
    # A token-wise input gate u = h * relu(W h + b) before the SSM: tokens whose gate training shut write exactly
    # nothing into the state, so a long run of irrelevant tokens leaves it as it was (recall past the trained length).
    ssm_input_gate: bool = False
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-6
    initializer_range: float = 0.02
    # Informational for serving stacks; the model itself has no position limit (RoPE + SSM).
    max_position_embeddings: int = 65536

    def __post_init__(self) -> None:
        for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "sliding_window"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be positive")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError("hidden_size must be divisible by num_attention_heads")
        if self.head_dim % 2:
            raise ValueError("head_dim must be even (rotary embeddings rotate pairs)")
        if self.context_mode not in ("sh", "mh"):
            raise ValueError(f"context_mode must be 'sh' or 'mh', got {self.context_mode!r}")
        if self.ssm_init not in ("lin", "inv", "real"):
            raise ValueError(f"ssm_init must be 'lin', 'inv' or 'real', got {self.ssm_init!r}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def mlp_size(self) -> int:
        return self.intermediate_size or 4 * self.hidden_size

    @property
    def attention_heads_total(self) -> int:
        """Heads in the joint attention call: the self-attention heads, plus as many context heads with the SSM."""
        return self.num_attention_heads * (2 if self.use_ssm else 1)

    def to_dict(self) -> dict[str, Any]:
        """HF-style dict: hyperparameters plus ``architectures`` and ``model_type``."""
        meta = {"architectures": [ARCHITECTURE], "model_type": MODEL_TYPE, "tie_word_embeddings": False}
        return {**meta, **dataclasses.asdict(self)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> BSTConfig:
        """Inverse of :meth:`to_dict`; HF metadata keys are skipped, any other unknown key is an error."""
        if data.get("model_type", MODEL_TYPE) != MODEL_TYPE:
            raise ValueError(f"model_type {data['model_type']!r} is not {MODEL_TYPE!r}")
        if data.get("tie_word_embeddings", False):
            raise ValueError("tied input/output embeddings are not supported")
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - fields - _METADATA_KEYS
        if unknown:
            raise ValueError(f"unknown BSTConfig keys: {sorted(unknown)}")
        return cls(**{k: v for k, v in data.items() if k in fields})
