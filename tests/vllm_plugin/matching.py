"""vLLM's convention for comparing greedy outputs of kernels that round differently."""

from __future__ import annotations


def first_divergence(a: list[int], b: list[int]) -> int | None:
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def assert_greedy_close(
    a: list[int], a_top5: list[list[int]], b: list[int], b_top5: list[list[int]], label: str
) -> None:
    """Tokens match, or at the first divergence each side's token is in the other's top-5; the rest is not compared."""
    i = first_divergence(a, b)
    if i is None:
        return
    assert i < min(len(a), len(b)), f"{label}: lengths differ ({len(a)} vs {len(b)}) with a common prefix"
    assert a[i] in b_top5[i] and b[i] in a_top5[i], (
        f"{label}: diverged at token {i}: {a[i]} vs {b[i]}, top-5 {a_top5[i]} vs {b_top5[i]}"
    )


def greedy_top5(llm, prompts: list[list[int]], max_tokens: int) -> list[tuple[list[int], list[list[int]]]]:
    """Each token-id prompt's greedy tokens (EOS ignored) and the top-5 token ids at every step, for
    assert_greedy_close."""
    from vllm import SamplingParams

    params = SamplingParams(max_tokens=max_tokens, temperature=0, logprobs=5, ignore_eos=True)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    top5 = [[sorted(lp, key=lambda t: -lp[t].logprob)[:5] for lp in o.outputs[0].logprobs] for o in outs]
    return [(list(o.outputs[0].token_ids), t5) for o, t5 in zip(outs, top5)]
