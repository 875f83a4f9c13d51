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
