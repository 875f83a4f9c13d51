"""Held-out fidelity: texts that avoid the calibration, and the measure against dense."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaForCausalLM

from moa_vllm.plan.generate import dense_plan, uniform_plan
from moa_vllm.plan.schema import ModelFingerprint
from moa_vllm.planner.fidelity import SHINGLE, _shingles, compare, held_out_texts, next_token_logprobs, plan_fidelity
from tests.planner.tiny_llama import tiny_config, tiny_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


@pytest.mark.model
def test_texts_have_the_length_and_share_no_run_with_the_excluded_samples(tokenizer):
    first = held_out_texts(tokenizer, 128, 2, seed=0, exclude=[])
    assert len(first) == 2 and all(len(t) == 128 for t in first)
    assert not (_shingles(first[0]) & _shingles(first[1]))
    again = held_out_texts(tokenizer, 128, 2, seed=0, exclude=[first[0]])
    assert all(not (_shingles(t) & _shingles(first[0])) for t in again)  # the excluded text is never drawn
    assert held_out_texts(tokenizer, 128, 2, seed=0, exclude=[]) == first  # seeded
    assert SHINGLE <= 64


def test_dense_plan_matches_dense_and_a_narrow_plan_does_not():
    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_config(vocab_size=97)).eval()
    fp = ModelFingerprint(architecture="llama", num_layers=2, num_query_heads=4, num_kv_heads=2, head_dim=8)
    texts = [torch.randint(0, 97, (96,), generator=torch.Generator().manual_seed(i)).tolist() for i in range(2)]
    dense = [next_token_logprobs(model, None, t) for t in texts]
    assert dense[0].shape == (95, 97)
    same = plan_fidelity(model, dense_plan(fp, sink_tokens=4, min_span=8), texts, dense)
    assert same.top1 == 1.0 and same.kl == pytest.approx(0.0, abs=1e-6)
    narrow = plan_fidelity(model, uniform_plan(fp, 0.125, sink_tokens=2, min_span=4), texts, dense)
    assert narrow.kl > 1e-5 and narrow.top1 < 1.0
    with pytest.raises(ValueError):
        compare(dense[0], dense[0][:-1])
