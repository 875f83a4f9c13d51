"""Retrieval mass: target matching, the per-distance mass against full attention, and its place in the rule loss."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import LlamaForCausalLM

from moa_vllm.planner import artefacts as art
from moa_vllm.planner import profile as prof
from moa_vllm.planner.calibrate import Sample
from moa_vllm.planner.chain import run
from moa_vllm.planner.influence import causal_attention
from moa_vllm.planner.model_inputs import ModelInputs
from moa_vllm.planner.profile import LayerCapture
from moa_vllm.planner.retrieval import (
    TargetPositions,
    head_scores,
    layer_retrieval,
    sample_retrieval,
    target_positions,
    uniform_depth_loss,
)
from moa_vllm.planner.rule_losses import level_loss, rule_windows
from moa_vllm.planner.steps.calibrate import calibrate
from moa_vllm.planner.steps.profile import profile
from tests.planner.tiny_llama import planner_config as _config
from tests.planner.tiny_llama import tiny_config, tiny_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


def _sample(tokenizer, answer: str) -> Sample:
    enc = lambda s: tokenizer.encode(s, add_special_tokens=False)  # noqa: E731
    prompt = enc("some text before. The pass key is 4071. Remember it. 4071 is the pass key. more text after")
    return Sample(
        level=64,
        task="passkey",
        source="story",
        depth=0.2,
        prompt_ids=prompt,
        answer_ids=enc(answer),
        expected=("4071",),
    )


@pytest.mark.model
def test_target_positions_finds_every_occurrence_in_the_prompt_and_the_answer_queries(tokenizer):
    sample = _sample(tokenizer, "The key is 4071.")
    target = target_positions(sample, tokenizer)
    assert target is not None
    ids = sample.prompt_ids + sample.answer_ids
    key = [ids[p] for p in target.keys]
    assert len(target.keys) == 2 * len(target.queries)  # the key sits twice in the prompt
    assert all(p < len(sample.prompt_ids) for p in target.keys)
    # each query predicts the next key token of the answer, and those are the key's tokens
    assert [ids[q + 1] for q in target.queries] == key[: len(target.queries)]
    assert all(q >= len(sample.prompt_ids) - 1 for q in target.queries)


@pytest.mark.model
def test_target_keys_cover_every_token_of_the_hidden_facts(tokenizer):
    """A two-hop answer reads a fact that does not contain it: every fact's tokens are keys."""
    enc = lambda s: tokenizer.encode(s, add_special_tokens=False)  # noqa: E731
    first, second = enc(" The folder went to Ada."), enc(" Ada keeps all in room 512.")
    prompt = enc("text") + first + enc(" more text") + second + enc(" end")
    a, b = len(enc("text")), len(enc("text")) + len(first) + len(enc(" more text"))
    spans = ((a, a + len(first)), (b, b + len(second)))
    sample = Sample(64, "two-hop", "python-docs", 0.1, prompt, enc(" Room 512."), expected=("512",), fact_spans=spans)
    target = target_positions(sample, tokenizer)
    assert target is not None and set(range(a, a + len(first))) | set(range(b, b + len(second))) <= set(target.keys)
    assert set(target.keys) <= set(range(a, a + len(first))) | set(range(b, b + len(second)))
    plain = Sample(64, "two-hop", "python-docs", 0.1, prompt, enc(" Room 512."), expected=("512",))
    assert set(target_positions(plain, tokenizer).keys) < set(target.keys)  # without spans: the value only


@pytest.mark.model
def test_an_answer_without_the_target_gives_no_positions(tokenizer):
    assert target_positions(_sample(tokenizer, "I do not know."), tokenizer) is None


def test_layer_retrieval_equals_the_mass_read_from_full_attention():
    torch.manual_seed(0)
    heads, kv_heads, length, dim, sinks = 6, 2, 40, 8, 4
    rec = LayerCapture(
        torch.randn(heads, length, dim), torch.randn(kv_heads, length, dim), torch.randn(kv_heads, length, dim), 0.5
    )
    target = TargetPositions(queries=[30, 31, 32], keys=[2, 3, 10, 11, 20, 21])  # 2 and 3 are sinks
    got = layer_retrieval(rec, target, sinks, length)
    want = torch.zeros(kv_heads, length, dtype=torch.float64)
    group = heads // kv_heads
    for h in range(heads):
        attn = causal_attention(rec.q[h].double(), rec.k[h // group].double(), rec.scaling)
        for q in target.queries:
            for k in target.keys:
                if k >= sinks:
                    want[h // group, q - k] += attn[q, k] / len(target.queries)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)
    assert got[:, 27:].sum() == 0  # distances of the sink keys carry nothing


def test_sample_retrieval_runs_the_model_and_sums_to_at_most_the_group():
    tok = tiny_tokenizer()
    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_config(len(tok))).eval()
    prof.use_capture_attention(model)
    sample = _sample(tok, "The key is 4071.")
    target = target_positions(sample, tok)
    ids = sample.prompt_ids + sample.answer_ids
    r = sample_retrieval(model, ids, target, sinks=2)
    cfg = model.config
    assert r.shape == (cfg.num_hidden_layers, cfg.num_key_value_heads, len(ids))
    group = cfg.num_attention_heads // cfg.num_key_value_heads
    assert np.all(r >= 0) and np.all(r.sum(-1) <= group + 1e-6) and r.sum() > 0


def test_retrieval_weight_adds_mass_times_the_context_share_a_window_misses(tiny_dir: Path, tmp_path: Path):
    config = _config(tiny_dir, tmp_path, retrieval_weights=(2.0,), extension_lengths=(448,), alphas=(0.0, 64.0, 192.0))
    run(config, "profile")
    work, model = art.WorkDir(tmp_path, progress=False), ModelInputs(tiny_dir)
    profiles = profile(calibrate(model, config, work), model, config, work)
    data = art.load_npz(tmp_path / "retrieval-L160.npz")
    spike = np.zeros_like(data["offsets"])
    spike[0, 0, 100] = 0.5  # all retrieval mass: layer 0, KV head 0, distance 100
    offsets = profiles[160].offsets
    added = level_loss(offsets, head_scores(spike), 2.0, config, 160, 2) - level_loss(
        offsets, None, 0.0, config, 160, 2
    )
    influence_total = art.load_npz(tmp_path / "profile-L160.npz")["offsets"].sum()
    # the spike's mass is scaled to the influence total; each rule loses the share of the context its window misses,
    # averaged over the profiled length and the longer extension length
    missed = [np.clip((n - 8 - rule_windows(config, n).numpy()) / (n - 8), 0.0, 1.0) for n in (160, 448)]
    np.testing.assert_allclose(added[0, 0], 2.0 * influence_total * np.mean(missed, axis=0), rtol=1e-9)
    assert np.all(added[1:] == 0) and np.all(added[0, 1:] == 0)
    constant = [i for i, r in enumerate(config.grid.rules) if r.beta == 0 and r.alpha >= 160]
    assert constant and np.all(added[0, 0, constant] > 0)  # full at 160, short at 448: not free


def test_validate_chooses_among_every_weight_and_records_the_candidates(tiny_dir: Path, tmp_path: Path):
    run(_config(tiny_dir, tmp_path, retrieval_weights=(1.0,)), "validate", (0.5,))
    record = art.read_json(tmp_path / "validate-d0.50.json")
    names = set(record["true_loss"]["candidates"])
    assert any(n.startswith("pareto-") for n in names) and any(n.startswith("r1-pareto-") for n in names)
    losses = record["true_loss"]["candidates"]
    assert losses[record["chosen"]] == min(losses.values())
    assert (tmp_path / "optimize-d0.50-r1.json").exists() and (tmp_path / "truth-d0.50-r1.json").exists()
    report = art.read_json(tmp_path / "report-d0.50" / "retrieval.json")
    assert len(report["heads"]) == 2 * 2 and set(report["heads"][0]["mass"]) == {"160", "224"}  # layers x KV heads


def test_uniform_depth_loss_is_the_mass_a_window_misses_for_a_target_anywhere():
    mass = np.array([[2.0, 0.0]])
    loss = uniform_depth_loss(mass, np.array([0, 50, 100, 150]), length=108, sinks=8)
    np.testing.assert_allclose(loss[0, 0], [2.0, 1.0, 0.0, 0.0])  # a window of the whole context misses nothing
    assert np.all(loss[0, 1] == 0)
