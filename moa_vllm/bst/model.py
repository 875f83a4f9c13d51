"""A small causal LM built from BST layers, with a reference greedy decoder and HF-style save/load.

The folder format is what Hugging Face tools expect to find (``config.json`` with ``architectures`` and
``model_type``, weights in ``model.safetensors``) without depending on ``transformers``.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import Tensor, nn

from moa_vllm.bst.config import BSTConfig
from moa_vllm.bst.layer import BSTLayer, BSTLayerState, PerHeadContextKV

__all__ = ["BSTConfig", "BSTForCausalLM", "BSTState"]

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"

BSTState = list[BSTLayerState]


class BSTForCausalLM(nn.Module):
    """Token embedding, ``num_hidden_layers`` BST layers, final RMSNorm, untied LM head.

    Positions enter only through RoPE inside the windowed attentions and through the SSM, so there is no length
    limit and no absolute position table.
    """

    def __init__(self, config: BSTConfig) -> None:
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(BSTLayer(config) for _ in range(config.num_hidden_layers))
        self.norm = nn.RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.apply(self._init_weights)

    def _init_weights(self, module: nn.Module) -> None:
        """GPT-style N(0, initializer_range) for projections and embeddings; SSM parameters keep the S4D init."""
        std = self.config.initializer_range
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=std)
        elif isinstance(module, PerHeadContextKV):
            nn.init.normal_(module.weight, std=std)

    @property
    def dtype(self) -> torch.dtype:
        return self.embed_tokens.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.embed_tokens.weight.device

    # ---- parallel and incremental forward ---------------------------------------------------------------------

    def forward(self, input_ids: Tensor) -> Tensor:
        """Logits ``(batch, L, vocab)`` for ``input_ids`` ``(batch, L)``, all positions in parallel."""
        x = self.embed_tokens(input_ids)
        for layer in self.layers:
            x = layer(x)
        return self.lm_head(self.norm(x))

    def initial_state(self, batch: int) -> BSTState:
        """Per-layer decode state before the first token, in the model's dtype and device."""
        return [layer.initial_state(batch, self.dtype, self.device) for layer in self.layers]

    def forward_chunk(self, input_ids: Tensor, state: BSTState) -> tuple[Tensor, BSTState]:
        """Logits for the next chunk ``(batch, T)`` after ``state``, and the state after it (T = 1 is decode)."""
        if len(state) != len(self.layers):
            raise ValueError(f"state has {len(state)} layers, model has {len(self.layers)}")
        x = self.embed_tokens(input_ids)
        new_state: BSTState = []
        for layer, layer_state in zip(self.layers, state):
            x, layer_state = layer.forward_chunk(x, layer_state)
            new_state.append(layer_state)
        return self.lm_head(self.norm(x)), new_state

    @torch.no_grad()
    def generate_greedy(self, prompt_ids: Tensor, max_new_tokens: int) -> Tensor:
        """Reference greedy decode: one chunked prefill of the prompt, then one token per step from the carried state.

        ``prompt_ids``: ``(batch, P)`` or ``(P,)``, P >= 1. Returns prompt and new tokens, ``(batch, P + new)`` (or
        1-D for a 1-D prompt), like ``transformers``' ``generate``. No stop tokens: this is a correctness reference.
        """
        squeeze = prompt_ids.dim() == 1
        ids = prompt_ids[None] if squeeze else prompt_ids
        if ids.shape[1] < 1:
            raise ValueError("the prompt must hold at least one token")
        logits, state = self.forward_chunk(ids, self.initial_state(ids.shape[0]))
        out = [ids]
        for i in range(max_new_tokens):
            token = logits[:, -1].argmax(-1, keepdim=True)
            out.append(token)
            if i + 1 < max_new_tokens:
                logits, state = self.forward_chunk(token, state)
        result = torch.cat(out, dim=1)
        return result[0] if squeeze else result

    # ---- HF-style folder --------------------------------------------------------------------------------------

    def save_pretrained(self, path: str | Path) -> Path:
        """Write ``config.json`` and ``model.safetensors`` into ``path`` (created if needed)."""
        from safetensors.torch import save_file

        folder = Path(path)
        folder.mkdir(parents=True, exist_ok=True)
        config = {**self.config.to_dict(), "torch_dtype": str(self.dtype).removeprefix("torch.")}
        (folder / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
        tensors = {name: t.detach().contiguous().cpu() for name, t in self.state_dict().items()}
        save_file(tensors, str(folder / WEIGHTS_NAME), metadata={"format": "pt"})
        return folder

    @classmethod
    def from_pretrained(
        cls, path: str | Path, dtype: torch.dtype | None = None, device: torch.device | str = "cpu"
    ) -> BSTForCausalLM:
        """Load a folder written by :meth:`save_pretrained`; weights keep their stored dtype unless ``dtype`` is set."""
        from safetensors.torch import load_file

        folder = Path(path)
        config = BSTConfig.from_dict(json.loads((folder / CONFIG_NAME).read_text()))
        # Build on the meta device: random init would be thrown away, and assign=True adopts the stored tensors
        # (and their dtype) as they are.
        with torch.device("meta"):
            model = cls(config)
        model.load_state_dict(load_file(str(folder / WEIGHTS_NAME), device=str(device)), strict=True, assign=True)
        if dtype is not None:
            model.to(dtype)
        return model.eval()
