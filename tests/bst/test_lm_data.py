"""Token streams for the LM: EOS between files, windows cut from the stream, held-out documents from their start."""

from __future__ import annotations

import pytest
import torch

from moa_vllm.bst.corpus import SourceFile
from moa_vllm.bst.lm_data import encode_files, join_stream, long_documents, sample_windows
from moa_vllm.bst.tokenizer import eos_id, train_tokenizer


def test_stream_joins_files_with_eos_and_decodes_back() -> None:
    files = [SourceFile("a.py", "x = 1\n"), SourceFile("b.py", "def f():\n    pass\n")]
    tok = train_tokenizer([f.text for f in files] * 5, vocab_size=280)
    encoded = encode_files(tok, files)
    stream = join_stream(tok, encoded)
    assert stream.dtype == torch.int32
    eos = eos_id(tok)
    assert (stream == eos).sum() == 2 and stream[-1] == eos
    cut = int((stream == eos).nonzero()[0])
    assert tok.decode(stream[:cut].tolist()) == files[0].text


def test_windows_are_contiguous_slices_of_the_stream() -> None:
    stream = torch.arange(1000, dtype=torch.int32)
    windows = sample_windows(stream, batch=6, length=50, generator=torch.Generator().manual_seed(0))
    assert windows.shape == (6, 51) and windows.dtype == torch.long
    assert (windows.diff(dim=1) == 1).all() and windows.max() < 1000
    with pytest.raises(ValueError, match="shorter than a window"):
        sample_windows(stream[:10], 1, 10, torch.Generator())


def test_long_documents_keep_only_files_long_enough_cut_from_the_start() -> None:
    encoded = {"b.py": torch.arange(30, dtype=torch.int32), "a.py": torch.arange(5), "c.py": torch.arange(20)}
    docs = long_documents(encoded, 20)
    assert [name for name, _ in docs] == ["b.py", "c.py"]
    assert all(torch.equal(ids, torch.arange(20)) for _, ids in docs)
