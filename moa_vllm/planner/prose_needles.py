"""Natural-text retrieval for calibration: facts written in the register of the surrounding prose, set as their own
paragraph at a paragraph boundary of Python's docs, and asked for by their label.

Why beside the passkey-style tasks of calibrate.py: a key repeated in filler is found by a few copy heads; a fact
stated once in running prose, asked for by a label, is found through more heads (the label, then the value), and
plans calibrated on passkeys alone lost those answers in natural text. Forms: a number, a person's name, a value
from a list of settings, and a two-hop chain (a thing belongs to a person, that person works in a room: the answer
needs both facts, which sit at two depths). Vocabulary and phrasing are the planner's own; the accuracy harness
(benchmarks/prose_retrieval) uses other corpora and other templates, so calibration does not teach its test.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from moa_vllm.planner.tasks import PROSE_TASKS

FACT_DEPTH = (0.02, 0.9)  # anywhere but the last tenth: the answers lost in natural text sat at depths 0-0.5
# Held-out samples (the ship gate's) keep their facts in the first half, where a window of half the context cannot
# see them: with facts anywhere, most held-out facts fell inside uniform's window and the gate could not tell a plan
# that retrieves from one that does not.
HELD_OUT_FACT_DEPTH = (0.02, 0.5)

_PROJECTS = ("Halcyon", "Brambling", "Corvid", "Dunlin", "Egret", "Fulmar", "Gadwall", "Hobby", "Ibis", "Jackdaw",
             "Kestrel", "Linnet")  # fmt: skip
_ITEMS = ("build server", "test rig", "release branch", "mirror", "staging cluster", "nightly job", "archive",
          "benchmark host")  # fmt: skip
_GIVEN = ("Agnieszka", "Bartholomew", "Cordelia", "Desmond", "Eulalia", "Fitzgerald", "Gwendolyn", "Horatio",
          "Isadora", "Jethro")  # fmt: skip
_FAMILY = ("Achterberg", "Brannigan", "Castellanos", "Drummond", "Esterhazy", "Featherstone", "Gallagher",
           "Huxtable", "Ignatieff", "Jablonski")  # fmt: skip
_SETTINGS = ("timeout", "retries", "workers", "buffer", "port", "depth", "quota", "interval")
_OBJECTS = ("brass key", "blue folder", "spare laptop", "signed contract", "old modem", "printed manual")


@dataclass(frozen=True)
class ProseNeedle:
    facts: tuple[str, ...]  # paragraphs inserted into the prose, in order of depth
    question: str
    expected: tuple[str, ...]  # strings a correct answer contains
    target: str  # the value the answer names (its tokens are the retrieval queries' target)


def make_prose_needle(task: str, rng: random.Random) -> ProseNeedle:
    project = rng.choice(_PROJECTS)
    if task == "prose-number":
        value = str(rng.randrange(1000, 10000))
        item = rng.choice(_ITEMS)
        fact = f"For the {project} project, the {item} listens on ticket number {value}."
        question = (
            f"Which ticket number does the {item} of the {project} project listen on? Reply with the number only."
        )
        return ProseNeedle((fact,), question, (value,), value)
    if task == "prose-name":
        given, family = rng.choice(_GIVEN), rng.choice(_FAMILY)
        fact = f"The maintainer responsible for the {project} project is {given} {family}, who reviews every change."
        question = f"Who is the maintainer of the {project} project? Reply with the name only."
        return ProseNeedle((fact,), question, (family,), family)
    if task == "prose-setting":
        names = rng.sample(_SETTINGS, 3)
        values = [str(rng.randrange(2, 1000)) for _ in names]
        listed = ", ".join(f"{n} is {v}" for n, v in zip(names, values))
        which = rng.randrange(len(names))
        fact = f"The {project} configuration file sets the following values: {listed}."
        question = f"In the {project} configuration file, what is the {names[which]}? Reply with the number only."
        return ProseNeedle((fact,), question, (values[which],), values[which])
    if task == "two-hop":
        thing, given = rng.choice(_OBJECTS), rng.choice(_GIVEN)
        room = str(rng.randrange(100, 1000))
        first = f"The {thing} of the {project} project was handed to {given} for safekeeping."
        second = f"Everything {given} looks after is stored in room {room}."
        question = f"In which room is the {thing} of the {project} project stored? Reply with the room number only."
        return ProseNeedle((first, second), question, (room,), room)
    raise ValueError(f"unknown natural-text task {task!r}; one of {', '.join(PROSE_TASKS)}")


def fact_depths(count: int, rng: random.Random, within: tuple[float, float] = FACT_DEPTH) -> list[float]:
    """Depths of the facts in order: one anywhere in `within`, or two at least a fifth of the context apart."""
    lo, hi = within
    if hi - lo < 0.2 * (count > 1):
        raise ValueError(f"fact depth range {within} is too narrow for two facts a fifth of the context apart")
    if count == 1:
        return [rng.uniform(lo, hi)]
    first = rng.uniform(lo, hi - 0.2)
    return [first, rng.uniform(first + 0.2, hi)]


def paragraph_starts(filler: list[int], decode) -> list[int]:
    """Token indices that begin a line of the filler (after a token holding a newline): where a fact may go."""
    return [i for i in range(1, len(filler)) if "\n" in decode([filler[i - 1]])]


def nearest(starts: list[int], at: int) -> int:
    """The paragraph start closest to `at` (or `at` itself when the filler has no line breaks)."""
    return min(starts, key=lambda s: abs(s - at)) if starts else at
