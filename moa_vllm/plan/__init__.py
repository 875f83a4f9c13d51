"""Plan format v1, span math, generators and the reference importer. Imports no vLLM."""

from moa_vllm.plan.errors import PlanError
from moa_vllm.plan.fingerprint import check_plan_fits, fingerprint_from_hf_config, load_hf_config
from moa_vllm.plan.generate import dense_plan, uniform_plan, window_plan
from moa_vllm.plan.io import load_plan, parse_plan, save_plan
from moa_vllm.plan.reference import import_reference, import_reference_file
from moa_vllm.plan.schema import FORMAT_VERSION, ModelFingerprint, Plan, PlanMetadata, Rule
from moa_vllm.plan.span import request_length, span_tokens, visible, window_tokens

__all__ = [
    "FORMAT_VERSION",
    "ModelFingerprint",
    "Plan",
    "PlanError",
    "PlanMetadata",
    "Rule",
    "check_plan_fits",
    "dense_plan",
    "fingerprint_from_hf_config",
    "import_reference",
    "import_reference_file",
    "load_hf_config",
    "load_plan",
    "parse_plan",
    "request_length",
    "save_plan",
    "span_tokens",
    "uniform_plan",
    "visible",
    "window_plan",
    "window_tokens",
]
