"""moa_kernels: Triton kernels for MoA attention over per-KV-head rings, each with its plain torch reference.

- `ring_prefill`: prefill / chunked prefill of a batch of rows over their rings (ring_prefill.py), reference
  `ring_prefill_reference` (ring_prefill_ref.py), block sizes from `pick_blocks` (blocks.py).
- `ring_decode`: one decode token per row over its rings, split-KV optional (ring_decode.py), reference
  `ring_decode_reference` (ring_decode_ref.py).

Both look each ring page up in vLLM's block table themselves (flat = base + j * stride, moa_vllm/ops/ring_layout.py
`RingPages`), so no per-ring page table is kept or derived for them. Imports no vLLM.
"""

from moa_kernels.blocks import Blocks, pick_blocks
from moa_kernels.ring_decode import ring_decode, split_scratch
from moa_kernels.ring_decode_ref import ring_decode_reference
from moa_kernels.ring_prefill import ring_prefill
from moa_kernels.ring_prefill_ref import ring_prefill_reference

__all__ = [
    "Blocks",
    "pick_blocks",
    "ring_decode",
    "ring_decode_reference",
    "ring_prefill",
    "ring_prefill_reference",
    "split_scratch",
]
