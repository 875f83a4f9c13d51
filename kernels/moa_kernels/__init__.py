"""moa_kernels: Triton kernels for MoA attention over per-KV-head rings, each with its plain torch reference.

- `ring_prefill`: prefill / chunked prefill of a batch of rows over their rings (ring_prefill.py), reference
  `ring_prefill_reference` (ring_prefill_ref.py), block sizes from `pick_blocks` (blocks.py).

Decode needs no kernel of its own: after the step's token is written a ring holds exactly the visible keys, so
stock paged kernels serve it as one-KV-head virtual sequences (moa_vllm/vllm_plugin/moa/kernels_cuda.py).
Imports no vLLM.
"""

from moa_kernels.blocks import Blocks, pick_blocks
from moa_kernels.ring_prefill import ring_prefill
from moa_kernels.ring_prefill_ref import ring_prefill_reference

__all__ = ["Blocks", "pick_blocks", "ring_prefill", "ring_prefill_reference"]
