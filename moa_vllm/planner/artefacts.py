"""The planner's work dir: artefact files, the input keys that make steps resumable, and step wall times.

A step's artefact stores the key of the inputs it was made from (settings plus digests of upstream artefacts).
A step is skipped when its artefact exists, is complete and carries the same key; otherwise it runs again.

Work dir layout (each file written by one step of moa_vllm/planner/steps/):
    calibration.json            samples (prompt and dense greedy answer ids), checkpointed per sample
    profile-L{length}.npz       mean block sums and per-offset sums of |E| per (layer, KV head), checkpointed per sample
    retrieval-L{length}.npz     per-offset retrieval mass per (layer, KV head) on the same samples
    optimize-d{density}.json    the Pareto set of one density target (influence loss only)
    optimize-d{density}-r{w}.json   the same with w x the retrieval loss added (one per retrieval weight)
    truth-d{density}[-r{w}].json    held-out true loss of those Pareto plans (dense and uniform in the first)
    truth-d{density}-hybrid.json    held-out true loss of the hybrid candidates
    fidelity-d{density}.json    held-out top-1 / KL to dense of every candidate and uniform
    validate-d{density}.json    the chosen plan over all of them; plan-d{density}.json and report-d{density}/ beside it
    diagnose.json / .png        predicted vs true loss change of probe heads (`moa-plan diagnose`)
    timings.json                wall time of every step that ran
The profile does not depend on the density, so several densities share one calibration and profile.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm


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


@dataclass(frozen=True)
class WorkDir:
    """Where one run's artefacts live, its step timings, and whether steps show progress bars."""

    root: Path
    progress: bool = True

    def __post_init__(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)

    def path(self, name: str) -> Path:
        return self.root / name

    @property
    def timings(self) -> Timings:
        return Timings(self.root)

    def bar(self, total: int, desc: str, initial: int = 0) -> tqdm:
        return tqdm(total=total, initial=initial, desc=desc, disable=not self.progress, unit="sample")


def density_tag(density: float) -> str:
    """d0.50, d0.25, d0.125: two decimals unless the density needs more."""
    return f"d{density:.2f}" if round(density, 2) == density else f"d{density:.3f}"
