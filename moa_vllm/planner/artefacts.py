"""The planner's work dir: artefact files, the input keys that make steps resumable, and step wall times.

A step's artefact stores the key of the inputs it was made from (settings plus digests of upstream artefacts).
A step is skipped when its artefact exists, is complete and carries the same key; otherwise it runs again.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np


def canonical(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"))


def normalised(obj: Any) -> Any:
    """obj as it reads back from JSON (tuples become lists, keys strings), so stored and fresh keys compare equal."""
    return json.loads(canonical(obj))


def digest(obj: Any) -> str:
    return hashlib.sha256(canonical(obj).encode()).hexdigest()[:16]


def plan_digest(plan) -> str:
    """What decides a plan's masks (moa_vllm.plan.io.plan_digest: one definition for planner and server)."""
    from moa_vllm.plan.io import plan_digest as digest_of

    return digest_of(plan)


def model_identity(model_dir: Path) -> dict[str, Any]:
    """What identifies a model folder's weights without hashing gigabytes: config digest, weight names and sizes."""
    config = json.loads((model_dir / "config.json").read_text())
    weights = sorted(
        (p.name, p.stat().st_size) for p in model_dir.iterdir() if p.suffix in (".safetensors", ".bin", ".pt")
    )
    return {"config": digest(config), "weights": weights}


def write_json_atomic(path: Path, data: Any) -> None:
    """Write through a temporary file, so an interrupted write never leaves a half artefact behind."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    os.replace(tmp, path)


def read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def json_matches(path: Path, key: dict[str, Any]) -> bool:
    data = read_json(path)
    return bool(data) and data.get("key") == normalised(key) and data.get("complete", True)


def save_npz_atomic(path: Path, key: dict[str, Any], **arrays: np.ndarray) -> None:
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez(tmp, key=np.array(canonical(key)), **arrays)
    os.replace(tmp, path)


def load_npz(path: Path) -> dict[str, Any] | None:
    try:
        with np.load(path) as data:
            out = {name: data[name] for name in data.files}
    except (FileNotFoundError, OSError, ValueError):
        return None
    out["key"] = json.loads(str(out["key"]))
    return out


class Timings:
    """Wall and CPU time of each step that ran, kept in the work dir's timings.json across runs. CPU time (this
    process, all threads) tells the work apart from waiting on a shared machine."""

    def __init__(self, work_dir: Path):
        self.path = work_dir / "timings.json"

    def record(self, step: str, seconds: float, cpu_seconds: float, **extra: Any) -> None:
        data = read_json(self.path) or {}
        data[step] = {
            "seconds": round(seconds, 2),
            "cpu_seconds": round(cpu_seconds, 2),
            "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        data[step].update(extra)
        write_json_atomic(self.path, data)

    @contextmanager
    def step(self, step: str, **extra: Any) -> Iterator[None]:
        start, cpu = time.perf_counter(), time.process_time()
        yield
        self.record(step, time.perf_counter() - start, time.process_time() - cpu, **extra)


def density_tag(density: float) -> str:
    """d0.50, d0.25, d0.125: two decimals unless the density needs more."""
    return f"d{density:.2f}" if round(density, 2) == density else f"d{density:.3f}"
