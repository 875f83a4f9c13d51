"""How the patches (patches.py) install and recognise their wrappers, and the check that the model runner in use
carries the hook that publishes its batches. Imports nothing of the plugin, so the backend can run the check
without importing the patches."""

from __future__ import annotations

from collections.abc import Callable

MARK = "_moa_vllm_patched"  # set on every wrapper this plugin installs
V2_RUNNER_MODULE = "vllm.v1.worker.gpu.model_runner"


def wrap_once(owner: type, attr: str, make: Callable[[Callable], Callable], classmethod_: bool = False) -> None:
    """Replace owner.attr by make(original) unless already done; classmethods keep their binding."""
    current = owner.__dict__.get(attr)
    if current is not None and getattr(getattr(current, "__func__", current), MARK, False):
        return
    original = getattr(owner, attr)  # bound for classmethods
    new = make(original)
    setattr(new, MARK, True)
    new._moa_vllm_original = original  # what vLLM defined (the canary tests read its signature)
    setattr(owner, attr, classmethod(new) if classmethod_ else new)


def v2_runner():
    """Model runner V2's class, or None where it cannot be imported (its GPU dependencies are missing)."""
    try:
        from vllm.v1.worker.gpu.model_runner import GPUModelRunner as RunnerV2
    except ImportError:
        return None
    return RunnerV2


def hooked(owner, attr: str) -> bool:
    return getattr(owner.__dict__.get(attr), MARK, False)


def check_runner_hooks(vllm_config) -> None:
    """The runner that will serve must carry the hook that publishes its batches: without it every step would fail
    (or, before these checks, attend with spans of 0). Raised at config time and again in each worker's builders."""
    from moa_vllm.plan import PlanError

    if not getattr(vllm_config, "use_v2_model_runner", False):
        from vllm.v1.worker.gpu_model_runner import GPUModelRunner

        missing = [a for a in ("_build_attention_metadata", "_dummy_run") if not hooked(GPUModelRunner, a)]
        where = "vllm.v1.worker.gpu_model_runner.GPUModelRunner"
    else:
        runner_v2 = v2_runner()
        if runner_v2 is None:
            raise PlanError(
                f"moa-vllm: model runner V2 is selected but {V2_RUNNER_MODULE} cannot be imported, so the moa hook "
                "that publishes each batch's requests is missing; set VLLM_USE_V2_MODEL_RUNNER=0"
            )
        from vllm.v1.worker.gpu import cudagraph_utils

        missing = [a for a in ("prepare_attn", "prepare_dummy_attn") if not hooked(runner_v2, a)]
        missing += [] if hooked(cudagraph_utils, "prepare_inputs_to_capture") else ["prepare_inputs_to_capture"]
        where = f"{V2_RUNNER_MODULE}.GPUModelRunner"
    if missing:
        raise PlanError(
            f"moa-vllm: the model runner hook on {where}.{'/'.join(missing)} is not installed (register() did not "
            "run in this process?); refusing to serve without knowing which request each batch row is"
        )
