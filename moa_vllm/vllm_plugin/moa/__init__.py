"""The MoA attention backend: per-KV-head ring KV cache (spec + manager), ring metadata, CPU / CUDA ring kernels."""
