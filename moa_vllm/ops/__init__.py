"""Attention compute for the MoA backend, in plain torch (no vLLM import)."""

from moa_vllm.ops.sink_window_attention import paged_sink_window_attention, plan_windows

__all__ = ["paged_sink_window_attention", "plan_windows"]
