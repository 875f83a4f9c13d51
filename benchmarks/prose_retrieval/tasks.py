"""Prompts: a stretch of one corpus's prose filled to a request length, the needle's facts inserted at paragraph
boundaries at their depths, then the question. Built in token ids, so every fact's position is exact; `length` is
the request length N = prompt tokens + max_tokens <= length, where a case's answer budget max_tokens is
`answer_tokens` per value the question asks for (the model restates the question before each value)."""

from __future__ import annotations

import bisect
import random
from dataclasses import dataclass, field

from benchmarks.prose_retrieval.corpora import Corpus
from benchmarks.prose_retrieval.needles import MULTI_FORMS, SINGLE_FORMS, Needle, make_needle

INSTRUCTION = "Read the following text carefully; a question about it follows.\n\n"
DEFAULT_DEPTHS = (0.0, 0.25, 0.5, 0.75, 1.0)
DEFAULT_PAIRS = ((0.1, 0.6), (0.4, 0.9))  # depths of the two facts of the multi-fact forms


@dataclass(frozen=True)
class ProseCase:
    form: str
    corpus: str
    length: int  # nominal request length N (prompt + max_tokens)
    depths: tuple[float, ...]  # one per fact: fraction of the prose before it
    seed: int
    needle: Needle
    prompt_ids: list[int] = field(repr=False)
    fact_spans: tuple[tuple[int, int], ...]  # [start, end) prompt positions of each fact's tokens
    max_tokens: int  # the answer budget: answer_tokens per expected value

    @property
    def prompt_tokens(self) -> int:
        return len(self.prompt_ids)


def _encode(tokenizer, text: str) -> list[int]:
    return tokenizer.encode(text, add_special_tokens=False)


def frame_ids(tokenizer, question: str) -> tuple[list[int], list[int]]:
    """Token ids before the prose (chat header + instruction) and after it (question + assistant header)."""
    marker = "@@CONTENT@@"
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": marker}], tokenize=False, add_generation_prompt=True
    )
    before, after = text.split(marker)
    return _encode(tokenizer, before + INSTRUCTION), _encode(tokenizer, f"\n\nQuestion: {question}" + after)


def prose_ids(tokenizer, corpus: Corpus, tokens: int, rng: random.Random) -> tuple[list[int], list[int]]:
    """`tokens` ids of consecutive paragraphs from a random start (the last one cut), and the offsets where a
    paragraph begins (where facts may go; 0 and the end included)."""
    ids: list[int] = []
    starts = [0]
    index = rng.randrange(len(corpus.paragraphs))
    for _ in range(len(corpus.paragraphs)):
        if len(ids) >= tokens:
            break
        ids += _encode(tokenizer, corpus.paragraphs[index] + "\n\n")
        starts.append(len(ids))
        index = (index + 1) % len(corpus.paragraphs)
    if len(ids) < tokens:
        raise ValueError(f"corpus {corpus.name} has fewer than {tokens} tokens of prose")
    return ids[:tokens], [s for s in starts if s < tokens] + [tokens]


def build_case(
    tokenizer, corpus: Corpus, form: str, length: int, depths: tuple[float, ...], seed: int, answer_tokens: int
) -> ProseCase:
    if any(not 0.0 <= d <= 1.0 for d in depths) or list(depths) != sorted(depths):
        raise ValueError(f"depths must be ascending in [0, 1], got {depths}")
    key = f"{corpus.name}:{length}:{depths}:{seed}"
    needle = make_needle(form, key)
    if len(needle.facts) != len(depths):
        raise ValueError(f"form {form} has {len(needle.facts)} facts, got {len(depths)} depths")
    max_tokens = answer_tokens * len(needle.expected)
    head, tail = frame_ids(tokenizer, needle.question)
    facts = [_encode(tokenizer, f.strip() + "\n\n") for f in needle.facts]  # a paragraph of its own
    room = length - max_tokens - len(head) - len(tail) - sum(map(len, facts))
    if room < 64:
        raise ValueError(f"length {length} leaves no room for prose (max_tokens {max_tokens})")
    prose, starts = prose_ids(tokenizer, corpus, room, random.Random(f"prose-text:{key}"))
    cuts = [starts[min(bisect.bisect_left(starts, d * room), len(starts) - 1)] for d in depths]
    prompt, spans, at = list(head), [], 0
    for cut, fact in zip(cuts, facts):
        prompt += prose[at:cut]
        spans.append((len(prompt), len(prompt) + len(fact)))
        prompt += fact
        at = cut
    prompt += prose[at:] + tail
    return ProseCase(form, corpus.name, length, tuple(depths), seed, needle, prompt, tuple(spans), max_tokens)


def build_grid(
    tokenizer,
    corpora: list[Corpus],
    lengths: list[int],
    depths: tuple[float, ...] = DEFAULT_DEPTHS,
    pairs: tuple[tuple[float, float], ...] = DEFAULT_PAIRS,
    seeds: int = 1,
    answer_tokens: int = 24,
) -> list[ProseCase]:
    """Every single-fact form at every (length, depth) and every multi-fact form at every (length, depth pair),
    `seeds` prompts each; the corpus rotates over the cells so each form and length meets every corpus."""
    cells = [(f, n, (d,)) for n in lengths for d in depths for f in SINGLE_FORMS]
    cells += [(f, n, pair) for n in lengths for pair in pairs for f in MULTI_FORMS]
    return [
        build_case(tokenizer, corpora[(i + s) % len(corpora)], form, n, ds, s, answer_tokens)
        for i, (form, n, ds) in enumerate(cells)
        for s in range(seeds)
    ]
