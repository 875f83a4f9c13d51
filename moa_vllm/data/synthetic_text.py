"""Deterministic natural-language prompts of a given token length (no dataset needed)."""

from __future__ import annotations

import random

SENTENCES = [
    "The river town woke slowly as the ferry horn sounded across the water.",
    "Mara kept a ledger of every ship that docked, noting its cargo and its captain.",
    "In the spring the orchards bloomed and the markets filled with traders from the north.",
    "The old lighthouse keeper claimed the fog carried voices from drowned villages.",
    "Each evening the children counted the lanterns strung along the harbour wall.",
    "A merchant named Olin sold maps that were always slightly wrong in the same places.",
    "The council met in the granary because the hall roof had collapsed years before.",
    "Rain fell for nine days, and the bridge to the eastern farms was washed away.",
    "Tomas repaired clocks, though he said time in the town never needed much keeping.",
    "The archive held letters from the founders, sealed with green wax and twine.",
    "Every fifth year a festival honoured the first settlers who crossed the marsh.",
    "The school taught arithmetic with pebbles gathered from the river bank.",
]


def natural_prompt(tokenizer, n_tokens: int, seed: int, question: str = "") -> list[int]:
    """About n_tokens of shuffled story sentences, then an optional question; returned as token ids."""
    rng = random.Random(seed)
    tail = tokenizer.encode(question, add_special_tokens=False) if question else []
    ids: list[int] = []
    while len(ids) < n_tokens - len(tail):
        ids += tokenizer.encode(" " + rng.choice(SENTENCES), add_special_tokens=False)
    return ids[: n_tokens - len(tail)] + tail
