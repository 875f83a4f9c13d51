"""Fixtures shared by the planner tests."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.planner.tiny_llama import save_tiny_llama


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    """The tiny random llama saved as a HF folder (once per test module)."""
    return save_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))
