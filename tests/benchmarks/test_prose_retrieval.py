"""The natural-prose retrieval harness: corpora kept apart from the planner's text, needles placed token-exactly at
their depths, answers scored by whole words, intervals and paired ratios; one small real run through the engine."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.prose_retrieval import corpora
from benchmarks.prose_retrieval.needles import FORMS, MULTI_FORMS, SINGLE_FORMS, is_correct, make_needle
from benchmarks.prose_retrieval.results import heads_seeing_facts, paired_ratio, wilson
from benchmarks.prose_retrieval.tasks import build_case, build_grid, frame_ids
from moa_vllm.plan import dense_plan, fingerprint_from_hf_config, load_hf_config, window_plan
from moa_vllm.planner.calibrate import docs_corpus
from tests.conftest import REPO
from tests.planner.tiny_llama import save_tiny_llama, tiny_tokenizer


@pytest.fixture(scope="module")
def tiny_tok():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def corpus():
    return corpora.load("stdlib-docstrings")  # shipped with every CPython


def test_a_needle_is_a_function_of_its_seed_and_every_value_must_come_back_as_a_word():
    assert make_needle("number", "a") == make_needle("number", "a") != make_needle("number", "b")
    code = make_needle("number", "a").expected[0]
    assert is_correct(make_needle("number", "a"), f"The code is {code}.")
    assert not is_correct(make_needle("number", "a"), f"The code is {code}7.")  # inside a longer number
    two = make_needle("two-needles", "x")
    assert len(two.facts) == 2 and not is_correct(two, two.expected[0])
    assert is_correct(two, f"{two.expected[1]} and {two.expected[0]}")
    with pytest.raises(ValueError, match="unknown needle form"):
        make_needle("riddle", "x")


def test_every_corpus_here_is_prose_apart_from_the_planners_calibration_text():
    names = corpora.available()
    assert "stdlib-docstrings" in names
    planner_text = docs_corpus()
    for name in names:
        paragraphs = corpora.load(name).paragraphs
        assert len(paragraphs) >= corpora.MIN_PARAGRAPHS
        sample = paragraphs[:: max(1, len(paragraphs) // 40)]
        assert not [p for p in sample if p in planner_text], name


@pytest.mark.parametrize("depth", [0.0, 0.3, 1.0])
def test_the_fact_sits_at_its_depth_and_decodes_to_itself(tiny_tok, corpus, depth):
    case = build_case(tiny_tok, corpus, "name", 600, (depth,), 0, 24)
    assert case.prompt_tokens <= 600 - 24
    ((start, end),) = case.fact_spans
    assert tiny_tok.decode(case.prompt_ids[start:end]).strip() == case.needle.facts[0].strip()
    head, tail = frame_ids(tiny_tok, case.needle.question)
    assert case.prompt_ids[: len(head)] == head and case.prompt_ids[-len(tail) :] == tail
    prose = case.prompt_tokens - len(head) - len(tail) - (end - start)
    before = start - len(head)
    assert abs(before - depth * prose) <= 200  # at the paragraph boundary nearest the depth
    if depth == 0.0:
        assert start == len(head)
    if depth == 1.0:
        assert end == case.prompt_tokens - len(tail)


def test_two_facts_come_in_depth_order(tiny_tok, corpus):
    case = build_case(tiny_tok, corpus, "two-hop", 900, (0.1, 0.8), 1, 24)
    (a0, a1), (b0, b1) = case.fact_spans
    assert a1 <= b0 and b0 - a1 > 300
    with pytest.raises(ValueError, match="depths"):
        build_case(tiny_tok, corpus, "two-hop", 900, (0.8, 0.1), 1, 24)
    with pytest.raises(ValueError, match="facts"):
        build_case(tiny_tok, corpus, "number", 900, (0.1, 0.8), 1, 24)


def test_the_grid_has_every_form_at_every_cell_and_rotates_the_corpora(tiny_tok, corpus):
    other = corpora.Corpus("copy", corpus.paragraphs[::-1])
    cases = build_grid(tiny_tok, [corpus, other], [400, 600], (0.0, 1.0), ((0.2, 0.7),), seeds=1, answer_tokens=16)
    assert len(cases) == len(SINGLE_FORMS) * 2 * 2 + len(MULTI_FORMS) * 2
    assert {c.form for c in cases} == set(FORMS) and {c.corpus for c in cases} == {"stdlib-docstrings", "copy"}
    assert len({tuple(c.prompt_ids) for c in cases}) == len(cases)


def test_the_answer_budget_is_per_value_asked_for(tiny_tok, corpus):
    one, two = (
        build_case(tiny_tok, corpus, f, 900, d, 0, 16)
        for f, d in (("two-hop", (0.1, 0.8)), ("two-needles", (0.1, 0.8)))
    )
    assert (one.max_tokens, two.max_tokens) == (16, 32)  # two codes come back, each after its restated label
    assert one.prompt_tokens <= 900 - 16 and two.prompt_tokens <= 900 - 32


def test_a_stored_answer_is_kept_only_for_the_same_plan_prompt_budget_and_settings(tiny_tok, corpus):
    from benchmarks.prose_retrieval.cli import RESULT_KIND, stored_answers
    from benchmarks.prose_retrieval.results import SPAN_GRID, prompt_sha

    case = build_case(tiny_tok, corpus, "number", 600, (0.5,), 0, 24)
    record = {"prompt_sha": prompt_sha(case), "max_tokens": case.max_tokens, "answer": "x"}
    old = {
        "kind": RESULT_KIND,
        "plan": {"sha256": "p"},
        "model": "m",
        "settings": {"max_model_len": 2048, "span_grid": SPAN_GRID},
        "cases": [record],
    }
    assert stored_answers(old, "p", "m", 2048) == {(prompt_sha(case), 24): record}
    assert stored_answers(old, "other plan", "m", 2048) == {}
    assert stored_answers(old, "p", "other model", 2048) == {}
    assert stored_answers(old, "p", "m", 4096) == {}
    assert prompt_sha(build_case(tiny_tok, corpus, "number", 600, (0.5,), 1, 24)) != prompt_sha(case)


def test_intervals_and_paired_ratios():
    low, high = wilson(0, 10)
    assert low == 0.0 and abs(high - 0.2775) < 1e-3
    low, high = wilson(5, 10)
    assert abs(low - 0.2366) < 1e-3 and abs(high - 0.7634) < 1e-3
    ref = [{"form": "f", "corpus": "c", "length": 1, "depths": [0.0], "seed": s, "correct": True} for s in range(20)]
    same = paired_ratio(ref, ref)
    assert same["ratio"] == 1.0 and same["ci95"] == [1.0, 1.0]
    half = [{**r, "correct": r["seed"] % 2 == 0} for r in ref]
    got = paired_ratio(half, ref)
    assert got["ratio"] == 0.5 and got["ci95"][0] < 0.5 < got["ci95"][1]


def test_the_span_grid_is_the_servers():
    from benchmarks.prose_retrieval.results import SPAN_GRID
    from moa_vllm.vllm_plugin.settings import DEFAULT_SPAN_GRID

    assert SPAN_GRID == DEFAULT_SPAN_GRID


def test_heads_seeing_facts_follows_the_plans_windows(tmp_path: Path, tiny_tok, corpus):
    fp = fingerprint_from_hf_config(load_hf_config(save_tiny_llama(tmp_path)))
    case = build_case(tiny_tok, corpus, "number", 600, (0.0,), 0, 24)
    assert heads_seeing_facts(dense_plan(fp), case, 2048) == 1.0
    assert heads_seeing_facts(window_plan(fp, 64), case, 2048) == 0.0  # the fact is far behind


@pytest.mark.engine
def test_a_small_run_through_the_engine_writes_results_summary_and_figures(tmp_path: Path):
    from benchmarks.prose_retrieval.cli import PLANS, main

    out = tmp_path / "out"
    plans = [str(PLANS / "dense.json"), str(PLANS / "uniform-d0.25.json")]
    grid = ["--lengths", "1024", "--depths", "0.5", "--corpora", "stdlib-docstrings", "--max-model-len", "2048"]
    argv = ["--plans", *plans, *grid, "--out", str(out)]
    # its own process, as a user runs it (an engine in this process would keep its thread binding for later tests)
    subprocess.run([sys.executable, "-m", "benchmarks.prose_retrieval", *argv], check=True, cwd=REPO)
    dense = json.loads((out / "dense.json").read_text())
    assert dense["grid"]["prompts"] == len(SINGLE_FORMS) + 2 * len(MULTI_FORMS)
    assert all(isinstance(c["answer"], str) and c["answer"] for c in dense["cases"])
    assert all(c["heads_seeing_facts"] == 1.0 for c in dense["cases"])
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["plans"]) == {"dense", "uniform-d0.25"} and summary["reference"] == "dense"
    assert (out / "forms.png").stat().st_size > 0 and (out / "cells.png").stat().st_size > 0
    main([*argv, "--summary-only"])  # the summary rebuilds from the results alone

    # resume per prompt: drop one stored answer; a rerun runs that prompt alone and finds the same answer
    dropped = dense["cases"].pop(1)
    (out / "dense.json").write_text(json.dumps({**dense, "grid": {**dense["grid"], "digest": "stale"}}))
    subprocess.run(
        [sys.executable, "-m", "benchmarks.prose_retrieval", *argv[:1], plans[0], *argv[3:]], check=True, cwd=REPO
    )
    again = json.loads((out / "dense.json").read_text())
    assert (again["prompts_run"], again["prompts_reused"]) == (1, len(again["cases"]) - 1)
    assert again["cases"][1] == dropped
