"""Passkey retrieval: seeded prompts at (length, depth), answer scoring, and where the key sits relative to a plan.

A prompt is an instruction, repeated filler with one needle sentence ("The pass key is K. Remember it. K is the pass
key.") placed at a depth (fraction of the filler before it), then the question. Everything is built in token ids so
the key's positions are exact; `length` is the request length N = prompt tokens + max_tokens <= length.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, field
from typing import Literal

from moa_vllm.plan import Plan, request_length, visible

PromptFormat = Literal["chat", "plain"]

INSTRUCTION = (
    "There is an important piece of information hidden inside a lot of irrelevant text. Find it and memorize it. "
    "I will quiz you about the important information there."
)
FILLER = " The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
NEEDLE = " The pass key is {key}. Remember it. {key} is the pass key."
# "number only" matters for this 135M model: without it the dense model explains what a pass key is (3/12 on the grid)
QUESTION = "\n\nWhat is the pass key? Reply with the 5-digit number only."
PLAIN_ANSWER_PREFIX = "\nThe pass key is"


@dataclass(frozen=True)
class PasskeyCase:
    length: int  # nominal request length N (prompt + max_tokens)
    depth: float  # fraction of the filler placed before the needle
    seed: int
    key: int
    prompt_ids: list[int] = field(repr=False)
    key_positions: list[int]  # prompt positions of the key's digit tokens (both mentions)

    @property
    def prompt_tokens(self) -> int:
        return len(self.prompt_ids)

    @property
    def needle_position(self) -> float:
        """Where the first key digit sits, as a fraction of the prompt."""
        return self.key_positions[0] / self.prompt_tokens


def draw_key(length: int, depth: float, seed: int) -> int:
    """A 5-digit key, a pure function of the cell and seed (str seeds hash with SHA-512: no PYTHONHASHSEED effect)."""
    return random.Random(f"passkey-{length}-{depth}-{seed}").randint(10000, 99999)


def _encode(tokenizer, text: str) -> list[int]:
    return tokenizer.encode(text, add_special_tokens=False)


def frame_ids(tokenizer, fmt: PromptFormat) -> tuple[list[int], list[int]]:
    """Token ids before the instruction and after the question for a prompt format."""
    if fmt == "plain":
        return [], _encode(tokenizer, QUESTION + PLAIN_ANSWER_PREFIX)
    marker = "@@CONTENT@@"
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": marker}], tokenize=False, add_generation_prompt=True
    )
    before, after = text.split(marker)
    return _encode(tokenizer, before), _encode(tokenizer, QUESTION) + _encode(tokenizer, after)


def digit_positions(tokenizer, ids: list[int]) -> list[int]:
    return [i for i, t in enumerate(ids) if tokenizer.decode([t]).strip().isdigit()]


def build_case(tokenizer, length: int, depth: float, seed: int, max_tokens: int, fmt: PromptFormat) -> PasskeyCase:
    """One prompt of at most length - max_tokens tokens, filler cut at whole repetitions."""
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must be in [0, 1], got {depth}")
    key = draw_key(length, depth, seed)
    head, tail = frame_ids(tokenizer, fmt)
    head = head + _encode(tokenizer, INSTRUCTION)
    needle = _encode(tokenizer, NEEDLE.format(key=key))
    unit = _encode(tokenizer, FILLER)
    room = length - max_tokens - len(head) - len(needle) - len(tail)
    if room < len(unit):
        raise ValueError(f"length {length} leaves no room for filler (max_tokens {max_tokens})")
    units = room // len(unit)
    before = round(depth * units)
    prompt = head + unit * before + needle + unit * (units - before) + tail
    start = len(head) + len(unit) * before
    key_positions = [start + i for i in digit_positions(tokenizer, needle)]
    return PasskeyCase(length, depth, seed, key, prompt, key_positions)


def build_grid(
    tokenizer,
    lengths: list[int],
    depths: list[float],
    seeds: dict[int, int],
    max_tokens: int,
    fmt: PromptFormat,
) -> list[PasskeyCase]:
    """Every (length, depth) cell with seeds[length] prompts (0 .. seeds-1)."""
    return [build_case(tokenizer, n, d, s, max_tokens, fmt) for n in lengths for d in depths for s in range(seeds[n])]


_NUMBER = re.compile(r"\d+")


def first_number(text: str) -> int | None:
    """The first integer written in the answer (the answer check: this number must be the key)."""
    match = _NUMBER.search(text)
    return int(match.group()) if match else None


def is_correct(case: PasskeyCase, answer: str) -> bool:
    return first_number(answer) == case.key


def heads_seeing_key(plan: Plan, case: PasskeyCase, max_tokens: int, max_model_len: int) -> float:
    """Fraction of (layer, KV head) whose span lets the last prompt token see at least one key digit.

    The last prompt position is where the first answer token is predicted; later answer tokens only see less far.
    """
    n = request_length(case.prompt_tokens, max_tokens, max_model_len)
    query = case.prompt_tokens - 1
    windows = [w for layer in plan.windows(n) for w in layer]
    seeing = sum(any(visible(query, k, plan.sink_tokens, w) for k in case.key_positions) for w in windows)
    return seeing / len(windows)


def key_outside(plan: Plan, case: PasskeyCase, max_tokens: int, max_model_len: int) -> bool:
    """True when no head of the plan can see the key from the question (for a uniform plan: outside its window)."""
    return heads_seeing_key(plan, case, max_tokens, max_model_len) == 0.0
