"""Benchmark harnesses of moa-vllm (importable as a package from the repository root)."""
