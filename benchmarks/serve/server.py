"""One configuration's OpenAI server: started on loopback with a pinned KV budget, its own capacity read from its
log, vLLM's KV usage gauge sampled while it works, stopped cleanly."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path

from moa_vllm.server_process import free_port, kv_usage, stop, wait_ready

SERVED_NAME = "bench"
_CAPACITY = re.compile(
    r"KV cache size: ([\d,]+) tokens, Maximum concurrency for ([\d,]+) tokens per request: ([\d.]+)x"
)


@dataclass(frozen=True)
class Config:
    name: str
    plan: str | None  # None: stock vLLM with its own attention backend
    prefix_caching: bool = False  # the serving grid measures without it; benchmarks/prefix_cache.py with it
    kv_cache_dtype: str = "auto"  # fp8 / fp8_e4m3 / fp8_e5m2: one byte per cached value
    moa_settings: tuple[tuple[str, int], ...] = ()  # additional_config.moa beside the plan (span_length, span_grid)
    span_hint: int | None = None  # the client's moa_span_length on every request (benchmarks/prefix_cache.py chat)


def server_cmd(model: str, config: Config, port: int, kv_bytes: int, max_model_len: int, dtype: str) -> list[str]:
    common = [
        "--port", str(port), "--host", "127.0.0.1", "--dtype", dtype, "--max-model-len", str(max_model_len),
        "--served-model-name", SERVED_NAME, "--kv-cache-memory-bytes", str(kv_bytes),
        "--enable-prefix-caching" if config.prefix_caching else "--no-enable-prefix-caching",
        "--kv-cache-dtype", config.kv_cache_dtype,
    ]  # fmt: skip
    if config.plan is None:
        return [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model, *common]
    if config.moa_settings:
        common += ["--additional-config", json.dumps({"moa": dict(config.moa_settings)})]
    return [sys.executable, "-m", "moa_vllm.cli", "serve", model, "--plan", config.plan, *common]


def server_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "VLLM_CPU_KVCACHE_SPACE"}  # the flag pins the budget
    env.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")
    return env


@dataclass
class Server:
    proc: subprocess.Popen
    port: int
    log: Path

    def capacity(self) -> dict:
        """vLLM's own figures from its startup log: KV cache tokens and max concurrency at max_model_len."""
        match = _CAPACITY.search(self.log.read_text(errors="replace"))
        if match is None:
            return {}
        return {
            "kv_cache_tokens": int(match.group(1).replace(",", "")),
            "reported_max_concurrency": float(match.group(3)),
            "at_tokens_per_request": int(match.group(2).replace(",", "")),
        }


def start(model: str, config: Config, kv_bytes: int, max_model_len: int, dtype: str, log: Path) -> Server:
    port = free_port()
    cmd = server_cmd(model, config, port, kv_bytes, max_model_len, dtype)
    proc = subprocess.Popen(cmd, env=server_env(), stdout=open(log, "w"), stderr=subprocess.STDOUT)
    try:
        wait_ready(proc, port, timeout_s=900)
    except BaseException:
        stop(proc)
        raise
    return Server(proc, port, log)


@dataclass
class UsageSampler:
    """Polls the KV usage gauge in a thread while a run goes on: its peak and the samples."""

    port: int
    period_s: float = 1.0
    samples: list[float] = field(default_factory=list)

    def __enter__(self) -> UsageSampler:
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()
        return self

    def _poll(self) -> None:
        while not self._stop.is_set():
            value = kv_usage(self.port)
            if value is not None:
                self.samples.append(value)
            self._stop.wait(self.period_s)

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    @property
    def peak(self) -> float | None:
        return max(self.samples) if self.samples else None
