"""Patch canaries against the installed vLLM: one test per target, read from source (the same check that is run by
hand on other vLLM versions' wheels) and again through an import of the real object; a vLLM upgrade that moves or
reshapes a target fails here by name."""

from __future__ import annotations

import importlib
import inspect

import pytest

from moa_vllm.vllm_plugin import compat, register
from moa_vllm.vllm_plugin.canaries import CANARIES, Canary, check, installed_root, main
from moa_vllm.vllm_plugin.patches import PATCHES


@pytest.fixture(autouse=True, scope="module")
def _registered():
    register()  # the patched objects keep their signatures (functools.wraps), checked below as installed


@pytest.mark.parametrize("canary", CANARIES, ids=lambda c: c.target)
def test_target_holds_in_the_installed_source(canary):
    assert check(canary, installed_root()) is None


def _resolve(canary: Canary):
    try:
        obj = importlib.import_module(canary.module)
    except ImportError as e:  # e.g. the CUDA platform on the CPU wheel: its source check above still ran
        pytest.skip(f"{canary.module} does not import on this wheel: {e}")
    for part in canary.qualname.split("."):
        obj = inspect.getattr_static(obj, part) if isinstance(obj, type) else getattr(obj, part)
    return obj


@pytest.mark.parametrize("canary", [c for c in CANARIES if c.kind == "def"], ids=lambda c: c.target)
def test_target_imports_with_the_parameters_the_plugin_uses(canary):
    obj = _resolve(canary)
    func = getattr(obj, "fget", None) or getattr(obj, "__func__", obj)  # property, classmethod / staticmethod
    func = getattr(func, "_moa_vllm_original", func)  # a patched target: vLLM's own function, not our wrapper
    func = getattr(func, "__func__", func)  # a classmethod's original is bound
    names = list(inspect.signature(func, follow_wrapped=True).parameters)
    assert set(canary.params) <= set(names), names


def test_every_patch_has_a_canary_and_every_canary_guards_something():
    guarded = {c.guards for c in CANARIES}
    assert {p.name for p in PATCHES} <= guarded
    assert all(g in {p.name for p in PATCHES} or g.startswith("contract:") for g in guarded)


def test_every_patch_targets_the_installed_vllm_series():
    """Each patch says which vLLM series it was checked against; the installed one must be among them (a vLLM
    upgrade without a review of the patches fails here)."""
    _, version = compat.installed_vllm()
    series = compat.series(version)
    assert all(series in p.vllm_versions for p in PATCHES), [(p.name, p.vllm_versions) for p in PATCHES]
    assert all(set(p.vllm_versions) <= set(compat.SUPPORTED_SERIES) for p in PATCHES)


def test_a_reshaped_target_is_reported_by_name(tmp_path, capsys):
    """The checker itself can fail: a tree where a method lost a parameter, a class lost its method and a module is
    missing."""
    pkg = tmp_path / "vllm" / "v1" / "core"
    pkg.mkdir(parents=True)
    (pkg / "kv_cache_manager.py").write_text(
        "class KVCacheManager:\n    def allocate_slots(self, req):\n        pass\n"
    )
    lost_param = Canary("admission_lengths", "vllm.v1.core.kv_cache_manager", "KVCacheManager.allocate_slots",
                        ("self", "request"))  # fmt: skip
    lost_method = Canary("admission_lengths", "vllm.v1.core.kv_cache_manager", "KVCacheManager.free", ("self",))
    assert "lacks parameters ['request']" in check(lost_param, tmp_path)
    assert "'free' not defined in KVCacheManager" in check(lost_method, tmp_path)
    assert main(["--source", str(tmp_path)]) == 1
    out = capsys.readouterr().out
    assert "FAIL admission_lengths" in out and "module vllm.platforms.cpu not found" in out
