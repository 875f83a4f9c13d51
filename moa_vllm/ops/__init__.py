"""Attention compute for the MoA backend, in plain torch (no vLLM import)."""

from moa_vllm.ops.ring_attention import RingBatch, build_ring_batch, plan_spans, ring_attention, write_ring

__all__ = ["RingBatch", "build_ring_batch", "plan_spans", "ring_attention", "write_ring"]
