"""The S4D SSM of a BST layer as a vLLM state layer: its recurrent state lives in vLLM's per-request state cache.

vLLM gives every request one fixed-size state page per state layer (a ``MambaSpec``), allocated at admission and
freed at finish, whatever the request's length. The page holds the S4D state ``(channels, state_size)`` complex64,
stored as float32 ``(channels, state_size, 2)``: vLLM's state cache is real-typed, and float32 keeps the
recurrence as precise as the reference.

Per engine step the layer reads the batch layout from metadata built by vLLM's own Mamba metadata builder
(decode rows first, then prefill rows, each with its state slot): decode rows take one recurrence step, prefill
chunks run the FFT convolution plus the free response of their carried state (zero for a request's first chunk).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor
from vllm.config import get_current_vllm_config
from vllm.forward_context import get_forward_context
from vllm.model_executor.layers.mamba.abstract import MambaBase
from vllm.v1.attention.backend import AttentionBackend
from vllm.v1.attention.backends.mamba_attn import BaseMambaAttentionMetadata, BaseMambaAttentionMetadataBuilder
from vllm.v1.attention.backends.registry import MambaAttentionBackendEnum

from moa_vllm.bst.config import BSTConfig
from moa_vllm.bst.ssm import S4D

STATE_BACKEND_PATH = "moa_vllm.vllm_plugin.bst.state.BSTStateBackend"


@dataclass
class BSTStateMetadata(BaseMambaAttentionMetadata):
    pass


class BSTStateMetadataBuilder(BaseMambaAttentionMetadataBuilder[BSTStateMetadata]):
    metadata_cls = BSTStateMetadata
    needs_causal_conv1d_metadata = False  # no convolution kernels here


class BSTStateBackend(AttentionBackend):
    """State backend behind ``MambaAttentionBackendEnum.CUSTOM``: only a metadata builder, no attention kernel."""

    @staticmethod
    def get_name() -> str:
        return "CUSTOM"

    @staticmethod
    def get_builder_cls() -> type[BSTStateMetadataBuilder]:
        return BSTStateMetadataBuilder

    @classmethod
    def is_ssm(cls) -> bool:
        return True


class S4DStateLayer(S4D, MambaBase):
    """An :class:`~moa_vllm.bst.ssm.S4D` (same parameters, so checkpoints load as they are) whose state is a vLLM
    state page. :meth:`contextualize` is the serving forward; ``forward`` stays the zero-state FFT path."""

    def __init__(self, config: BSTConfig, prefix: str) -> None:
        S4D.__init__(
            self, config.hidden_size, config.ssm_state_size, config.ssm_init, config.ssm_dt_min, config.ssm_dt_max
        )
        self.prefix = prefix
        forward_context = get_current_vllm_config().compilation_config.static_forward_context
        if prefix in forward_context:
            raise ValueError(f"duplicate layer name: {prefix}")
        forward_context[prefix] = self  # how vLLM finds the layer to bind its state cache and build its metadata
        self.kv_cache = (torch.tensor([]),)

    # ---- MambaBase: what the state page holds ------------------------------------------------------------------

    def get_state_shape(self) -> tuple[tuple[int, ...]]:
        return (state_shape(self.channels, self.state_size),)

    def get_state_dtype(self) -> tuple[torch.dtype]:
        return (torch.float32,)

    @property
    def mamba_type(self) -> MambaAttentionBackendEnum:
        return MambaAttentionBackendEnum.CUSTOM

    def get_attn_backend(self) -> type[AttentionBackend]:
        return BSTStateBackend

    # ---- serving forward ---------------------------------------------------------------------------------------

    def contextualize(self, h: Tensor) -> Tensor:
        """SSM outputs ``(num_tokens, channels)`` for the flattened batch ``h``, updating every request's state."""
        attn_metadata = get_forward_context().attn_metadata
        meta = attn_metadata.get(self.prefix) if isinstance(attn_metadata, dict) else None
        if meta is None:  # memory profiling run: no requests, no state
            return self.forward(h[None])[0]
        assert isinstance(meta, BSTStateMetadata)
        states = torch.view_as_complex(self.kv_cache[0])  # (slots, channels, state_size), a view of the pages
        out = torch.zeros_like(h)
        decoded = meta.num_decode_tokens
        if meta.num_decodes > 0:
            assert meta.state_indices_tensor_d is not None
            slots = meta.state_indices_tensor_d[:, 0].long()
            out[:decoded], states[slots] = self.step(h[:decoded], states[slots])
        if meta.num_prefills > 0:
            assert meta.state_indices_tensor_p is not None and meta.query_start_loc_p is not None
            assert meta.has_initial_states_p is not None
            bounds = (meta.query_start_loc_p + decoded).tolist()
            for i, (slot, carried) in enumerate(
                zip(meta.state_indices_tensor_p.tolist(), meta.has_initial_states_p.tolist())
            ):
                a, b = bounds[i], bounds[i + 1]
                before = states[slot][None] if carried else self.initial_state(1, h.dtype, h.device)
                y, after = self.forward_chunk(h[None, a:b], before)
                out[a:b], states[slot] = y[0], after[0]
        return out


def state_shape(channels: int, state_size: int) -> tuple[int, int, int]:
    """Shape of one request's S4D state page in float32: complex numbers as (real, imaginary) pairs."""
    return (channels, state_size, 2)
