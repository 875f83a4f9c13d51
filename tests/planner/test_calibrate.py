"""Calibration samples: length budget, target placed far from the question, determinism, dense greedy answers."""

from __future__ import annotations

import random

import pytest
import torch
from transformers import LlamaForCausalLM

from moa_vllm.planner.calibrate import (
    answer_is_correct,
    build_prompt,
    docs_corpus,
    eos_token_ids,
    fill_slot,
    greedy_answer,
    make_sample,
    sample_rng,
    slot_task,
)
from moa_vllm.planner.prose_needles import FACT_DEPTH, HELD_OUT_FACT_DEPTH, fact_depths, make_prose_needle
from moa_vllm.planner.tasks import KEY_TASKS, PROSE_TASKS, TASKS
from tests.planner.tiny_llama import tiny_config, tiny_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def model(tokenizer):
    torch.manual_seed(0)
    return LlamaForCausalLM(tiny_config(len(tokenizer))).eval()


def _find(haystack: list[int], needle: list[int]) -> int:
    for i in range(len(haystack) - len(needle) + 1):
        if haystack[i : i + len(needle)] == needle:
            return i
    return -1


@pytest.mark.model
@pytest.mark.parametrize("index", range(6))
def test_prompt_fits_its_level_and_hides_the_target_far_from_the_question(tokenizer, index: int):
    level, new = 400, 16
    task = KEY_TASKS[index % len(KEY_TASKS)]
    spec = build_prompt(tokenizer, level, new, sample_rng(3, level, index), docs_corpus(), task)
    assert len(spec["prompt_ids"]) <= level - new
    assert len(spec["prompt_ids"]) >= level - new - 4  # the budget is used, not just respected
    # the target text, tokenised on its own, sits in the context
    at = _find(spec["prompt_ids"], tokenizer.encode(spec["target"], add_special_tokens=False))
    assert at > 0
    distance = len(spec["prompt_ids"]) - at
    assert distance > 0.3 * len(spec["prompt_ids"])  # depth <= 0.6: far from the question at the end
    assert spec["question"] in tokenizer.decode(spec["prompt_ids"])
    ((start, end),) = spec["fact_spans"]
    assert start == at and tokenizer.decode(spec["prompt_ids"][start:end]) == spec["target"]


@pytest.mark.model
@pytest.mark.parametrize("task", PROSE_TASKS)
@pytest.mark.parametrize("index", range(3))
def test_a_natural_text_fact_is_its_own_paragraph_at_its_depth_and_holds_the_answer(tokenizer, task, index):
    level, new, corpus = 600, 16, docs_corpus()
    spec = build_prompt(tokenizer, level, new, sample_rng(5, level, index), corpus, task)
    ids, spans = spec["prompt_ids"], spec["fact_spans"]
    assert level - new - 4 <= len(ids) <= level - new and spec["source"] == "python-docs"
    needle = make_prose_needle(task, sample_rng(5, level, index))  # the prompt's first draw is its needle
    assert len(spans) == len(needle.facts) == (2 if task == "two-hop" else 1)
    assert [a for a, _ in spans] == sorted(a for a, _ in spans)  # in depth order, apart
    for (start, end), fact in zip(spans, needle.facts):
        assert tokenizer.decode(ids[start:end]) == f"{fact}\n\n"
        assert "\n" in tokenizer.decode(ids[start - 1 : start])  # set at a paragraph start
    assert spec["expected"][0] in tokenizer.decode(ids[spans[-1][0] : spans[-1][1]])
    context = len(ids)
    assert FACT_DEPTH[0] * 0.5 < spans[0][0] / context < FACT_DEPTH[1] + 0.05
    assert spec["question"] in tokenizer.decode(ids[spans[-1][1] :])


@pytest.mark.model
@pytest.mark.parametrize("task", ["prose-name", "two-hop"])
def test_held_out_facts_sit_in_the_first_half(tokenizer, task):
    level, new, corpus = 600, 16, docs_corpus()
    for index in range(4):
        spec = build_prompt(tokenizer, level, new, sample_rng(7, level, index), corpus, task, HELD_OUT_FACT_DEPTH)
        assert all(end / len(spec["prompt_ids"]) < HELD_OUT_FACT_DEPTH[1] + 0.1 for _, end in spec["fact_spans"])


def test_fact_depths_stay_in_their_range_and_two_facts_a_fifth_apart():
    for seed in range(50):
        for within in (FACT_DEPTH, HELD_OUT_FACT_DEPTH):
            (one,) = fact_depths(1, random.Random(seed), within)
            first, second = fact_depths(2, random.Random(seed), within)
            assert within[0] <= one <= within[1] and within[0] <= first and second <= within[1]
            assert second - first >= 0.2
    with pytest.raises(ValueError, match="too narrow"):
        fact_depths(2, random.Random(0), (0.1, 0.25))


def test_natural_text_needles_ask_for_their_label_and_differ_by_seed():
    for task in PROSE_TASKS:
        a, b = make_prose_needle(task, random.Random(1)), make_prose_needle(task, random.Random(2))
        assert a != b and a.target in a.facts[-1] and a.expected == (a.target,)
        project = next(w for w in a.question.split() if w[0].isupper() and w in a.facts[0])
        assert project in a.facts[0]  # the label the question asks by is in the (first) fact
    with pytest.raises(ValueError, match="unknown natural-text task"):
        make_prose_needle("riddle", random.Random(0))


@pytest.mark.model
def test_samples_are_deterministic_per_seed_and_differ_across_seeds(tokenizer):
    corpus = docs_corpus()
    a = build_prompt(tokenizer, 300, 8, sample_rng(0, 300, 1), corpus)
    b = build_prompt(tokenizer, 300, 8, sample_rng(0, 300, 1), corpus)
    c = build_prompt(tokenizer, 300, 8, sample_rng(1, 300, 1), corpus)
    assert a == b and a["prompt_ids"] != c["prompt_ids"]


def test_every_task_occurs():
    seen = {TASKS[random.Random(f"0:1024:{i}").randrange(len(TASKS))] for i in range(30)}
    assert seen == set(TASKS)


@pytest.mark.model
def test_too_short_level_is_refused(tokenizer):
    with pytest.raises(ValueError, match="no room"):
        build_prompt(tokenizer, 60, 16, sample_rng(0, 60, 0), "")


@pytest.mark.model
def test_answer_is_the_dense_greedy_continuation_cut_after_the_end_token(model, tokenizer):
    spec = build_prompt(tokenizer, 200, 8, sample_rng(0, 200, 0), docs_corpus())
    eos = eos_token_ids(model, tokenizer)
    answer = greedy_answer(model, spec["prompt_ids"], 8, eos)
    ids = torch.tensor([spec["prompt_ids"]])
    expected = []
    with torch.no_grad():
        for _ in range(8):  # greedy by hand
            nxt = int(model(ids).logits[0, -1].argmax())
            expected.append(nxt)
            if nxt in eos:
                break
            ids = torch.cat([ids, torch.tensor([[nxt]])], dim=1)
    assert answer == expected
    sample = make_sample(model, tokenizer, 200, 0, 0, 8, docs_corpus(), eos)
    assert sample.answer_ids == answer and sample.length <= 200


def test_tasks_go_round_robin_over_slots():
    assert [slot_task(i) for i in range(2 * len(TASKS))] == [*TASKS, *TASKS]
    assert [slot_task(i, ("passkey", "two-hop")) for i in range(3)] == ["passkey", "two-hop", "passkey"]


@pytest.mark.parametrize(
    ("answer", "expected", "ok"),
    [
        ("The pass key is 12345.", ("12345",), True),
        ("The pass key is 12354.", ("12345",), False),
        ("Mara arrived carrying a Letter.", ("Mara", "letter"), True),
        ("Mara arrived.", ("Mara", "letter"), False),
    ],
)
def test_answer_check(answer: str, expected: tuple[str, ...], ok: bool):
    assert answer_is_correct(answer, expected) is ok


@pytest.mark.model
def test_a_slot_the_model_always_answers_wrong_is_dropped_after_its_attempts(model, tokenizer):
    eos = eos_token_ids(model, tokenizer)
    result = fill_slot(model, tokenizer, 200, 0, 0, 4, docs_corpus(), eos, attempts=2, check_answers=True)
    assert result.sample is None and result.attempts == 2  # a random model never says the key
    kept = fill_slot(model, tokenizer, 200, 0, 0, 4, docs_corpus(), eos, attempts=2, check_answers=False)
    assert kept.sample is not None and kept.sample.task == slot_task(0) and kept.sample.expected
