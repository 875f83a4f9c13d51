"""The ship gate: a MoA plan is written only when it beats the uniform plan of its density on held-out true loss."""

from __future__ import annotations


class ShipGateError(RuntimeError):
    """The best MoA plan does not beat the uniform plan of its density on the held-out true loss (equal counts as a
    loss: a plan no better than uniform is not worth a MoA label): nothing is written."""


def gate(best: float, uniform: float, density: float, length: int) -> str | None:
    """None when the MoA plan may ship, else why not (by how much it loses)."""
    if best < uniform:
        return None
    return (
        f"moa-plan: the best MoA plan at density {density} does not beat the uniform plan on the held-out true loss at "
        f"N={length}: {best:.5f} vs {uniform:.5f} (+{best - uniform:.5f}, {100 * (best / uniform - 1):+.2f}%); "
        "no plan written"
    )
