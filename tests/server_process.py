"""`moa-vllm serve` as a subprocess for tests: a free loopback port, start, wait for /health, stop."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request

SERVER_ENV = {"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_NUM_OF_RESERVED_CPU": "0"}
STARTUP_TIMEOUT_S = 300


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def moa_vllm(*args: str, **kwargs) -> subprocess.Popen:
    """`python -m moa_vllm.cli ARGS` with the test KV budget; kwargs go to Popen."""
    cmd = [sys.executable, "-m", "moa_vllm.cli", *args]
    return subprocess.Popen(cmd, env={**os.environ, **SERVER_ENV}, **kwargs)


def wait_ready(proc: subprocess.Popen, port: int, timeout_s: float = STARTUP_TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode} before becoming ready")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(1)
    raise TimeoutError(f"server not ready after {timeout_s} s")


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
