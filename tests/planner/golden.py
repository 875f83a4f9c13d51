"""What a `moa-plan run` leaves in its work dir, reduced to digests that must not change when the code is reorganised.

JSON artefacts (plans, keys, Pareto sets, true losses, reports) are digested as bytes; .npz archives by their arrays
(their zip entries carry write times); a plan's `metadata.created` is blanked (the time it was written);
timings.json and images are left out (wall times, renderer versions).
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


if __name__ == "__main__":  # record: python -m tests.planner.golden
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        digests = run_recorded(Path(tmp) / "model", Path(tmp) / "work")
    FIXTURE.write_text(json.dumps({"args": RUN_ARGS, "artefacts": digests}, indent=1) + "\n")
    print(f"{len(digests)} artefacts recorded in {FIXTURE}")
