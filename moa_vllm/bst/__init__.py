"""Block-State Transformer (Fathi et al., 2023) model core in pure PyTorch: S4D SSM, BST layer, small causal LM.

No vLLM here: this is the reference the serving integration is checked against.
"""

from moa_vllm.bst.config import BSTConfig
from moa_vllm.bst.layer import BSTLayer, BSTLayerState
from moa_vllm.bst.model import BSTForCausalLM, BSTState
from moa_vllm.bst.ssm import S4D

__all__ = ["S4D", "BSTConfig", "BSTForCausalLM", "BSTLayer", "BSTLayerState", "BSTState"]
