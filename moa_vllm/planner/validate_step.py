"""The planner's validation step (a Pipeline mixin): every candidate plan (each Pareto plan of each retrieval weight)
plus the hybrid plans, and the uniform plan of the same density through a real masked forward on held-out samples
and through held-out natural text (fidelity_step.py); the choice and the ship gate (gate.py); the plan, its report
and its export."""

from __future__ import annotations

import logging
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from moa_vllm.plan.generate import uniform_plan
from moa_vllm.plan.io import load_plan, save_plan
from moa_vllm.plan.schema import Plan
from moa_vllm.planner import artefacts as art
from moa_vllm.planner.artefacts import density_tag
from moa_vllm.planner.gate import Scores, ShipGateError, choose
from moa_vllm.planner.optimize import ParetoSolution, PlanningProblem, solution_to_plan

log = logging.getLogger(__name__)

TRUTH_VERSION = 1


@dataclass(frozen=True)
class Candidate:
    name: str
    plan: Plan
    loss: float  # held-out true loss
    retrieval_weight: float | None = None  # of its Pareto set; None for a hybrid
    index: int | None = None  # in its Pareto set


class ValidateStep:
    def truth_key(self, density: float, retrieval_weight: float = 0.0) -> dict[str, Any]:
        c = self.config
        name = f"optimize-{density_tag(density)}{self.weight_suffix(retrieval_weight)}.json"
        return {
            "version": TRUTH_VERSION,
            "optimize": art.digest(art.read_json(self.path(name))),
            "calibration": art.read_json(self.path("calibration.json"))["digest"],
            "validation_length": c.validation_length,
            "context_weight": c.context_weight,
            "sinks": c.sinks,
            "min_span": c.min_span,
        }

    def candidate_plans(self, density: float, retrieval_weight: float = 0.0) -> dict[str, Plan]:
        """The Pareto plans of one candidate set (pareto-0, pareto-1, ...); the influence-only set (weight 0) adds
        the uniform plan of the same density."""
        solutions = self.optimize(density, retrieval_weight)  # first: it runs the steps the problem reads
        problem = self.problem(density, retrieval_weight)
        plans = {f"pareto-{i}": self._plan(s, problem, retrieval_weight) for i, s in enumerate(solutions)}
        if retrieval_weight == 0:
            plans["uniform"] = uniform_plan(self.fingerprint, density, self.config.sinks, self.config.min_span)
        return plans

    def _plan(self, solution: ParetoSolution, problem: PlanningProblem, retrieval_weight: float) -> Plan:
        plan = solution_to_plan(solution, problem, self.fingerprint, self.config.sinks, self.notes())
        plan.metadata.extra["retrieval_weight"] = retrieval_weight
        return plan

    def hybrid_candidates(self, density: float) -> dict[str, Plan]:
        """hybrid-K for every K of --hybrid-heads the budget allows (moa_vllm/planner/hybrid.py): the K heads of
        most retrieval mass (summed over the profiled lengths) at full span, the rest at one elastic window."""
        from moa_vllm.planner.hybrid import hybrid_plans

        c = self.config
        if not c.hybrid_heads:
            return {}
        self.retrieval()
        mass = sum(self.retrieval_mass(n) for n in c.lengths)
        fp, lengths = self.fingerprint, c.constraint_lengths
        return hybrid_plans(fp, mass, c.hybrid_heads, density, c.sinks, c.min_span, lengths, self.notes(), c.lengths)

    def true_losses(self, density: float, retrieval_weight: float = 0.0) -> dict[str, Any]:
        """Held-out true loss (masked forward at the validation length) of one candidate set's plans (plus dense
        and uniform for the influence-only set); checkpointed per plan."""
        plans: dict[str, Plan | None] = dict(self.candidate_plans(density, retrieval_weight))
        if retrieval_weight == 0:
            plans = {"dense": None, **plans}
        name = f"truth-{density_tag(density)}{self.weight_suffix(retrieval_weight)}"
        return self._measure_truth(name, self.truth_key(density, retrieval_weight), plans)

    def hybrid_true_losses(self, density: float) -> dict[str, Any]:
        c = self.config
        plans = self.hybrid_candidates(density)
        key = {
            "version": TRUTH_VERSION,
            "calibration": art.read_json(self.path("calibration.json"))["digest"],
            "validation_length": c.validation_length,
            "context_weight": c.context_weight,
            "plans": {n: art.plan_digest(p) for n, p in plans.items()},
        }
        return self._measure_truth(f"truth-{density_tag(density)}-hybrid", key, dict(plans))

    def _measure_truth(self, name: str, key: dict[str, Any], plans: dict[str, Plan | None]) -> dict[str, Any]:
        from moa_vllm.planner.masked import mean_loss, plan_loss

        path = self.path(f"{name}.json")
        doc = art.read_json(path)
        if not doc or doc.get("key") != art.normalised(key):
            doc = {"key": art.normalised(key), "complete": False, "plans": {}}
        if doc["complete"]:
            return doc
        samples = self.samples(self.config.validation_length)
        if not samples:
            raise ValueError(f"no held-out samples at the validation length {self.config.validation_length}")
        todo = [n for n in plans if n not in doc["plans"]]
        with (
            self.timings.step(name, plans=len(todo), samples=len(samples)),
            self._bar(len(todo) * len(samples), name.replace("truth-", "true loss ")) as bar,
        ):
            for n in todo:
                losses = []
                for sample in samples:
                    losses += plan_loss(self.model, plans[n], [sample], self.config.context_weight)
                    bar.update(1)
                doc["plans"][n] = {"mean": asdict(mean_loss(losses)), "samples": [asdict(x) for x in losses]}
                art.write_json_atomic(path, doc)
        doc["complete"] = True
        art.write_json_atomic(path, doc)
        return doc

    def candidates(self, density: float) -> list[Candidate]:
        """Every candidate plan with its held-out true loss: each Pareto plan of each retrieval weight (named
        [r{w}-]pareto-{i}), then each hybrid-K."""
        rows = []
        for w in self.weights:
            truth = self.true_losses(density, w)
            prefix = "" if w == 0 else f"r{w:g}-"
            for i, plan in enumerate(p for n, p in self.candidate_plans(density, w).items() if n != "uniform"):
                loss = truth["plans"][f"pareto-{i}"]["mean"]["total"]
                rows.append(Candidate(f"{prefix}pareto-{i}", plan, loss, w, i))
        if self.config.hybrid_heads:
            truth = self.hybrid_true_losses(density)
            for n, plan in self.hybrid_candidates(density).items():
                rows.append(Candidate(n, plan, truth["plans"][n]["mean"]["total"]))
        return rows

    def validate_key(self, density: float) -> dict[str, Any]:
        tag = density_tag(density)
        truth = {
            f"{w:g}": art.digest(art.read_json(self.path(f"truth-{tag}{self.weight_suffix(w)}.json")))
            for w in self.weights
        }
        key: dict[str, Any] = {"truth": truth["0"] if len(truth) == 1 else truth}
        if self.config.hybrid_heads:
            key["hybrid"] = art.digest(art.read_json(self.path(f"truth-{tag}-hybrid.json")))
        if self.config.fidelity_texts:
            key["fidelity"] = art.digest(art.read_json(self.path(f"fidelity-{tag}.json")))
        key["fingerprint"] = self.fingerprint.model_dump()
        return key

    def validate(self, density: float) -> Path:
        """Choose among the candidate plans (every Pareto plan of every retrieval weight, every hybrid-K) by the
        held-out measures: the lowest true loss among those that beat the uniform plan of the same density on true
        loss and on held-out fidelity (gate.py); refuse when none does (the ship gate); write the plan and report."""
        c = self.config
        candidates = self.candidates(density)
        base = self.true_losses(density)
        uniform_plan_ = self.candidate_plans(density)["uniform"]
        fidelity = self.fidelity(density, {**{x.name: x.plan for x in candidates}, "uniform": uniform_plan_})
        tag = density_tag(density)
        path, key = self.path(f"validate-{tag}.json"), self.validate_key(density)
        plan_path, report_dir = self.path(f"plan-{tag}.json"), self.path(f"report-{tag}")

        def scores(name: str, loss: float) -> Scores:
            f = fidelity.get(name, {})
            return Scores(loss, f.get("kl"), f.get("top1"))

        uniform = scores("uniform", base["plans"]["uniform"]["mean"]["total"])
        where = f"true loss at N={c.validation_length}"
        if fidelity:
            where += f", fidelity on {c.fidelity_texts} x {c.fidelity_length} tokens of held-out text"
        choice = choose({x.name: scores(x.name, x.loss) for x in candidates}, uniform, density, where)
        verdict = choice.verdict
        if verdict is not None and not c.ship_gate:
            log.warning("%s (ship gate off: written anyway)", verdict.replace("; no plan written", ""))
            verdict = None
        if art.json_matches(path, key) and plan_path.exists() and verdict is None:
            log.info("validate: %s is up to date, skipped", path)
            return plan_path
        best = next(x for x in candidates if x.name == choice.name)
        shortfalls = scores(best.name, best.loss).shortfalls(uniform)
        dense = base["plans"]["dense"]["mean"]["total"]
        weight = best.retrieval_weight if best.retrieval_weight is not None else 0.0
        group = [x for x in candidates if x.index is not None and x.retrieval_weight == weight]
        record = {
            "key": key,
            "chosen": best.name,
            "retrieval_weight": best.retrieval_weight,
            "validation_length": c.validation_length,
            "true_loss": {
                "candidates": {x.name: x.loss for x in candidates},
                "pareto": [x.loss for x in group],
                "uniform": uniform.loss,
                "dense": dense,
            },
            "fidelity": self._fidelity_record(fidelity),
            "shipped": verdict is None,
            "beats_uniform": not shortfalls,
            "shortfalls": shortfalls,
        }
        art.write_json_atomic(path, record)
        if verdict is not None:
            plan_path.unlink(missing_ok=True)
            raise ShipGateError(verdict)
        with self.timings.step(f"validate-{tag}"):
            plan = best.plan.model_copy(deep=True)
            plan.metadata.extra["true_loss"] = {
                "length": c.validation_length,
                "samples": len(base["plans"]["dense"]["samples"]),
                "plan": best.loss,
                "uniform": uniform.loss,
                "dense": dense,
                "beats_uniform": best.loss < uniform.loss,
                "candidates": record["true_loss"]["candidates"],
            }
            if fidelity:
                plan.metadata.extra["fidelity"] = {
                    "length": c.fidelity_length,
                    "texts": c.fidelity_texts,
                    "plan": {k: fidelity[best.name][k] for k in ("top1", "kl")},
                    "uniform": {k: fidelity["uniform"][k] for k in ("top1", "kl")},
                }
            save_plan(plan, plan_path)
            self._report(
                report_dir,
                self.optimize(density, weight),
                best.index,
                self.problem(density, weight),
                plan,
                [x.loss for x in group],
                uniform.loss,
            )
            self._retrieval_report(report_dir, plan)
            if fidelity:
                from moa_vllm.planner.report import write_candidates_report

                losses = {**record["true_loss"]["candidates"], "uniform": uniform.loss}
                plans = record["fidelity"]["plans"]
                write_candidates_report(report_dir, losses, plans, best.name, density)
        return plan_path

    def _fidelity_record(self, fidelity: dict[str, dict[str, Any]]) -> dict[str, Any] | None:
        if not fidelity:
            return None
        c = self.config
        plans = {n: {k: v[k] for k in ("top1", "kl")} for n, v in fidelity.items()}
        return {"length": c.fidelity_length, "texts": c.fidelity_texts, "plans": plans}

    def _report(self, out: Path, solutions, chosen: int | None, problem, plan: Plan, losses, uniform: float) -> None:
        from moa_vllm.planner.report import write_report

        write_report(out, solutions, chosen, problem, plan, losses, self.config.validation_length, uniform_loss=uniform)

    def _retrieval_report(self, out: Path, plan: Plan) -> None:
        """Retrieval mass vs span per head, when the retrieval step ran (it does whenever a weight is set)."""
        from moa_vllm.planner.report import write_retrieval_report
        from moa_vllm.planner.retrieval import head_scores

        data = {n: art.load_npz(self.path(f"retrieval-L{n}.npz")) for n in self.config.lengths}
        if all(d is not None for d in data.values()):
            mass = {n: head_scores(d["offsets"]) for n, d in data.items()}
            write_retrieval_report(out, mass, plan, self.config.validation_length)

    def notes(self) -> str:
        c = self.config
        profiled = {n: self.profiled_count(n) for n in c.levels}
        return (
            f"moa-plan: calibration at {c.levels} tokens (seed {c.seed}), samples profiled per length {profiled}, "
            f"objectives at {list(c.lengths)}, chosen by the true held-out loss at {c.validation_length} "
            f"({c.validation_samples} samples) among the candidates that beat uniform on it"
            + (
                f" and on held-out fidelity ({c.fidelity_texts} x {c.fidelity_length} tokens)"
                if c.fidelity_texts
                else ""
            )
            + f"; loss = answer CE + {c.context_weight} x context CE; rule loss is "
            "token-exact (per-offset influence sums); candidates: influence only, influence + w x retrieval "
            f"mass for w in {list(c.retrieval_weights)}, hybrid-K for K in {list(c.hybrid_heads)}"
        )

    def export(self, density: float, out_dir: Path) -> Path:
        """Copy the plan and its report into out_dir as moa-d{density}.json and moa-d{density}-report/."""
        tag = density_tag(density)
        out_dir.mkdir(parents=True, exist_ok=True)
        plan_src = self.path(f"plan-{tag}.json")
        load_plan(plan_src)  # never export a plan that does not load
        plan_dst = out_dir / f"moa-{tag}.json"
        shutil.copyfile(plan_src, plan_dst)
        report_dst = out_dir / f"moa-{tag}-report"
        shutil.copytree(self.path(f"report-{tag}"), report_dst, dirs_exist_ok=True)
        return plan_dst
