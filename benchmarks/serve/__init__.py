"""Throughput harness against the real OpenAI server, driven by vLLM's own `bench serve` client.

`python -m benchmarks.serve --help`. One server per configuration (stock vLLM dense, then each plan) at one
pinned KV budget, loopback only; a grid of input/output lengths and a concurrency sweep up to each
configuration's own maximum; JSON per run, a summary table and plots. Pieces: server.py (start/stop, vLLM's
reported capacity, KV usage sampling), client.py (vLLM's bench serve from Python), capacity.py (bytes per
request and the sweep), report.py (table + plots), harness.py (the grid, resumable, with progress).
"""
