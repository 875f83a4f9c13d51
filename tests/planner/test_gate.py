"""The ship gate and the choice: beat uniform on every held-out measure; the lowest loss among those that do."""

from __future__ import annotations

import pytest

from moa_vllm.planner.gate import Scores, choose

UNIFORM = Scores(loss=3.0, kl=0.010, top1=0.970)


def test_the_lowest_loss_that_beats_uniform_everywhere_wins():
    candidates = {
        "a": Scores(1.9, 0.012, 0.960),  # lowest loss, worse fidelity than uniform
        "b": Scores(2.0, 0.005, 0.975),
        "c": Scores(2.1, 0.004, 0.980),
    }
    choice = choose(candidates, UNIFORM, 0.5, "here")
    assert choice.name == "b" and choice.verdict is None


def test_no_passing_candidate_names_the_best_and_its_shortfalls():
    candidates = {"a": Scores(1.9, 0.012, 0.960), "b": Scores(3.5, 0.001, 0.990)}
    choice = choose(candidates, UNIFORM, 0.25, "true loss at N=3072")
    assert choice.name == "a"
    assert choice.verdict is not None
    assert "density 0.25" in choice.verdict and "true loss at N=3072" in choice.verdict
    assert "KL 0.01200 vs 0.01000" in choice.verdict and "top-1 0.9600 vs 0.9700 (-0.0100)" in choice.verdict
    assert "true loss 1.9" not in choice.verdict  # it beats uniform there


def test_equal_is_not_better_and_unmeasured_fidelity_is_loss_only():
    assert Scores(3.0).shortfalls(UNIFORM)  # equal loss loses
    assert Scores(2.0, 0.010, 0.99).shortfalls(UNIFORM)  # equal KL loses
    assert not Scores(2.0).shortfalls(Scores(3.0))
    with pytest.raises(ValueError):
        choose({}, UNIFORM, 0.5, "")


def test_a_candidate_that_loses_natural_text_retrieval_to_uniform_does_not_ship():
    uniform = Scores(3.0, 0.010, 0.970, retrieval=1.5)
    candidates = {
        "a": Scores(1.9, 0.005, 0.980, retrieval=1.6),  # best loss and fidelity, worse at finding facts in prose
        "b": Scores(2.0, 0.006, 0.975, retrieval=0.7),
    }
    assert choose(candidates, uniform, 0.5, "here").name == "b"
    verdict = choose({"a": candidates["a"]}, uniform, 0.5, "here").verdict
    assert verdict is not None and "natural-text retrieval loss 1.60000 vs 1.50000" in verdict
    assert not Scores(2.0, retrieval=None).shortfalls(uniform)  # unmeasured: the other measures decide
