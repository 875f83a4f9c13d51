"""Inspection of a running moa server: what each request holds (engine side, `report.py`) and the HTTP routes and
Prometheus gauges on vLLM's own OpenAI server (`endpoint.py`, a `vllm.endpoint_plugins` entry point)."""
