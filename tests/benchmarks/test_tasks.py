import pytest

from benchmarks.accuracy.tasks import (
    FILLER,
    build_case,
    build_grid,
    draw_key,
    first_number,
    heads_seeing_key,
    is_correct,
    key_outside,
)
from moa_vllm.plan import ModelFingerprint, Rule, dense_plan, uniform_plan
from tests.benchmarks.fakes import WordTokenizer

MODEL = ModelFingerprint(architecture="LlamaForCausalLM", num_layers=2, num_query_heads=4, num_kv_heads=2, head_dim=8)


@pytest.fixture
def tok():
    return WordTokenizer()


@pytest.mark.parametrize("fmt", ["chat", "plain"])
@pytest.mark.parametrize("depth", [0.0, 0.1, 0.5, 0.9, 1.0])
def test_prompt_fits_the_length_and_holds_the_key(tok, fmt, depth):
    case = build_case(tok, 1024, depth, seed=3, max_tokens=16, fmt=fmt)
    unit = len(tok.encode(FILLER))
    assert 1024 - 16 - unit < case.prompt_tokens <= 1024 - 16
    digits = "".join(tok.decode([case.prompt_ids[p]]) for p in case.key_positions)
    assert digits == str(case.key) * 2  # both mentions of the key, nothing else
    assert tok.decode(case.prompt_ids).count(str(case.key)) == 2


def test_depth_moves_the_needle_through_the_filler(tok):
    positions = [build_case(tok, 2048, d, 0, 16, "plain").needle_position for d in (0.0, 0.25, 0.5, 0.75, 1.0)]
    assert positions == sorted(positions)
    assert positions[0] < 0.1 and positions[-1] > 0.9
    assert abs(positions[2] - 0.5) < 0.05


def test_plain_prompt_ends_with_the_answer_prefix_and_chat_with_the_assistant_turn(tok):
    plain = tok.decode(build_case(tok, 512, 0.5, 0, 16, "plain").prompt_ids)
    chat = tok.decode(build_case(tok, 512, 0.5, 0, 16, "chat").prompt_ids)
    assert plain.endswith("What is the pass key? Reply with the 5-digit number only.\nThe pass key is")
    assert chat.startswith("<system>") and chat.endswith("Reply with the 5-digit number only.</user><assistant>")


def test_prompts_are_seeded(tok):
    a = build_case(tok, 512, 0.3, 1, 16, "chat")
    assert a == build_case(tok, 512, 0.3, 1, 16, "chat")
    assert a.key == draw_key(512, 0.3, 1)
    keys = {draw_key(512, 0.3, s) for s in range(20)}
    assert len(keys) > 15 and all(10000 <= k <= 99999 for k in keys)


def test_grid_has_seeds_per_length(tok):
    grid = build_grid(tok, [256, 512], [0.2, 0.8], {256: 1, 512: 3}, 16, "plain")
    assert [(c.length, c.depth, c.seed) for c in grid][:3] == [(256, 0.2, 0), (256, 0.8, 0), (512, 0.2, 0)]
    assert len(grid) == 2 + 6


def test_too_short_length_and_bad_depth_are_refused(tok):
    with pytest.raises(ValueError, match="no room"):
        build_case(tok, 40, 0.5, 0, 16, "plain")
    with pytest.raises(ValueError, match="depth"):
        build_case(tok, 512, 1.5, 0, 16, "plain")


@pytest.mark.parametrize(
    ("answer", "correct"),
    [
        (" 12345.", True),
        ("The pass key is 12345.", True),
        ("12345 is it", True),
        ("1234", False),
        ("no idea", False),
        ("7 then 12345", False),
        ("123456", False),
    ],
)
def test_answer_check_is_the_first_number(tok, answer, correct):
    case = build_case(tok, 512, 0.5, 0, 16, "plain")
    case = type(case)(case.length, case.depth, case.seed, 12345, case.prompt_ids, case.key_positions)
    assert is_correct(case, answer) is correct
    assert first_number("none") is None


def test_key_visibility_follows_the_plan_windows(tok):
    early = build_case(tok, 4096, 0.1, 0, 16, "plain")
    late = build_case(tok, 4096, 0.95, 0, 16, "plain")
    u25 = uniform_plan(MODEL, 0.25)
    assert heads_seeing_key(dense_plan(MODEL), early, 16, 8192) == 1.0
    assert key_outside(u25, early, 16, 8192)
    assert heads_seeing_key(u25, late, 16, 8192) == 1.0 and not key_outside(u25, late, 16, 8192)
    mixed = u25.model_copy(deep=True)
    mixed.rules[0][0] = Rule(alpha=0.0, beta=1.0)  # one of four heads dense
    assert heads_seeing_key(mixed, early, 16, 8192) == 0.25


def test_sinks_keep_a_key_at_the_very_start_visible(tok):
    case = build_case(tok, 4096, 0.0, 0, 16, "plain")
    assert case.key_positions[0] < 64  # the needle right after the short instruction lies in the sinks
    assert not key_outside(uniform_plan(MODEL, 0.25), case, 16, 8192)
