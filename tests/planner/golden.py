"""What a `moa-plan run` leaves in its work dir, reduced to digests that must not change when the code is reorganised.

JSON artefacts (plans, keys, Pareto sets, true losses, reports) are digested as bytes; .npz archives by their arrays
(their zip entries carry write times); a plan's `metadata.created` is blanked (the time it was written);
timings.json and images are left out (wall times, renderer versions).

Float kernels differ across CPUs (PyTorch picks its kernels by the host's instruction set), so the digests are
recorded per host signature: a run must equal one recorded set; a host whose own set is recorded must equal that one;
a host with none cannot be judged (the test skips and says how to record it).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

from tests.planner.tiny_llama import save_tiny_llama

FIXTURE = Path(__file__).parent / "fixtures" / "tiny_run.json"

# The recorded run: the tiny random llama of tiny_llama.py (seed 0), two densities, every candidate kind.
RUN_ARGS = [
    "--lengths", "192 256", "--validation-length", "224", "--extension-lengths", "512",
    "--samples-per-length", "2", "--max-new-tokens", "6", "--sinks", "8", "--min-span", "16",
    "--alphas", "-32 0 64", "--num-betas", "5", "--time-limit", "20", "--epsilon-points", "3", "--no-progress",
    "--validation-samples", "2", "--keep-wrong-answers", "--fidelity-texts", "1", "--fidelity-length", "224",
    "--retrieval-weights", "1", "--hybrid-heads", "1 2", "--density", "0.5 0.25", "--no-ship-gate", "--seed", "0",
]  # fmt: skip


def host_signature() -> str:
    """CPU vendor, family / model and the instruction set PyTorch dispatches to: what decides float results here."""
    import torch

    fields: dict[str, str] = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            fields.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    cpu = " ".join(fields.get(k, "?") for k in ("vendor_id", "cpu family", "model", "model name"))
    return f"{cpu} | torch {torch.__version__} {torch.backends.cpu.get_cpu_capability()}"


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def artefact_digests(work: Path) -> dict[str, str]:
    out: dict[str, str] = {}
    for path in sorted(p for p in work.rglob("*") if p.is_file()):
        name = path.relative_to(work).as_posix()
        if path.name == "timings.json" or path.suffix == ".png":
            continue
        if path.suffix == ".npz":
            with np.load(path) as data:
                for array in sorted(data.files):
                    out[f"{name}:{array}"] = _sha(np.ascontiguousarray(data[array]).tobytes())
        elif path.suffix == ".json" and "created" in (doc := json.loads(path.read_text())).get("metadata", {}):
            doc["metadata"]["created"] = ""
            out[name] = _sha(json.dumps(doc, sort_keys=True).encode())
        else:
            out[name] = _sha(path.read_bytes())
    return out


def run_recorded(model_parent: Path, work: Path) -> dict[str, str]:
    from moa_vllm.planner.cli import main

    model = save_tiny_llama(model_parent)
    code = main(["run", "--model", str(model), "--work-dir", str(work), *RUN_ARGS])
    if code != 0:
        raise RuntimeError(f"moa-plan run exited {code}")
    return artefact_digests(work)


def record(keep_other_hosts: bool) -> None:
    """This host's digests into the fixture. A change meant to alter artefacts drops every other host's set (they
    are stale); --add-host keeps them (the same code, one more host)."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        digests = run_recorded(Path(tmp) / "model", Path(tmp) / "work")
    hosts = json.loads(FIXTURE.read_text())["hosts"] if keep_other_hosts and FIXTURE.exists() else {}
    hosts[host_signature()] = digests
    FIXTURE.write_text(json.dumps({"args": RUN_ARGS, "hosts": hosts}, indent=1, sort_keys=True) + "\n")
    print(f"{len(digests)} artefacts recorded for {host_signature()!r} in {FIXTURE} ({len(hosts)} hosts)")


if __name__ == "__main__":  # record: python -m tests.planner.golden [--add-host]
    import sys

    record(keep_other_hosts="--add-host" in sys.argv[1:])
