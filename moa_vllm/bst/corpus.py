"""A real-text corpus available offline: the Python standard library's own source, split into train and held-out
sets by file (never by position inside a file, so no held-out line has a near copy in training).

Which split a file lands in depends only on a hash of its path relative to the library root, so the split is stable
across runs and machines that share the Python version. The test suites (``test``/``tests``/``idle_test``) and
``site-packages`` are left out: the former are mostly generated data and fixtures, the latter is not the stdlib.
"""

from __future__ import annotations

import hashlib
import sysconfig
from dataclasses import dataclass
from pathlib import Path

EXCLUDED_DIRS = frozenset({"test", "tests", "idle_test", "site-packages", "__pycache__"})
DEFAULT_HELDOUT_PERCENT = 10


@dataclass(frozen=True)
class SourceFile:
    relpath: str  # posix path relative to the corpus root; also what the split hashes
    text: str


def stdlib_root() -> Path:
    """The running interpreter's standard library folder."""
    return Path(sysconfig.get_paths()["stdlib"])


def is_heldout(relpath: str, percent: int = DEFAULT_HELDOUT_PERCENT) -> bool:
    """Deterministic per-file split: the first 8 bytes of sha256(relpath) modulo 100 below ``percent``."""
    digest = hashlib.sha256(relpath.encode()).digest()
    return int.from_bytes(digest[:8], "big") % 100 < percent


def source_files(root: Path | None = None) -> list[SourceFile]:
    """Every ``*.py`` under ``root`` (default: the stdlib) outside the excluded folders, sorted by path.

    Files that are not valid UTF-8 are skipped (a handful of stdlib files carry legacy encodings on purpose).
    """
    base = root or stdlib_root()
    out = []
    for path in sorted(base.rglob("*.py")):
        rel = path.relative_to(base)
        if EXCLUDED_DIRS.intersection(rel.parts[:-1]):
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue
        if text.strip():
            out.append(SourceFile(rel.as_posix(), text))
    return out


def split_files(
    files: list[SourceFile], percent: int = DEFAULT_HELDOUT_PERCENT
) -> tuple[list[SourceFile], list[SourceFile]]:
    """``(train, heldout)`` by :func:`is_heldout`."""
    train = [f for f in files if not is_heldout(f.relpath, percent)]
    heldout = [f for f in files if is_heldout(f.relpath, percent)]
    return train, heldout


def corpus_digest(files: list[SourceFile]) -> str:
    """sha256 over paths and texts: names the exact corpus a checkpoint was trained or scored on."""
    h = hashlib.sha256()
    for f in files:
        h.update(f.relpath.encode() + b"\0" + f.text.encode() + b"\0")
    return h.hexdigest()
