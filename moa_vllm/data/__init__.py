"""Text the project generates itself (no dataset hub here): prompts for tests, benchmarks and calibration."""

from moa_vllm.data.synthetic_text import natural_prompt

__all__ = ["natural_prompt"]
