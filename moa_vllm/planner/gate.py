"""The ship gate and the choice among candidate plans.

A MoA plan ships only when it beats the uniform plan of its density on every held-out measure the planner has:
the true task loss, its share on the held-out natural-text retrieval samples (the answer loss there: the facts a
user hides in prose, which passkey-style losses alone let plans lose) and, when measured, fidelity on held-out
natural text (lower KL to dense and higher top-1 agreement). Equal counts as a loss: a plan no better than uniform
is not worth a MoA label. Among the candidates that pass, the lowest task loss wins.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass


class ShipGateError(RuntimeError):
    """No candidate plan beats the uniform plan of its density on the held-out measures: nothing is written."""


@dataclass(frozen=True)
class Scores:
    loss: float  # held-out true task loss
    kl: float | None = None  # held-out fidelity: KL(dense || plan), None when not measured
    top1: float | None = None  # held-out fidelity: top-1 agreement with dense
    retrieval: float | None = None  # answer loss on the held-out natural-text retrieval samples; None without any

    def shortfalls(self, uniform: Scores) -> list[str]:
        """Where this plan does not beat `uniform`, with by how much; empty when it beats it everywhere."""
        out = []
        if self.loss >= uniform.loss:
            rel = 100 * (self.loss / uniform.loss - 1)
            out.append(f"true loss {self.loss:.5f} vs {uniform.loss:.5f} ({rel:+.2f}%)")
        if self.retrieval is not None and uniform.retrieval is not None and self.retrieval >= uniform.retrieval:
            rel = 100 * (self.retrieval / max(uniform.retrieval, 1e-12) - 1)
            out.append(f"natural-text retrieval loss {self.retrieval:.5f} vs {uniform.retrieval:.5f} ({rel:+.2f}%)")
        if self.kl is not None and uniform.kl is not None and self.kl >= uniform.kl:
            out.append(f"KL {self.kl:.5f} vs {uniform.kl:.5f} (+{self.kl - uniform.kl:.5f})")
        if self.top1 is not None and uniform.top1 is not None and self.top1 <= uniform.top1:
            out.append(f"top-1 {self.top1:.4f} vs {uniform.top1:.4f} ({self.top1 - uniform.top1:+.4f})")
        return out


@dataclass(frozen=True)
class Choice:
    name: str  # the candidate to write (the best passing one, else the lowest loss)
    verdict: str | None  # None when it beats uniform everywhere; else why no candidate may ship


def choose(candidates: Mapping[str, Scores], uniform: Scores, density: float, where: str) -> Choice:
    """The passing candidate with the lowest task loss; when none passes, the lowest-loss candidate and a verdict
    naming its shortfalls (`where` says at which lengths the measures were taken)."""
    if not candidates:
        raise ValueError("no candidate plans to choose from")
    ranked = sorted(candidates, key=lambda n: (candidates[n].loss, n))
    passing = [n for n in ranked if not candidates[n].shortfalls(uniform)]
    if passing:
        return Choice(passing[0], None)
    best = ranked[0]
    why = "; ".join(candidates[best].shortfalls(uniform))
    verdict = (
        f"moa-plan: no MoA plan at density {density} beats the uniform plan on every held-out measure ({where}); "
        f"the lowest-loss candidate {best}: {why}; no plan written"
    )
    return Choice(best, verdict)
