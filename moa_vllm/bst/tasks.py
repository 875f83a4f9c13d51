"""Synthetic long-range tasks for the Block-State Transformer: each sample is a prompt and the answer tokens that
greedy decoding must produce after it.

* ``recall``: one signal token sits early in a long run of noise; the prompt ends with a query token and the answer
  is the signal. With the signal placed further back than the attention window, only the SSM can carry it.
* ``copy`` (selective copying, Gu & Dao 2023): a few data tokens are scattered among blanks; the prompt ends with a
  copy marker and the answer is the data tokens in order.

Training uses the teacher-forced sequence ``prompt + answer[:-1]`` with the loss on the last ``len(answer)``
positions, so one parallel forward scores exactly what greedy decoding of the prompt would produce.
Samples come from a ``torch.Generator``: fixed seeds give reproducible training and held-out sets.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import torch
from torch import Tensor

IGNORE_INDEX = -100  # torch.nn.functional.cross_entropy's default ignore_index


class Task(Protocol):
    """What training, evaluation and serving need from a task."""

    name: str

    @property
    def vocab_size(self) -> int: ...

    @property
    def answer_length(self) -> int: ...

    @property
    def chance(self) -> float: ...

    def sample(self, batch: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """``(prompts (batch, P), answers (batch, answer_length))``, token ids."""
        ...

    def to_dict(self) -> dict[str, Any]: ...

    def plain(self) -> Task:
        """The evaluation form of the task: the training-only variations switched off."""
        ...


@dataclass(frozen=True)
class RecallTask:
    """Recall the only signal token of a noisy sequence.

    Vocabulary: signals ``[0, num_signals)``, noise ``[num_signals, num_signals + num_noise)``, then the query token.
    The signal is at a uniform position in ``[0, signal_region)`` (default: the first quarter); the query is the
    last prompt token, so the signal is at least ``seq_len - signal_region`` tokens back.

    Two training-only variations, both off by default (the evaluation task is the plain one):

    * ``min_seq_len``: each batch has a length drawn uniformly from ``[min_seq_len, seq_len]`` (the signal region
      scales with it), so the model cannot tie what it reads from the SSM to one sequence length.
    * ``noise_mix="subset"``: each sample draws its noise from a random non-empty subset of the noise tokens
      (down to one noise token repeated), so cancelling the *mean* noise input is not enough. Measured: on its own
      it did not make recall hold past the trained length; the shipped recipe uses uniform noise with the SSM input
      gate and its L1 penalty instead (``benchmarks/bst_recall.py``).
    """

    seq_len: int = 128
    num_signals: int = 16
    num_noise: int = 16
    signal_region: int | None = None
    min_seq_len: int | None = None
    noise_mix: Literal["uniform", "subset"] = "uniform"
    name: str = "recall"

    def __post_init__(self) -> None:
        if self.signal_region is None:
            object.__setattr__(self, "signal_region", self.seq_len // 4)
        if not 0 < self.signal_region < self.seq_len:
            raise ValueError("need 0 < signal_region < seq_len")
        if self.num_signals < 2 or self.num_noise < 1:
            raise ValueError("need at least 2 signal tokens and 1 noise token")
        if self.min_seq_len is not None and not 2 <= self.min_seq_len <= self.seq_len:
            raise ValueError(f"need 2 <= min_seq_len <= seq_len={self.seq_len}, got {self.min_seq_len}")
        if self.noise_mix not in ("uniform", "subset"):
            raise ValueError(f"noise_mix must be 'uniform' or 'subset', got {self.noise_mix!r}")

    @property
    def query_token(self) -> int:
        return self.num_signals + self.num_noise

    @property
    def vocab_size(self) -> int:
        return self.query_token + 1

    @property
    def answer_length(self) -> int:
        return 1

    @property
    def chance(self) -> float:
        return 1 / self.num_signals

    def plain(self, seq_len: int | None = None) -> RecallTask:
        """Fixed length (``seq_len``, default this task's), uniform noise, signal in the first quarter unless this
        task set its own region at its own length."""
        length = seq_len or self.seq_len
        region = self.signal_region if length == self.seq_len else None
        return dataclasses.replace(self, seq_len=length, signal_region=region, min_seq_len=None, noise_mix="uniform")

    @property
    def min_distance(self) -> int:
        """Smallest distance from the query back to the signal."""
        return self.seq_len - self.signal_region

    def sample(self, batch: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        length, region = self.seq_len, self.signal_region
        if self.min_seq_len is not None:
            length = int(torch.randint(self.min_seq_len, self.seq_len + 1, (1,), generator=generator))
            region = max(1, min(length - 1, round(length * self.signal_region / self.seq_len)))
        ids = self._noise(batch, length, generator)
        signal = torch.randint(0, self.num_signals, (batch,), generator=generator)
        where = torch.randint(0, region, (batch,), generator=generator)
        ids[torch.arange(batch), where] = signal
        ids[:, -1] = self.query_token
        return ids, signal[:, None]

    def _noise(self, batch: int, length: int, generator: torch.Generator) -> Tensor:
        """Noise token ids ``(batch, length)``, in ``[num_signals, query_token)``."""
        if self.noise_mix == "uniform":
            return torch.randint(self.num_signals, self.query_token, (batch, length), generator=generator)
        sizes = torch.randint(1, self.num_noise + 1, (batch, 1), generator=generator)
        subsets = torch.rand(batch, self.num_noise, generator=generator).argsort(-1)  # first `size` are the subset
        pick = (torch.rand(batch, length, generator=generator) * sizes).long()
        return self.num_signals + subsets.gather(1, pick)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class SelectiveCopyTask:
    """Copy the ``num_data`` data tokens scattered among blanks, in order, after the copy marker.

    Vocabulary: data ``[0, num_data_values)``, then the blank, then the copy marker. The prompt is ``seq_len``
    tokens: ``seq_len - 1`` blanks/data and the marker.
    """

    seq_len: int = 256
    num_data: int = 4
    num_data_values: int = 8
    name: str = "copy"

    def __post_init__(self) -> None:
        if not 0 < self.num_data < self.seq_len - 1:
            raise ValueError("need 0 < num_data < seq_len - 1")
        if self.num_data_values < 2:
            raise ValueError("need at least 2 data values")

    def plain(self) -> SelectiveCopyTask:
        return self

    @property
    def blank_token(self) -> int:
        return self.num_data_values

    @property
    def copy_token(self) -> int:
        return self.num_data_values + 1

    @property
    def vocab_size(self) -> int:
        return self.num_data_values + 2

    @property
    def answer_length(self) -> int:
        return self.num_data

    @property
    def chance(self) -> float:
        return 1 / self.num_data_values

    def sample(self, batch: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        body = self.seq_len - 1
        ids = torch.full((batch, self.seq_len), self.blank_token, dtype=torch.long)
        data = torch.randint(0, self.num_data_values, (batch, self.num_data), generator=generator)
        # num_data distinct positions per row, sorted so the answer order is the order of appearance.
        where = torch.rand(batch, body, generator=generator).argsort(-1)[:, : self.num_data].sort(-1).values
        ids.scatter_(1, where, data)
        ids[:, -1] = self.copy_token
        return ids, data

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


TASKS: dict[str, type[RecallTask] | type[SelectiveCopyTask]] = {"recall": RecallTask, "copy": SelectiveCopyTask}


def make_task(name: str, **params: Any) -> Task:
    """Task by name (``recall`` or ``copy``) with optional overrides of its defaults."""
    try:
        cls = TASKS[name]
    except KeyError:
        raise ValueError(f"unknown task {name!r}; expected one of {sorted(TASKS)}") from None
    return cls(**params)


def task_from_dict(data: dict[str, Any]) -> Task:
    """Inverse of ``to_dict`` (the ``name`` field picks the class)."""
    params = dict(data)
    return make_task(params.pop("name"), **params)


def teacher_forced(prompts: Tensor, answers: Tensor) -> tuple[Tensor, Tensor]:
    """Input ids ``prompt + answer[:-1]`` and targets that are the answer at the last ``A`` positions, else ignored."""
    ids = torch.cat([prompts, answers[:, :-1]], dim=1)
    targets = torch.full_like(ids, IGNORE_INDEX)
    targets[:, -answers.shape[1] :] = answers
    return ids, targets
