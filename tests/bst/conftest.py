"""The BST tests are many tiny tensor ops: intra-op threads only add OpenMP barrier waits (100x slower FFTs on a
busy 2-core machine), so they run single-threaded and restore the setting afterwards."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch


@pytest.fixture(autouse=True, scope="module")
def _single_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
