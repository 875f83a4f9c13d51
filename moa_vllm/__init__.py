"""moa-vllm: MoA mixed sparse attention for vLLM, plus its offline planner."""

__version__ = "0.1.0"


def register() -> None:
    """vLLM general-plugin entry point (group ``vllm.general_plugins``).

    Kept import-light: vLLM is imported only inside the plugin package, so ``moa_vllm.plan`` and the planner stay
    usable without vLLM installed.
    """
    from moa_vllm.vllm_plugin import register as _register

    _register()
