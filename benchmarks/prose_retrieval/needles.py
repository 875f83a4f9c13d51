"""The facts hidden in the prose and the questions that ask for them by label.

Forms (one fact each): `number` (a 5-digit code), `name` (a person's full name; the surname must come back),
`sentence` (a short statement; its one distinctive word must come back), `kv` (a labelled value from a registry
line). Two facts: `two-needles` (two codes asked for together: both must come back) and `two-hop` (where a thing is
and who runs that place: the answer needs both facts). Labels and values are drawn per prompt from the seed, so no
answer can be guessed from the form."""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

SINGLE_FORMS = ("number", "name", "sentence", "kv")
MULTI_FORMS = ("two-needles", "two-hop")
FORMS = SINGLE_FORMS + MULTI_FORMS

COLOURS = (
    "amber",
    "cobalt",
    "crimson",
    "ivory",
    "jade",
    "olive",
    "scarlet",
    "silver",
    "umber",
    "violet",
    "teal",
    "rust",
)
PLACES = ("lighthouse", "granary", "observatory", "boathouse", "chapel", "foundry", "library", "windmill", "tannery",
          "bathhouse", "armoury", "brewery")  # fmt: skip
FIRST = ("Marguerite", "Tobias", "Ingrid", "Casimir", "Yolanda", "Bertrand", "Odile", "Leopold", "Rosalind", "Anselm")
LAST = ("Oyelaran", "Vantongeren", "Halvorsen", "Quillfeather", "Marchetti", "Szymanski", "Abernethy", "Delacroix",
        "Fairweather", "Nakagawa", "Ostrowski", "Penhallow")  # fmt: skip
TOWNS = ("Arvelholm", "Brisquette", "Corrandale", "Dunmarrow", "Eskerfield", "Falloway", "Grimsbury", "Hollowmere")
ANIMALS = ("heron", "badger", "otter", "lynx", "falcon", "marten", "tortoise", "stag")
HIDING = ("anvil", "cellar stairs", "copper kettle", "oak table", "stone bridge", "willow tree", "iron gate", "hayloft")
SPICES = ("cardamom", "saffron", "juniper", "fenugreek", "sumac", "galangal", "anise", "mace", "nigella", "tamarind",
          "asafoetida", "caraway")  # fmt: skip


@dataclass(frozen=True)
class Needle:
    form: str
    facts: tuple[str, ...]  # sentences inserted into the prose, in order (one per depth)
    question: str
    expected: tuple[str, ...]  # every one must appear in the answer (case-insensitive, as whole words)


def _label(rng: random.Random) -> str:
    return f"{rng.choice(COLOURS)} {rng.choice(PLACES)}"


def _code(rng: random.Random) -> str:
    return str(rng.randint(10000, 99999))


def make_needle(form: str, seed: str) -> Needle:
    """The needle of one prompt: a pure function of its form and seed string."""
    rng = random.Random(f"prose-needle:{form}:{seed}")
    place = _label(rng)
    if form == "number":
        code = _code(rng)
        question = f"What is the access code for the {place}? Reply with the 5-digit number only."
        return Needle(form, (f" The access code for the {place} is {code}.",), question, (code,))
    if form == "name":
        first, last = rng.choice(FIRST), rng.choice(LAST)
        question = f"Who is the keeper of the {place}? Reply with the full name only."
        return Needle(form, (f" The keeper of the {place} is {first} {last}.",), question, (last,))
    if form == "sentence":
        animal, spot = rng.choice(ANIMALS), rng.choice(HIDING)
        fact = f" A note in the {place} says that the {animal} sleeps under the {spot}."
        question = f"According to the note in the {place}, where does the {animal} sleep? Reply in a few words."
        return Needle(form, (fact,), question, (spot,))
    if form == "kv":
        spice = rng.choice(SPICES)
        question = f"What is the secret ingredient of the {place} in the registry? Reply with one word."
        return Needle(form, (f" Registry entry: {place}; secret ingredient = {spice}.",), question, (spice,))
    if form == "two-needles":
        other = _label(rng)
        while other == place:
            other = _label(rng)
        a, b = _code(rng), _code(rng)
        facts = (f" The access code for the {place} is {a}.", f" The access code for the {other} is {b}.")
        question = f"What are the access codes for the {place} and for the {other}? Reply with the two numbers only."
        return Needle(form, facts, question, (a, b))
    if form == "two-hop":
        town, first, last = rng.choice(TOWNS), rng.choice(FIRST), rng.choice(LAST)
        facts = (f" The {place} stands in the town of {town}.", f" The mayor of {town} is {first} {last}.")
        question = f"Who is the mayor of the town where the {place} stands? Reply with the full name only."
        return Needle(form, facts, question, (last,))
    raise ValueError(f"unknown needle form {form!r}; one of {', '.join(FORMS)}")


def is_correct(needle: Needle, answer: str) -> bool:
    """Every expected value appears in the answer as a whole word (a code inside a longer number does not count)."""
    text = answer.lower()
    return all(re.search(rf"(?<![\w]){re.escape(v.lower())}(?![\w])", text) for v in needle.expected)
