"""The package version, in a module of its own: plan writers stamp it without importing the package's entry
points (moa_vllm/__init__.py holds the vLLM plugin's register())."""

__version__ = "0.1.0"  # keep equal to pyproject.toml's version (tests/test_package.py)
