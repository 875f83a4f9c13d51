import pytest

from moa_vllm.plan import ModelFingerprint, dense_plan, fingerprint_from_hf_config, uniform_plan, visible, window_plan

FP = ModelFingerprint(architecture="LlamaForCausalLM", num_layers=30, num_query_heads=9, num_kv_heads=3, head_dim=64)


def test_fingerprint_from_llama_config():
    cfg = {
        "architectures": ["LlamaForCausalLM"],
        "num_hidden_layers": 30,
        "num_attention_heads": 9,
        "num_key_value_heads": 3,
        "hidden_size": 576,
    }
    assert fingerprint_from_hf_config(cfg) == FP


def test_fingerprint_mha_default_kv_heads():
    cfg = {
        "architectures": ["Qwen2ForCausalLM"],
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "hidden_size": 256,
        "head_dim": 32,
    }
    fp = fingerprint_from_hf_config(cfg)
    assert (fp.num_kv_heads, fp.head_dim) == (4, 32)


@pytest.mark.parametrize("n", [1, 100, 2048, 8192])
def test_dense_keeps_everything(n):
    plan = dense_plan(FP)
    assert plan.is_dense_at(n)
    assert plan.density(n) == 1.0


@pytest.mark.parametrize("density", [0.25, 0.5])
def test_uniform_density(density):
    plan = uniform_plan(FP, density)
    for n in (2048, 4096, 8192):
        assert plan.density(n) == pytest.approx(density, abs=1 / n)
        assert plan.windows(n)[0][0] == round(density * n) - plan.sink_tokens
    assert plan.density(200) == 128 / 200  # min_span dominates short requests


def test_uniform_rejects_bad_density():
    with pytest.raises(ValueError, match="density"):
        uniform_plan(FP, 0.0)


def test_window_plan_is_a_fixed_window_without_sinks():
    plan = window_plan(FP, 32)
    assert plan.sink_tokens == 0 and plan.spans(8192)[0] == [32] * 3 and plan.spans(10)[0] == [10] * 3
    window = plan.windows(8192)[0][0]
    assert [visible(100, k, plan.sink_tokens, window) for k in (68, 69, 100)] == [False, True, True]  # q - k < 32
    with pytest.raises(ValueError, match="window"):
        window_plan(FP, 0)
