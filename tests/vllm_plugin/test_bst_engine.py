"""BSTForCausalLM served by vLLM: greedy tokens and their log-probabilities equal the reference decode of the same
checkpoint (batched, with chunked prefill carrying SSM state across chunks), and a request's cache holding is one
state page plus a ring of W tokens per KV head, the same for a short and a long request.

One engine for the module: a tiny random BST (head size 32, the smallest vLLM's CPU attention takes; window 16)
with prompts from 5 to 700 tokens, prefill chunks of 64 tokens. Attention runs on the moa backend with the window plan
derived from the config (no plan file).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from moa_vllm.bst import BSTConfig, BSTForCausalLM
from tests.bst.helpers import open_gates
from tests.vllm_plugin.conftest import close_llm, engine_core, make_llm

pytestmark = pytest.mark.engine

WINDOW = 16
CHUNK = 64
MAX_MODEL_LEN = 1024
PROMPT_LENGTHS = [5, 40, 150, 700]
MAX_TOKENS = 12
LOGPROB_TOL = 1e-3


def tiny_bst() -> BSTForCausalLM:
    """With the SSM input gate (the recall checkpoint's layout; the LM's ungated layout is served by the LM server
    test), mostly open so the SSM's share of the output is large enough for a path that skips the gate to show."""
    torch.manual_seed(0)
    config = BSTConfig(
        vocab_size=40,
        hidden_size=64,
        num_attention_heads=2,
        sliding_window=WINDOW,
        initializer_range=0.2,
        ssm_input_gate=True,
    )
    return open_gates(BSTForCausalLM(config)).eval()


def prompt(length: int, seed: int) -> list[int]:
    return torch.randint(0, 40, (length,), generator=torch.Generator().manual_seed(seed)).tolist()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> tuple[BSTForCausalLM, Path]:
    model = tiny_bst()
    return model, model.save_pretrained(tmp_path_factory.mktemp("bst"))


@pytest.fixture(scope="module")
def llm(checkpoint):
    llm = make_llm(
        checkpoint[1],
        max_model_len=MAX_MODEL_LEN,
        max_num_batched_tokens=CHUNK,
        skip_tokenizer_init=True,
        enable_prefix_caching=False,
        max_num_seqs=4,
    )
    yield llm
    close_llm(llm)


@torch.no_grad()
def reference(model: BSTForCausalLM, ids: list[int]) -> tuple[list[int], list[float]]:
    """Greedy tokens from the reference decode and each chosen token's log-probability from a full forward."""
    out = model.generate_greedy(torch.tensor(ids), MAX_TOKENS)
    logp = model(out[None, :-1]).log_softmax(-1)[0, len(ids) - 1 :]
    new = out[len(ids) :]
    return new.tolist(), logp.gather(-1, new[:, None])[:, 0].tolist()


def test_greedy_matches_reference_decode(checkpoint, llm) -> None:
    from vllm import SamplingParams

    model, _ = checkpoint
    prompts = [prompt(n, seed=i) for i, n in enumerate(PROMPT_LENGTHS)]
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0, logprobs=1, ignore_eos=True, detokenize=False)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    for p, out in zip(prompts, outs):
        tokens, logprobs = reference(model, p)
        got = out.outputs[0]
        assert list(got.token_ids) == tokens, f"prompt of {len(p)} tokens"
        served = [lp[t].logprob for t, lp in zip(got.token_ids, got.logprobs)]
        assert served == pytest.approx(logprobs, abs=LOGPROB_TOL)
    assert len({tuple(o.outputs[0].token_ids) for o in outs}) > 1  # the prompts steer the model: not a constant


def test_cache_specs_are_a_state_page_and_moa_window_rings(checkpoint, llm) -> None:
    model, _ = checkpoint
    groups = engine_core(llm).scheduler.kv_cache_config.kv_cache_groups
    kinds = sorted(type(g.kv_cache_spec).__name__ for g in groups)
    # The moa backend puts every attention layer in one group; vLLM then groups the state layers as one group too.
    assert kinds == ["MambaSpec", "MoARingSpec"]
    states = [g for g in groups if type(g.kv_cache_spec).__name__ == "MambaSpec"]
    assert sorted(name for g in states for name in g.layer_names) == ["layers.0.ssm", "layers.1.ssm"]
    for state in states:
        assert state.kv_cache_spec.shapes == ((64, model.config.ssm_state_size, 2),)
        assert state.kv_cache_spec.dtypes == (torch.float32,)
    rings = [g.kv_cache_spec for g in groups if type(g.kv_cache_spec).__name__ == "MoARingSpec"]
    for ring in rings:  # the derived window plan: span W for every KV head (self + context), no sinks
        assert ring.num_kv_heads == 4 and ring.head_size == 32 and ring.sink_tokens == 0 and ring.min_span == WINDOW
        assert ring.alphas == ((WINDOW,) * 4,) * ring.num_layers and ring.betas == ((0.0,) * 4,) * ring.num_layers
        assert ring.num_layers == 2


def test_attention_layers_run_the_moa_backend(llm) -> None:
    def impls(model) -> set[str]:
        return {type(layer.attn.impl).__name__ for layer in model.layers}

    assert llm.apply_model(impls) == [{"MoAImpl"}]


def test_request_holding_is_constant_in_sequence_length(llm) -> None:
    from vllm import SamplingParams

    from moa_vllm.vllm_plugin.bst.memory import request_holdings

    engine, core = llm.llm_engine, engine_core(llm)
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True, detokenize=False)

    def trace(length: int) -> list[list[int]]:
        req = engine.add_request(f"len{length}", {"prompt_token_ids": prompt(length, seed=9)}, params)
        steps = []
        while engine.has_unfinished_requests():
            engine.step()
            if engine.has_unfinished_requests():
                steps.append([h.blocks for h in request_holdings(core, req)])
        return steps

    short, long = trace(60), trace(900)
    groups = engine_core(llm).scheduler.kv_cache_config.kv_cache_groups
    kinds = [type(g.kv_cache_spec).__name__ for g in groups]
    states = [i for i, kind in enumerate(kinds) if kind == "MambaSpec"]
    rings = [i for i, kind in enumerate(kinds) if kind == "MoARingSpec"]
    assert {step[i] for step in short + long for i in states} == {1}  # one state page per group, admission to end
    # A ring of W tokens per KV head, taken at admission and kept to the end: the same blocks for 60 and 900 tokens
    # (full attention would need 8 blocks here).
    ring = groups[rings[0]].kv_cache_spec
    assert {step[i] for step in short + long for i in rings} == {ring.blocks_for_length(MAX_MODEL_LEN)}
    assert ring.blocks_for_length(MAX_MODEL_LEN) < -(-(900 + MAX_TOKENS) // ring.block_size)
