"""True loss under sparse masks: the planner's masked attention equals the independent reference, and a whole-model
masked forward equals one built from per-layer reference attention."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaForCausalLM

from moa_vllm.ops.reference import reference_attention
from moa_vllm.plan.generate import dense_plan, uniform_plan
from moa_vllm.plan.schema import ModelFingerprint
from moa_vllm.planner.calibrate import Sample
from moa_vllm.planner.masked import _masked_attention, masks, plan_loss
from tests.planner.tiny_llama import tiny_config


class _Module:
    layer_idx = 0


@pytest.mark.parametrize("windows", [(3, 9), (1, 40), (17, 2)])
@pytest.mark.parametrize("sinks", [0, 4])
def test_masked_attention_matches_the_reference(windows: tuple[int, int], sinks: int):
    torch.manual_seed(0)
    length, heads, kv_heads, dim = 40, 6, 2, 8
    q = torch.randn(1, heads, length, dim, dtype=torch.float64)
    k = torch.randn(1, kv_heads, length, dim, dtype=torch.float64)
    v = torch.randn(1, kv_heads, length, dim, dtype=torch.float64)
    with masks({0: list(windows)}, sinks):
        out, _ = _masked_attention(_Module(), q, k, v, None, scaling=0.3)
    ref = reference_attention(
        q[0].transpose(0, 1), torch.arange(length), k[0], v[0], torch.tensor(windows), sinks, 0.3
    )  # [n, Hq, D]
    torch.testing.assert_close(out[0], ref, rtol=1e-9, atol=1e-9)
    # a window off by one is a different mask: the comparison can fail
    with masks({0: [w + 1 for w in windows]}, sinks):
        shifted, _ = _masked_attention(_Module(), q, k, v, None, scaling=0.3)
    if all(w + 1 < length for w in windows):
        assert not torch.allclose(shifted[0], ref)


def test_layers_without_windows_and_full_windows_are_plain_causal():
    torch.manual_seed(1)
    q, k, v = torch.randn(1, 4, 30, 8), torch.randn(1, 2, 30, 8), torch.randn(1, 2, 30, 8)
    plain, _ = _masked_attention(_Module(), q, k, v, None, scaling=0.5)
    with masks({0: [30, 26]}, 4):  # window + sinks >= length: dense
        full, _ = _masked_attention(_Module(), q, k, v, None, scaling=0.5)
    torch.testing.assert_close(plain, full)


def _sample(level: int, length: int, answer: int) -> Sample:
    ids = torch.randint(0, 97, (length,), generator=torch.Generator().manual_seed(level)).tolist()
    return Sample(level, "passkey", "t", 0.1, ids[:-answer], ids[-answer:])


def test_plan_loss_dense_plan_equals_the_plain_model_and_sparse_plans_differ():
    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_config(vocab_size=97, layers=2, heads=4, kv_heads=2)).eval()
    fp = ModelFingerprint(architecture="llama", num_layers=2, num_query_heads=4, num_kv_heads=2, head_dim=8)
    sample = _sample(96, 96, 10)
    plain = plan_loss(model, None, [sample], 1.0)[0]
    dense = plan_loss(model, dense_plan(fp, sink_tokens=4, min_span=8), [sample], 1.0)[0]
    sparse = plan_loss(model, uniform_plan(fp, 0.25, sink_tokens=4, min_span=8), [sample], 1.0)[0]
    assert dense.total == pytest.approx(plain.total, rel=1e-6)
    assert plain.total == pytest.approx(plain.answer + plain.context, rel=1e-6)
    assert abs(sparse.total - plain.total) > 1e-4
