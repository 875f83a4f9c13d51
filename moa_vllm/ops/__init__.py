"""MoA attention compute in plain torch: ring layout math, page formats, ring prefill, and the token-exact reference.

Imports no vLLM: the stock-kernel calls live in moa_vllm/vllm_plugin/kernels_*.py.
"""
