"""The stdlib corpus: which files it takes, and a per-file split that is stable and disjoint."""

from __future__ import annotations

from pathlib import Path

from moa_vllm.bst.corpus import corpus_digest, is_heldout, source_files, split_files


def write(root: Path, rel: str, text: str) -> None:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(text.encode("utf-8") if isinstance(text, str) else text)


def test_source_files_skip_tests_site_packages_empty_and_non_utf8(tmp_path: Path) -> None:
    write(tmp_path, "os.py", "import sys\n")
    write(tmp_path, "json/decoder.py", "x = 1\n")
    write(tmp_path, "test/test_os.py", "assert True\n")
    write(tmp_path, "site-packages/pkg/mod.py", "y = 2\n")
    write(tmp_path, "empty.py", "\n\n")
    write(tmp_path, "notes.txt", "not python\n")
    (tmp_path / "latin1.py").write_bytes("s = 'caf\xe9'\n".encode("latin-1"))
    files = source_files(tmp_path)
    assert [f.relpath for f in files] == ["json/decoder.py", "os.py"]
    assert files[1].text == "import sys\n"


def test_split_is_by_file_deterministic_and_near_the_percentage() -> None:
    names = [f"pkg{i // 50}/mod{i}.py" for i in range(2000)]
    held = [n for n in names if is_heldout(n)]
    assert held == [n for n in names if is_heldout(n)]  # pure function of the path
    assert 150 < len(held) < 250  # 10% of 2000, give or take hashing noise
    assert all(is_heldout(n, 100) for n in names) and not any(is_heldout(n, 0) for n in names)


def test_split_files_partition_and_digest_names_the_content(tmp_path: Path) -> None:
    for i in range(60):
        write(tmp_path, f"m{i}.py", f"value = {i}\n")
    files = source_files(tmp_path)
    train, heldout = split_files(files)
    assert heldout and train
    assert sorted(f.relpath for f in train + heldout) == sorted(f.relpath for f in files)
    assert not {f.relpath for f in train} & {f.relpath for f in heldout}
    assert corpus_digest(train) == corpus_digest(list(train))
    write(tmp_path, train[0].relpath, "value = -1\n")
    assert corpus_digest(split_files(source_files(tmp_path))[0]) != corpus_digest(train)
