"""Patch canaries: every vLLM name the plugin patches or relies on, with the parameters it relies on, checked in a
vLLM source tree without importing it (so a wheel of another vLLM version can be read without its dependencies).

Each canary names the patch (patches.PATCHES) or contract it guards. `check_tree(root)` reads the `.py` files under
`root/vllm/`; tests/vllm_plugin/test_canaries.py runs every canary against the installed vLLM (one test each, plus
an import-time signature check), and a vLLM upgrade that moves or reshapes a target fails there, by name, instead
of at serving time.

    python -m moa_vllm.vllm_plugin.canaries                   # the installed vLLM
    python -m moa_vllm.vllm_plugin.canaries --source DIR      # DIR/vllm/... (e.g. an unpacked wheel of another version)
"""

from __future__ import annotations

import argparse
import ast
import importlib.util
import re
import sys
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Canary:
    guards: str  # the patch name in patches.PATCHES, or "contract:<what>" for a hook vLLM calls on us
    module: str  # dotted module path
    qualname: str  # Class.method, function, Class, or a module-level name
    params: tuple[str, ...] = ()  # parameters the plugin passes or reads (functions only)
    kind: str = "def"  # def: function/method; class; name: a module-level binding; field: class attribute(s)

    @property
    def target(self) -> str:
        return f"{self.module}.{self.qualname}"


V1_RUNNER = "vllm.v1.worker.gpu_model_runner"
STM = "vllm.v1.core.single_type_kv_cache_manager"
CPU_OPS = "vllm._custom_ops"
V2_RUNNER = "vllm.v1.worker.gpu.model_runner"
CANARIES: tuple[Canary, ...] = (
    Canary("backend_alias", "vllm.v1.attention.backends.registry", "AttentionBackendEnum", kind="class"),
    Canary("backend_alias", "vllm.v1.attention.backends.registry", "register_backend", ("backend", "class_path")),
    Canary(
        "cpu_backend_selection",
        "vllm.platforms.cpu",
        "CpuPlatform.get_attn_backend_cls",
        ("cls", "selected_backend", "attn_selector_config", "num_heads"),
    ),
    Canary("config_check", "vllm.platforms.cpu", "CpuPlatform.check_and_update_config", ("cls", "vllm_config")),
    Canary("config_check", "vllm.platforms.cuda", "CudaPlatformBase.check_and_update_config", ("cls", "vllm_config")),
    Canary("config_check", "vllm.config.vllm", "VllmConfig.use_v2_model_runner", ("self",)),
    Canary(
        "layer_kv_spec",
        "vllm.model_executor.layers.attention.attention",
        "Attention.get_kv_cache_spec",
        ("self", "vllm_config"),
    ),
    Canary("admission_lengths", "vllm.v1.core.kv_cache_manager", "KVCacheManager.allocate_slots", ("self", "request")),
    Canary("admission_lengths", "vllm.v1.core.kv_cache_manager", "KVCacheManager.free", ("self", "request")),
    Canary(
        "admission_lengths", "vllm.v1.core.kv_cache_manager", "KVCacheManager.get_computed_blocks", ("self", "request")
    ),
    Canary(
        "admission_lengths",
        "vllm.v1.core.kv_cache_manager",
        "KVCacheManager.truncate_computed_blocks",
        ("self", "blocks", "num_computed_tokens"),
    ),
    Canary("prefix_hash", "vllm.v1.request", "Request.update_block_hashes", ("self",)),
    Canary(
        "prefix_hash",
        "vllm.v1.core.kv_cache_utils",
        "generate_block_hash_extra_keys",
        ("request", "start_token_idx", "end_token_idx", "start_mm_idx"),
    ),
    Canary("prefix_hash", "vllm.v1.core.kv_cache_utils", "get_request_block_hasher", ("hash_block_size",)),
    Canary(
        "request_lengths",
        V1_RUNNER,
        "GPUModelRunner._build_attention_metadata",
        ("self", "num_reqs", "num_reqs_padded", "for_cudagraph_capture"),
    ),
    Canary("request_lengths", V1_RUNNER, "GPUModelRunner._dummy_run", ("self", "num_tokens")),
    Canary("request_lengths", V1_RUNNER, "GPUModelRunner._update_states", ("self", "scheduler_output")),
    Canary("request_lengths", "vllm.v1.core.sched.output", "CachedRequestData", ("resumed_req_ids",), kind="field"),
    Canary("request_lengths_v2", V2_RUNNER, "GPUModelRunner.prepare_attn", ("self", "input_batch")),
    Canary("request_lengths_v2", V2_RUNNER, "GPUModelRunner.prepare_dummy_attn", ("self", "input_batch")),
    Canary("request_lengths_v2", V2_RUNNER, "GPUModelRunner.add_requests", ("self", "scheduler_output")),
    Canary("request_lengths_v2", "vllm.v1.worker.gpu.states", "RequestState.add_request", ("self", "prompt_len")),
    Canary("request_lengths_v2", "vllm.v1.worker.cpu.model_runner", "CPUModelRunner", kind="class"),
    Canary(
        "request_lengths_v2",
        "vllm.v1.worker.gpu.cudagraph_utils",
        "prepare_inputs_to_capture",
        ("num_reqs", "num_tokens", "model_state"),
    ),
    Canary("request_lengths_v2", "vllm.v1.worker.gpu.model_states.interface", "ModelState.__init__",
           ("self", "vllm_config")),
    Canary(
        "beam_search", "vllm.entrypoints.generate.beam_search.online", "BeamSearchOnlineMixin.beam_search", ("self",)
    ),
    Canary(
        "beam_search", "vllm.entrypoints.generate.beam_search.offline", "BeamSearchOfflineMixin.beam_search", ("self",)
    ),
    Canary("span_hint", "vllm.sampling_params", "SamplingParams._verify_extra_args", ("self",)),
    Canary("span_hint", "vllm.sampling_params", "SamplingParams._verify_args", ("self",)),
    Canary("span_hint", "vllm.exceptions", "VLLMValidationError", kind="class"),
    Canary("engine_death_exit", "vllm.entrypoints.launchers.api_server.entry", "serve_http", kind="name"),
    Canary("engine_death_exit", "vllm.entrypoints.launchers.launcher", "serve_http", ("app",)),
    Canary("engine_inspect", "vllm.v1.engine.core", "EngineCore", kind="class"),
    Canary("engine_inspect", "vllm.v1.engine.core_client", "AsyncMPClient.call_utility_async", ("self", "method")),
    Canary(
        "contract:capture",
        "vllm.v1.attention.backend",
        "AttentionMetadataBuilder.build_for_cudagraph_capture",
        ("self", "common_attn_metadata"),
    ),
    Canary(
        "contract:auth",
        "vllm.entrypoints.serve.middleware.authenticate",
        "AuthenticationMiddleware.verify_token",
        ("self", "headers"),
    ),
    Canary(
        "contract:auth",
        "vllm.entrypoints.serve.middleware.authenticate",
        "AuthenticationMiddleware.__init__",
        ("self", "app", "tokens"),
    ),
    Canary(
        "contract:endpoint_plugin",
        "vllm.plugins.endpoint_plugins.interface",
        "EndpointPlugin.init_state",
        ("self", "engine_client", "state", "args"),
    ),
    Canary("contract:kv_registry", "vllm.v1.kv_cache_spec_registry", "KVCacheSpecRegistry._ensure_registered"),
    # what the backend reads and the KV manager overrides (moa/backend.py, moa/kv_spec.py)
    Canary(
        "contract:metadata",
        "vllm.v1.attention.backend",
        "CommonAttentionMetadata",
        ("query_start_loc_cpu", "seq_lens", "num_reqs", "num_actual_tokens", "block_table_tensor"),
        kind="field",
    ),
    Canary(
        "contract:layout",
        "vllm.v1.attention.backend",
        "AttentionCGSupport",
        ("UNIFORM_SINGLE_TOKEN_DECODE",),
        kind="field",
    ),
    Canary("contract:layout", "vllm.v1.kv_cache_layout", "KVCacheLayout", ("LBHNC",), kind="field"),
    Canary("contract:layout", "vllm.v1.kv_cache_interface", "KVCacheLayout", kind="name"),  # backend imports it here
    Canary(
        "contract:kv_manager",
        STM,
        "SingleTypeKVCacheManager.get_num_blocks_to_allocate",
        ("self", "request_id", "num_tokens", "new_computed_blocks"),
    ),
    Canary(
        "contract:kv_manager",
        STM,
        "SingleTypeKVCacheManager.allocate_new_blocks",
        ("self", "request_id", "num_tokens", "num_tokens_main_model"),
    ),
    Canary(
        "contract:kv_manager",
        STM,
        "SingleTypeKVCacheManager.remove_skipped_blocks",
        ("self", "request_id", "processed_computed_tokens"),
    ),
    Canary(
        "contract:kv_manager",
        STM,
        "SingleTypeKVCacheManager.find_longest_cache_hit",
        ("cls", "block_hashes", "max_length", "kv_cache_group_ids"),
    ),
    Canary(
        "contract:kv_manager", STM, "SingleTypeKVCacheManager.allocate_external_computed_blocks", ("self", "request_id")
    ),
    Canary(
        "contract:kv_manager", STM, "SingleTypeKVCacheManager.get_num_skipped_tokens", ("self", "num_computed_tokens")
    ),
    Canary("contract:kv_manager", STM, "SingleTypeKVCacheManager.cache_blocks", ("self",)),
    Canary(
        "contract:kv_manager",
        STM,
        "SingleTypeKVCacheManager.add_local_computed_blocks",
        ("self", "request_id", "new_computed_blocks", "num_local_computed_tokens"),
    ),
    Canary("contract:kv_manager", STM, "SingleTypeKVCacheManager.pop_blocks_for_free", ("self", "request_id")),
    Canary(
        "contract:kv_manager",
        "vllm.v1.core.block_pool",
        "BlockPool.cache_full_blocks",
        ("self", "request", "blocks", "num_cached_blocks", "num_full_blocks", "block_size", "kv_cache_group_id"),
    ),
    Canary("contract:kv_manager", "vllm.v1.core.block_pool", "BlockPool.get_cached_block",
           ("self", "block_hash", "kv_cache_group_ids")),  # fmt: skip
    Canary("contract:kv_manager", "vllm.v1.core.block_pool", "BlockPool.touch", ("self", "blocks")),
    Canary(
        "contract:kv_spec", "vllm.v1.kv_cache_interface", "KVCacheSpec.max_num_blocks_per_req",
        ("self", "vllm_config", "max_len"),
    ),  # fmt: skip
    Canary(
        "contract:kv_spec", "vllm.v1.kv_cache_interface", "KVCacheSpec.max_memory_usage_bytes", ("self", "vllm_config")
    ),
    Canary("contract:kv_spec", "vllm.v1.kv_cache_interface", "KVCacheSpec.is_uniform_with_collection", ("self",)),
    Canary("contract:kv_spec", "vllm.v1.kv_cache_interface", "KVCacheSpec.prefix_cacheable", ("self",)),
    # the stock kernels the rings go through (moa/kernels_cpu.py, moa/kernels_cuda.py), with the keywords passed
    Canary("contract:cpu_kernels", CPU_OPS, "cpu_attn_reshape_and_cache"),
    Canary(
        "contract:cpu_kernels",
        CPU_OPS,
        "cpu_attn_get_scheduler_metadata",
        (
            "num_reqs",
            "num_heads",
            "num_kv_heads",
            "head_dim",
            "seq_lens",
            "dtype",
            "query_start_loc",
            "causal",
            "sliding_window_size",
            "isa",
            "enable_kv_split",
        ),
    ),
    Canary(
        "contract:cpu_kernels",
        CPU_OPS,
        "cpu_attention_with_kv_cache",
        (
            "query",
            "key_cache",
            "value_cache",
            "output",
            "query_start_loc",
            "seq_lens",
            "scale",
            "causal",
            "alibi_slopes",
            "sliding_window",
        ),
    ),
    Canary("contract:cpu_kernels", "vllm.v1.attention.backends.cpu_attn", "_get_attn_isa"),
    Canary(
        "contract:kv_registry",
        "vllm.v1.kv_cache_spec_registry",
        "KVCacheSpecRegistry.register",
        ("cls", "kvcache_spec_cls", "manager_class", "uniform_type_base_spec"),
    ),
)


def module_file(root: Path, module: str) -> Path | None:
    base = root.joinpath(*module.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _find(body: list[ast.stmt], name: str) -> ast.AST | None:
    """The last definition of `name` in a body (a later definition wins, as at import time)."""
    found = None
    for node in body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and node.name == name:
            found = node
    return found


def _binds(body: list[ast.stmt], name: str) -> bool:
    for node in body:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            if any((alias.asname or alias.name.split(".")[0]) == name for alias in node.names):
                return True
        elif isinstance(node, ast.Assign):
            if any(isinstance(t, ast.Name) and t.id == name for t in node.targets):
                return True
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and node.name == name:
            return True
    return False


def _targets(node: ast.stmt) -> list[ast.Name]:
    if isinstance(node, ast.AnnAssign):
        return [node.target] if isinstance(node.target, ast.Name) else []
    if isinstance(node, ast.Assign):
        return [t for t in node.targets if isinstance(t, ast.Name)]
    return []


def _params(node: ast.FunctionDef | ast.AsyncFunctionDef) -> list[str]:
    a = node.args
    names = [p.arg for p in (*a.posonlyargs, *a.args, *a.kwonlyargs)]
    return names + ([a.vararg.arg] if a.vararg else []) + ([a.kwarg.arg] if a.kwarg else [])


def check(canary: Canary, root: Path) -> str | None:
    """None when the canary holds in the tree under `root` (the folder holding `vllm/`), else what broke."""
    path = module_file(root, canary.module)
    if path is None:
        return f"module {canary.module} not found"
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    parts = canary.qualname.split(".")
    if canary.kind == "name":
        return None if _binds(tree.body, parts[0]) else f"{canary.module} binds no name {parts[0]!r}"
    body, node = tree.body, None
    for i, part in enumerate(parts):
        node = _find(body, part)
        if node is None:
            where = ".".join(parts[:i]) or canary.module
            return f"{part!r} not defined in {where}"
        body = getattr(node, "body", [])
    if canary.kind == "class":
        return None if isinstance(node, ast.ClassDef) else f"{canary.qualname} is not a class"
    if canary.kind == "field":
        have = {t.id for n in body for t in _targets(n)}
        missing = [p for p in canary.params if p not in have]
        return f"{canary.qualname} has no attributes {missing}" if missing else None
    if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
        return f"{canary.qualname} is not a function"
    have = _params(node)
    missing = [p for p in canary.params if p not in have]
    return f"{canary.qualname}{tuple(have)} lacks parameters {missing}" if missing else None


def check_tree(root: Path, canaries: tuple[Canary, ...] = CANARIES) -> list[tuple[Canary, str | None]]:
    return [(c, check(c, root)) for c in canaries]


def installed_root() -> Path:
    """The folder holding the installed `vllm` package, found without importing vLLM."""
    spec = importlib.util.find_spec("vllm")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("moa-vllm canaries: no installed vllm package")
    return Path(next(iter(spec.submodule_search_locations))).parent


def tree_version(root: Path) -> str:
    text = (root / "vllm" / "_version.py").read_text() if (root / "vllm" / "_version.py").is_file() else ""
    found = re.search(r"""__version__\s*=\s*version\s*=\s*['"]([^'"]+)['"]""", text) or re.search(
        r"""version\s*=\s*['"]([^'"]+)['"]""", text
    )
    return found.group(1) if found else "unknown"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m moa_vllm.vllm_plugin.canaries", description=__doc__.split("\n")[0])
    parser.add_argument("--source", type=Path, help="folder that holds vllm/ (default: the installed vLLM)")
    args = parser.parse_args(argv)
    root = args.source or installed_root()
    results = check_tree(root)
    print(f"vLLM {tree_version(root)} at {root / 'vllm'}: {len(results)} canaries")
    for canary, problem in results:
        status, detail = ("ok  ", "") if problem is None else ("FAIL", f": {problem}")
        print(f"{status} {canary.guards:24s} {canary.target}{detail}")
    failed = sum(p is not None for _, p in results)
    print(f"{len(results) - failed} hold, {failed} broken")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
