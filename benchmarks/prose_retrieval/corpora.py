"""Offline natural-prose corpora for the retrieval harness, kept apart from the planner's calibration text (Python's
`pydoc_data` reference topics and the synthetic story sentences): GNU info manuals, man pages and the module
docstrings of Python's standard library, each split into paragraphs of prose.

Each corpus is read from what the operating system or Python ships; a corpus that is not installed is reported
missing (`available`), never silently replaced."""

from __future__ import annotations

import ast
import gzip
import re
import sysconfig
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from pathlib import Path

INFO_DIR = Path("/usr/share/info")
MAN_DIR = Path("/usr/share/man/man1")
MIN_PARAGRAPH_CHARS = 200
MAX_FILES = 400  # enough text for every grid; keeps loading to seconds


@dataclass(frozen=True)
class Corpus:
    name: str
    paragraphs: tuple[str, ...]


def _prose(paragraph: str) -> bool:
    """A paragraph of sentences, not a table, menu or code: long, mostly letters, ends like a sentence."""
    text = " ".join(paragraph.split())
    if len(text) < MIN_PARAGRAPH_CHARS or text.count("*") > 2:
        return False
    letters = sum(ch.isalpha() or ch == " " for ch in text)
    return letters / len(text) > 0.85 and text[-1] in ".:)"


def _paragraphs(text: str) -> list[str]:
    return [" ".join(p.split()) for p in re.split(r"\n\s*\n", text) if _prose(p)]


def _read_gz(path: Path) -> str:
    with gzip.open(path, "rt", encoding="utf-8", errors="replace") as f:
        return f.read()


def info_manuals() -> list[str]:
    """GNU info manuals (coreutils, grep, sed, find, ...): the node separators and menus dropped."""
    out: list[str] = []
    for path in sorted(INFO_DIR.glob("*.info*.gz"))[:MAX_FILES]:
        text = _read_gz(path).replace("\x1f", "\n\n")
        out += _paragraphs(text)
    return out


_ROFF_FONT = re.compile(r"\\f[BIRP]|\\f\(\w\w|\\&|\\e|\\\(\w\w|\\\*\w|\\s[+-]?\d")


def _unroff(text: str) -> str:
    """Man page source to plain text: macro lines that carry words keep the words, the others end a paragraph."""
    lines = []
    for line in text.splitlines():
        if line.startswith((".B ", ".I ", ".BR ", ".BI ", ".IR ", ".RB ", ".IB ", ".RI ")):
            lines.append(line.split(" ", 1)[1].replace('"', ""))
        elif line.startswith((".", "'")):
            lines.append("")  # .PP, .SH, .TP, comments...: a paragraph break
        else:
            lines.append(line)
    return _ROFF_FONT.sub("", "\n".join(lines)).replace("\\-", "-")


def man_pages() -> list[str]:
    """Section 1 man pages, roff markup removed."""
    out: list[str] = []
    for path in sorted(MAN_DIR.glob("*.1*.gz"))[:MAX_FILES]:
        out += _paragraphs(_unroff(_read_gz(path)))
    return out


def stdlib_docstrings() -> list[str]:
    """Module, class and function docstrings of the standard library's pure-Python modules (read, not imported)."""
    out: list[str] = []
    root = Path(sysconfig.get_paths()["stdlib"])
    for path in sorted(root.glob("*.py"))[:MAX_FILES]:
        try:
            tree = ast.parse(path.read_text(encoding="utf-8", errors="replace"))
        except SyntaxError:
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc:
                    out += _paragraphs(doc)
    return out


LOADERS: dict[str, Callable[[], list[str]]] = {
    "gnu-info": info_manuals,
    "man-pages": man_pages,
    "stdlib-docstrings": stdlib_docstrings,
}
MIN_PARAGRAPHS = 50  # below this a corpus cannot fill 8k tokens without repeating itself


@cache
def load(name: str) -> Corpus:
    if name not in LOADERS:
        raise ValueError(f"unknown corpus {name!r}; one of {', '.join(LOADERS)}")
    paragraphs = tuple(dict.fromkeys(LOADERS[name]()))  # each paragraph once, in file order
    if len(paragraphs) < MIN_PARAGRAPHS:
        raise FileNotFoundError(
            f"corpus {name}: {len(paragraphs)} prose paragraphs found (need {MIN_PARAGRAPHS}); is it installed?"
        )
    return Corpus(name, paragraphs)


def available() -> list[str]:
    """The corpora this machine has."""
    out = []
    for name in LOADERS:
        try:
            load(name)
        except FileNotFoundError:
            continue
        out.append(name)
    return out
