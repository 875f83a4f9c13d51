"""Accuracy harness: passkey retrieval grid and fidelity to dense, through the real vLLM engine with the moa backend.

Run `python -m benchmarks.accuracy --help`. Prompt building, scoring and the KL / top-1 math import no vLLM.
"""
