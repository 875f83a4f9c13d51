"""`moa-vllm serve` as a subprocess on a free loopback port: start, wait for /health, stop; vLLM's KV usage gauge
and the server's resident memory. Shared by the server tests and the benchmarks' serving harnesses; SERVER_ENV is
the small CPU KV budget both run with. Linux only (process trees from /proc)."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

SERVER_ENV = {"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_NUM_OF_RESERVED_CPU": "0"}
STARTUP_TIMEOUT_S = 300


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def moa_vllm(*args: str, env: dict[str, str] | None = None, **kwargs) -> subprocess.Popen:
    """`python -m moa_vllm.cli ARGS` with the test KV budget (plus `env`); kwargs go to Popen."""
    cmd = [sys.executable, "-m", "moa_vllm.cli", *args]
    return subprocess.Popen(cmd, env={**os.environ, **SERVER_ENV, **(env or {})}, **kwargs)


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


@contextmanager
def serving(args: list[str], log_path: Path, env: dict[str, str] | None = None) -> Iterator[int]:
    """`moa-vllm ARGS --port P` on a free loopback port (extra environment `env`), output to ``log_path``; yields P
    once /health answers and stops the server on exit. A server that dies or never gets ready fails the test with
    the log's tail."""
    port = free_port()
    with open(log_path, "w") as log:
        proc = moa_vllm(*args, "--port", str(port), env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        try:
            wait_ready(proc, port)
        except (RuntimeError, TimeoutError) as e:
            raise AssertionError(Path(log_path).read_text(errors="replace")[-3000:]) from e
        yield port
    finally:
        stop(proc)


_USAGE = re.compile(r"^vllm:kv_cache_usage_perc\{[^}]*\} ([\d.eE+-]+)$", re.M)


def kv_usage(port: int) -> float | None:
    """vLLM's KV cache usage gauge (fraction of the block pool in use) from /metrics; None if unreadable."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
            text = r.read().decode()
    except OSError:
        return None
    values = [float(v) for v in _USAGE.findall(text)]
    return max(values) if values else None


def wait_kv_idle(port: int, timeout_s: float = 60) -> float | None:
    """KV usage once the server has drained: it must come back to 0 (every block back in the pool)."""
    deadline = time.monotonic() + timeout_s
    value = kv_usage(port)
    while value != 0.0 and time.monotonic() < deadline:
        time.sleep(0.5)
        value = kv_usage(port)
    return value


def process_tree(pid: int) -> list[int]:
    """pid and all its descendants (Linux /proc)."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        for task in os.listdir(f"/proc/{p}/task") if os.path.isdir(f"/proc/{p}/task") else []:
            try:
                with open(f"/proc/{p}/task/{task}/children") as f:
                    todo += [int(c) for c in f.read().split()]
            except OSError:
                pass
    return out


def tree_rss_bytes(pid: int) -> int:
    """Resident memory of a server and its engine / worker processes."""
    total = 0
    for p in process_tree(pid):
        try:
            with open(f"/proc/{p}/status") as f:
                total += next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))
        except (OSError, StopIteration):
            pass
    return total
