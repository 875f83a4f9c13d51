"""moa-vllm: MoA mixed sparse attention for vLLM, plus its offline planner."""

from moa_vllm.version import __version__

__all__ = ["__version__", "register"]


def register() -> None:
    """vLLM general-plugin entry point (group ``vllm.general_plugins``).

    Kept import-light: vLLM is imported only inside the plugin package, so ``moa_vllm.plan`` and the planner stay
    usable without vLLM installed.
    """
    from moa_vllm.vllm_plugin import register as _register

    _register()
