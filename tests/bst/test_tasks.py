"""Synthetic tasks: the samples hold what the task promises, reproducibly."""

from __future__ import annotations

import pytest
import torch

from moa_vllm.bst.tasks import (
    IGNORE_INDEX,
    RecallTask,
    SelectiveCopyTask,
    make_task,
    task_from_dict,
    teacher_forced,
)


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_recall_sample_has_one_early_signal_and_a_final_query() -> None:
    task = RecallTask(seq_len=64, signal_region=16)
    prompts, answers = task.sample(200, gen())
    assert prompts.shape == (200, 64) and answers.shape == (200, 1)
    assert prompts.min() >= 0 and prompts.max() < task.vocab_size
    assert (prompts[:, -1] == task.query_token).all()
    is_signal = prompts < task.num_signals
    assert (is_signal.sum(1) == 1).all()
    where = is_signal.float().argmax(1)
    assert (where < task.signal_region).all()
    assert torch.equal(prompts[torch.arange(200), where], answers[:, 0])
    assert task.min_distance == 48 and task.chance == 1 / 16
    # Every signal value and a spread of positions occur: the task is not degenerate.
    assert len(answers.unique()) == task.num_signals and len(where.unique()) > 10


def test_selective_copy_answer_is_the_data_in_order() -> None:
    task = SelectiveCopyTask(seq_len=40, num_data=5, num_data_values=6)
    prompts, answers = task.sample(100, gen())
    assert prompts.shape == (100, 40) and answers.shape == (100, 5)
    assert (prompts[:, -1] == task.copy_token).all()
    body = prompts[:, :-1]
    for row, answer in zip(body, answers):
        assert torch.equal(row[row != task.blank_token], answer)
    assert answers.max() < task.num_data_values and task.vocab_size == 8


@pytest.mark.parametrize("name", ["recall", "copy"])
def test_samples_are_reproducible_and_seed_dependent(name: str) -> None:
    task = make_task(name, seq_len=32)
    a, b, c = task.sample(8, gen(1)), task.sample(8, gen(1)), task.sample(8, gen(2))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])


@pytest.mark.parametrize("name", ["recall", "copy"])
def test_task_dict_round_trip(name: str) -> None:
    task = make_task(name, seq_len=48)
    assert task_from_dict(task.to_dict()) == task


def test_bad_tasks_are_rejected() -> None:
    with pytest.raises(ValueError):
        make_task("sort")
    with pytest.raises(ValueError):
        RecallTask(seq_len=10, signal_region=10)
    with pytest.raises(ValueError):
        SelectiveCopyTask(seq_len=5, num_data=4)


def test_teacher_forced_targets_are_the_answer_after_the_prompt() -> None:
    prompts = torch.tensor([[1, 2, 3, 9], [4, 5, 6, 9]])
    answers = torch.tensor([[7, 8, 0], [1, 1, 2]])
    ids, targets = teacher_forced(prompts, answers)
    assert torch.equal(ids, torch.tensor([[1, 2, 3, 9, 7, 8], [4, 5, 6, 9, 1, 1]]))
    assert (targets[:, :3] == IGNORE_INDEX).all()
    assert torch.equal(targets[:, 3:], answers)


def test_recall_mixed_lengths_stay_in_range_and_scale_the_signal_region() -> None:
    task = RecallTask(seq_len=64, min_seq_len=16)
    g = gen(3)
    lengths = set()
    for _ in range(40):
        prompts, answers = task.sample(8, g)
        length = prompts.shape[1]
        lengths.add(length)
        assert 16 <= length <= 64 and (prompts[:, -1] == task.query_token).all()
        where = (prompts < task.num_signals).float().argmax(1)
        assert (where < max(1, round(length / 4))).all()
        assert torch.equal(prompts[torch.arange(8), where], answers[:, 0])
    assert len(lengths) > 10  # the length really varies from batch to batch


def test_recall_subset_noise_is_skewed_but_stays_noise() -> None:
    uniform, subset = RecallTask(seq_len=200), RecallTask(seq_len=200, noise_mix="subset")
    for task in (uniform, subset):
        prompts, _ = task.sample(64, gen(4))
        noise = prompts[:, :-1]
        assert ((noise < task.num_signals).sum(1) == 1).all()  # still exactly one signal
        assert (noise[noise >= task.num_signals] < task.query_token).all()
    distinct = lambda t: torch.tensor([len(r[r >= t.num_signals].unique()) for r in t.sample(64, gen(4))[0][:, :-1]])  # noqa: E731
    assert (distinct(uniform) == uniform.num_noise).all()
    used = distinct(subset)
    assert used.min() == 1 and used.max() == subset.num_noise and len(used.unique()) > 8


def test_recall_rejects_bad_training_variations() -> None:
    with pytest.raises(ValueError, match="min_seq_len"):
        RecallTask(seq_len=64, min_seq_len=65)
    with pytest.raises(ValueError, match="noise_mix"):
        RecallTask(noise_mix="zipf")  # type: ignore[arg-type]


def test_plain_recall_drops_the_training_variations() -> None:
    task = RecallTask(seq_len=128, min_seq_len=32, noise_mix="subset")
    plain = task.plain()
    assert plain == RecallTask(seq_len=128) and plain.sample(4, gen())[0].shape == (4, 128)
    longer = task.plain(1024)
    assert longer.seq_len == 1024 and longer.signal_region == 256 and longer.noise_mix == "uniform"
    copy = SelectiveCopyTask()
    assert copy.plain() is copy
