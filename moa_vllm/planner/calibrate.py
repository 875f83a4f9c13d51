"""Calibration samples with long-range dependencies, answered by the dense model itself.

Every sample is natural text the machine has offline (Python's own reference docs from `pydoc_data`, or the
project's story sentences) with a retrieval or recall target placed early, far from the question at the end. The
supervision is the dense model's own greedy answer: the profiled loss then measures how far a sparse head moves the
model from what it would have said, not from a human answer. A sample whose dense answer misses the hidden target is
redrawn (a few attempts, then its slot is dropped): a wrong answer teaches the planner nothing about retrieval.
Task kinds go round-robin over a level's sample indices, so every level profiles every kind: the passkey-style
tasks below and the natural-text facts of prose_needles.py. Every sample records where its facts sit in the prompt
(`fact_spans`), which the retrieval step reads.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch

from moa_vllm.data.synthetic_text import SENTENCES
from moa_vllm.planner.prose_needles import (
    FACT_DEPTH,
    HELD_OUT_FACT_DEPTH,
    fact_depths,
    make_prose_needle,
    nearest,
    paragraph_starts,
)
from moa_vllm.planner.tasks import PROSE_TASKS, TASKS

CONTEXT_MARKER = "\x00MOA_CONTEXT\x00"
NEEDLE_DEPTH = (0.05, 0.6)  # fraction of the context before the target: far from the question at the end

_ADJECTIVES = ("red", "silver", "wooden", "striped", "heavy", "small", "green", "ancient", "broken", "golden")
_NOUNS = ("lantern", "compass", "teapot", "ledger", "anchor", "violin", "mirror", "kettle", "helmet", "basket")
_NAMES = ("Mara", "Olin", "Tomas", "Ilse", "Bruno", "Petra", "Anouk", "Femi", "Lior", "Sana")


@dataclass(frozen=True)
class Sample:
    """One calibration sequence: prompt_ids + answer_ids is what profiling runs; answer tokens carry the loss."""

    level: int  # the length level this sample belongs to (prompt + answer <= level)
    task: str
    source: str
    depth: float  # where the target sits in the context, 0 = start
    prompt_ids: list[int]
    answer_ids: list[int]
    target: str = ""  # the hidden text, for inspection
    question: str = ""
    expected: tuple[str, ...] = ()  # strings a correct answer contains
    index: int = 0  # slot within its level
    attempt: int = 0  # redraws before this sample's dense answer was correct
    fact_spans: tuple[tuple[int, int], ...] = ()  # [start, end) of each hidden fact in prompt_ids

    @property
    def length(self) -> int:
        return len(self.prompt_ids) + len(self.answer_ids)

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> Sample:
        spans = tuple((int(a), int(b)) for a, b in data.get("fact_spans", ()))
        return cls(**{**data, "expected": tuple(data.get("expected", ())), "fact_spans": spans})


def docs_corpus() -> str:
    """Python's reference documentation topics (stdlib `pydoc_data`), or '' when the distribution dropped it."""
    try:
        from pydoc_data.topics import topics
    except ImportError:
        return ""
    return "\n\n".join(topics[name].strip() for name in sorted(topics))


def story_text(rng: random.Random, chars: int) -> str:
    out: list[str] = []
    while sum(len(s) + 1 for s in out) < chars:
        out.append(rng.choice(SENTENCES))
    return " ".join(out)


def filler_text(rng: random.Random, corpus: str, chars: int) -> tuple[str, str]:
    """About `chars` characters of natural text and the name of its source."""
    if corpus and len(corpus) > chars and rng.random() < 0.7:
        return docs_text(rng, corpus, chars)
    return story_text(rng, chars), "story"


def make_target(task: str, rng: random.Random) -> tuple[str, str, tuple[str, ...]]:
    """(text hidden in the context, question asked at the end, strings a correct answer contains)."""
    if task == "passkey":
        key = rng.randrange(10000, 100000)
        # "number only": without it this small model often explains what a pass key is instead of answering
        question = "What is the pass key? Reply with the 5-digit number only."
        return f" The pass key is {key}. Remember it. {key} is the pass key. ", question, (str(key),)
    if task == "facts":
        items = rng.sample(range(len(_NOUNS)), 3)
        facts = [(f"{rng.choice(_ADJECTIVES)} {_NOUNS[i]}", rng.randrange(10, 1000)) for i in items]
        text = " ".join(f"Note: the {what} is kept in box {box}." for what, box in facts)
        what, box = rng.choice(facts)
        return f" {text} ", f"In which box is the {what} kept?", (str(box),)
    name, city = rng.choice(_NAMES), rng.choice(("Lisbon", "Oslo", "Quito", "Hanoi", "Accra", "Perth"))
    return (
        f" {name} arrived in {city} on a Tuesday carrying a letter for the harbour master. ",
        f"Who arrived in {city} on a Tuesday? Reply with the name only.",
        (name,),
    )


def answer_is_correct(answer: str, expected: tuple[str, ...]) -> bool:
    return all(e.lower() in answer.lower() for e in expected)


def prompt_parts(tokenizer, question: str) -> tuple[list[int], list[int]]:
    """Token ids before and after the context: the chat template when the tokenizer has one, else plain text."""
    user = f"{CONTEXT_MARKER}\n\nAnswer from the text above. {question}"
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": user}], tokenize=False, add_generation_prompt=True
        )
    else:
        bos = tokenizer.bos_token or ""
        text = f"{bos}{user}\nAnswer:"
    before, after = text.split(CONTEXT_MARKER)
    encode = lambda s: tokenizer.encode(s, add_special_tokens=False)  # noqa: E731
    return encode(before), encode(after)


def context_budget(level: int, max_new_tokens: int, fixed: int) -> int:
    budget = level - max_new_tokens - fixed
    if budget < 16:
        raise ValueError(f"length level {level} leaves no room for context ({budget} tokens); use a longer level")
    return budget


def filler_ids(tokenizer, rng: random.Random, corpus: str, budget: int, prose_only: bool = False) -> tuple[list, str]:
    """`budget` tokens of natural text (Python's docs, or the story sentences) and the name of its source."""
    filler: list[int] = []
    source = "story"
    while len(filler) < budget:  # ~4 characters per token; loop in case the text is denser
        chars = 5 * (budget - len(filler)) + 64
        text, source = (
            filler_text(rng, corpus, chars) if not prose_only or not corpus else docs_text(rng, corpus, chars)
        )
        filler += tokenizer.encode(text, add_special_tokens=False)
    return filler[:budget], source


def docs_text(rng: random.Random, corpus: str, chars: int) -> tuple[str, str]:
    """About `chars` characters of the docs corpus from a random line start."""
    start = rng.randrange(0, max(len(corpus) - chars, 1))
    start = corpus.find("\n", start) + 1 or start  # begin at a line start
    return corpus[start : start + chars], "python-docs"


def build_prompt(
    tokenizer,
    level: int,
    max_new_tokens: int,
    rng: random.Random,
    corpus: str,
    task: str | None = None,
    fact_depth: tuple[float, float] = FACT_DEPTH,
) -> dict:
    """Prompt ids of at most level - max_new_tokens tokens with the task's fact(s) in the context; a natural-text
    task's facts sit at depths within fact_depth."""
    task = task or TASKS[rng.randrange(len(TASKS))]
    if task in PROSE_TASKS:
        return _prose_prompt(tokenizer, level, max_new_tokens, rng, corpus, task, fact_depth)
    target, question, expected = make_target(task, rng)
    before, after = prompt_parts(tokenizer, question)
    needle = tokenizer.encode(target, add_special_tokens=False)
    budget = context_budget(level, max_new_tokens, len(before) + len(after) + len(needle))
    filler, source = filler_ids(tokenizer, rng, corpus, budget)
    depth = rng.uniform(*NEEDLE_DEPTH)
    at = int(depth * budget)
    context = filler[:at] + needle + filler[at:]
    start = len(before) + at
    return {
        "level": level,
        "task": task,
        "source": source,
        "depth": depth,
        "prompt_ids": before + context + after,
        "target": target,
        "question": question,
        "expected": expected,
        "fact_spans": ((start, start + len(needle)),),
    }


def _prose_prompt(
    tokenizer, level: int, max_new_tokens: int, rng: random.Random, corpus: str, task: str, within: tuple[float, float]
) -> dict:
    """A natural-text task: each fact its own paragraph, at the paragraph start nearest its depth."""
    needle = make_prose_needle(task, rng)
    before, after = prompt_parts(tokenizer, needle.question)
    facts = [tokenizer.encode(f"{fact}\n\n", add_special_tokens=False) for fact in needle.facts]
    budget = context_budget(level, max_new_tokens, len(before) + len(after) + sum(map(len, facts)))
    filler, source = filler_ids(tokenizer, rng, corpus, budget, prose_only=True)
    starts = paragraph_starts(filler, tokenizer.decode)
    depths = fact_depths(len(facts), rng, within)
    cuts = sorted(nearest(starts, int(d * budget)) for d in depths)
    if len(set(cuts)) < len(cuts):  # both facts at one boundary: the second goes where its own depth says
        cuts = sorted({cuts[0], int(depths[-1] * budget)})
    context: list[int] = []
    spans: list[tuple[int, int]] = []
    last = 0
    for cut, fact in zip(cuts, facts):
        context += filler[last:cut]
        spans.append((len(before) + len(context), len(before) + len(context) + len(fact)))
        context += fact
        last = cut
    context += filler[last:]
    return {
        "level": level,
        "task": task,
        "source": source,
        "depth": cuts[0] / budget,
        "prompt_ids": before + context + after,
        "target": needle.target,
        "question": needle.question,
        "expected": needle.expected,
        "fact_spans": tuple(spans),
    }


@torch.no_grad()
def greedy_answer(model, prompt_ids: list[int], max_new_tokens: int, eos_ids: set[int]) -> list[int]:
    """The dense model's greedy continuation, up to and including its first end token."""
    device = next(model.parameters()).device
    ids = torch.tensor([prompt_ids], device=device)
    out = model.generate(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=max_new_tokens,
        do_sample=False,
        pad_token_id=next(iter(eos_ids)) if eos_ids else 0,
    )[0, len(prompt_ids) :].tolist()
    for i, t in enumerate(out):
        if t in eos_ids:
            return out[: i + 1]
    return out


def eos_token_ids(model, tokenizer) -> set[int]:
    ids = model.generation_config.eos_token_id
    found = set(ids if isinstance(ids, list) else [ids] if ids is not None else [])
    if tokenizer.eos_token_id is not None:
        found.add(tokenizer.eos_token_id)
    return found


def sample_rng(seed: int, level: int, index: int, attempt: int = 0) -> random.Random:
    """One generator per sample, so a resumed run makes exactly the samples a fresh run would."""
    return random.Random(f"{seed}:{level}:{index}" + (f":{attempt}" if attempt else ""))


def slot_task(index: int, tasks: tuple[str, ...] = TASKS) -> str:
    """Round-robin task kind of a level's sample slot."""
    return tasks[index % len(tasks)]


def make_sample(
    model,
    tokenizer,
    level: int,
    index: int,
    seed: int,
    max_new_tokens: int,
    corpus: str,
    eos: set[int],
    attempt: int = 0,
    task: str | None = None,
    fact_depth: tuple[float, float] = FACT_DEPTH,
) -> Sample:
    rng = sample_rng(seed, level, index, attempt)
    spec = build_prompt(tokenizer, level, max_new_tokens, rng, corpus, task, fact_depth)
    answer = greedy_answer(model, spec["prompt_ids"], max_new_tokens, eos)
    if not answer:
        raise RuntimeError(f"the model produced no answer tokens for sample {index} at level {level}")
    return Sample(answer_ids=answer, index=index, attempt=attempt, **spec)


@dataclass(frozen=True)
class SlotResult:
    """What one (level, index) slot produced: a sample, or None when every attempt's dense answer was wrong."""

    level: int
    index: int
    sample: Sample | None
    attempts: int


def fill_slot(
    model,
    tokenizer,
    level: int,
    index: int,
    seed: int,
    max_new_tokens: int,
    corpus: str,
    eos: set[int],
    attempts: int,
    check_answers: bool,
    tasks: tuple[str, ...] = TASKS,
    fact_depth: tuple[float, float] = FACT_DEPTH,
) -> SlotResult:
    """Draw samples of the slot's task until the dense model answers one correctly (or attempts run out)."""
    task = slot_task(index, tasks)
    for attempt in range(attempts):
        sample = make_sample(
            model, tokenizer, level, index, seed, max_new_tokens, corpus, eos, attempt, task, fact_depth
        )
        text = tokenizer.decode(sample.answer_ids, skip_special_tokens=True)
        if not check_answers or answer_is_correct(text, sample.expected):
            return SlotResult(level, index, sample, attempt + 1)
    return SlotResult(level, index, None, attempts)


def calibrate_slots(
    model,
    tokenizer,
    slots: list[tuple[int, int]],
    seed: int,
    max_new_tokens: int,
    on_result: Callable[[SlotResult], None],
    attempts: int = 3,
    check_answers: bool = True,
    tasks: tuple[str, ...] = TASKS,
    held_out_level: int | None = None,
) -> None:
    """Fill every (level, index) slot in order, reporting each result (the caller keeps and checkpoints them).
    Slots of held_out_level (the ship gate's samples) put natural-text facts within HELD_OUT_FACT_DEPTH."""
    corpus, eos = docs_corpus(), eos_token_ids(model, tokenizer)
    for level, index in slots:
        depth = HELD_OUT_FACT_DEPTH if level == held_out_level else FACT_DEPTH
        result = fill_slot(
            model, tokenizer, level, index, seed, max_new_tokens, corpus, eos, attempts, check_answers, tasks, depth
        )
        on_result(result)
