"""The planner's validation step (a Pipeline mixin): every candidate plan (each Pareto plan of each retrieval weight)
and the uniform plan of the same density through a real masked forward on held-out samples; the lowest true loss
wins, the ship gate refuses a winner that does not beat uniform; the plan, its report and its export."""

from __future__ import annotations

import logging
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import Any

from moa_vllm.plan.generate import uniform_plan
from moa_vllm.plan.io import load_plan, save_plan
from moa_vllm.plan.schema import Plan
from moa_vllm.planner import artefacts as art
from moa_vllm.planner.artefacts import density_tag
from moa_vllm.planner.gate import ShipGateError, gate
from moa_vllm.planner.optimize import ParetoSolution, PlanningProblem, solution_to_plan

log = logging.getLogger(__name__)

TRUTH_VERSION = 1


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

    def true_losses(self, density: float, retrieval_weight: float = 0.0) -> dict[str, Any]:
        """Held-out true loss (masked forward at the validation length) of one candidate set's plans (plus dense
        and uniform for the influence-only set); checkpointed per plan."""
        from moa_vllm.planner.masked import mean_loss, plan_loss

        plans = self.candidate_plans(density, retrieval_weight)
        name = f"truth-{density_tag(density)}{self.weight_suffix(retrieval_weight)}"
        path, key = self.path(f"{name}.json"), self.truth_key(density, retrieval_weight)
        doc = art.read_json(path)
        if not doc or doc.get("key") != art.normalised(key):
            doc = {"key": art.normalised(key), "complete": False, "plans": {}}
        if doc["complete"]:
            return doc
        samples = self.samples(self.config.validation_length)
        if not samples:
            raise ValueError(f"no held-out samples at the validation length {self.config.validation_length}")
        names = ["dense", *plans] if retrieval_weight == 0 else list(plans)
        todo = [n for n in names if n not in doc["plans"]]
        with (
            self.timings.step(name, plans=len(todo), samples=len(samples)),
            self._bar(len(todo) * len(samples), f"true loss d{density} w{retrieval_weight:g}") as bar,
        ):
            for n in todo:
                losses = []
                for sample in samples:
                    losses += plan_loss(self.model, plans.get(n), [sample], self.config.context_weight)
                    bar.update(1)
                doc["plans"][n] = {"mean": asdict(mean_loss(losses)), "samples": [asdict(x) for x in losses]}
                art.write_json_atomic(path, doc)
        doc["complete"] = True
        art.write_json_atomic(path, doc)
        return doc

    def candidate_losses(self, density: float) -> list[dict[str, Any]]:
        """Every candidate plan's held-out true loss: name, retrieval weight, index in its Pareto set, loss."""
        rows = []
        for w in self.weights:
            truth = self.true_losses(density, w)
            prefix = "" if w == 0 else f"r{w:g}-"
            for i in range(len(self.optimize(density, w))):
                loss = truth["plans"][f"pareto-{i}"]["mean"]["total"]
                rows.append({"name": f"{prefix}pareto-{i}", "retrieval_weight": w, "index": i, "loss": loss})
        return rows

    def validate_key(self, density: float) -> dict[str, Any]:
        tag = density_tag(density)
        truth = {
            f"{w:g}": art.digest(art.read_json(self.path(f"truth-{tag}{self.weight_suffix(w)}.json")))
            for w in self.weights
        }
        key: dict[str, Any] = {"truth": truth["0"] if len(truth) == 1 else truth}
        key["fingerprint"] = self.fingerprint.model_dump()
        return key

    def validate(self, density: float) -> Path:
        """Pick the candidate plan (every Pareto plan of every retrieval weight) with the lowest held-out true
        loss; refuse it when the uniform plan of the same density does at least as well (the ship gate); write the
        plan and its report."""
        candidates = self.candidate_losses(density)
        base = self.true_losses(density)
        tag = density_tag(density)
        path, key = self.path(f"validate-{tag}.json"), self.validate_key(density)
        plan_path, report_dir = self.path(f"plan-{tag}.json"), self.path(f"report-{tag}")
        uniform = base["plans"]["uniform"]["mean"]["total"]
        best = min(candidates, key=lambda c: c["loss"])
        verdict = gate(best["loss"], uniform, density, self.config.validation_length)
        if verdict is not None and not self.config.ship_gate:
            log.warning("%s (ship gate off: written anyway)", verdict.replace("; no plan written", ""))
            verdict = None
        if art.json_matches(path, key) and plan_path.exists() and verdict is None:
            log.info("validate: %s is up to date, skipped", path)
            return plan_path
        weight = best["retrieval_weight"]
        group = [c["loss"] for c in candidates if c["retrieval_weight"] == weight]
        record = {
            "key": key,
            "chosen": best["name"],
            "retrieval_weight": weight,
            "validation_length": self.config.validation_length,
            "true_loss": {
                "candidates": {c["name"]: c["loss"] for c in candidates},
                "pareto": group,
                "uniform": uniform,
                "dense": base["plans"]["dense"]["mean"]["total"],
            },
            "shipped": verdict is None,
            "beats_uniform": best["loss"] < uniform,
        }
        art.write_json_atomic(path, record)
        if verdict is not None:
            plan_path.unlink(missing_ok=True)
            raise ShipGateError(verdict)
        with self.timings.step(f"validate-{tag}"):
            problem, solutions = self.problem(density, weight), self.optimize(density, weight)
            plan = self._plan(solutions[best["index"]], problem, weight)
            plan.metadata.extra["true_loss"] = {
                "length": self.config.validation_length,
                "samples": len(base["plans"]["dense"]["samples"]),
                "plan": best["loss"],
                "uniform": uniform,
                "dense": record["true_loss"]["dense"],
                "beats_uniform": best["loss"] < uniform,
                "candidates": record["true_loss"]["candidates"],
            }
            save_plan(plan, plan_path)
            self._report(report_dir, solutions, best["index"], problem, plan, group, uniform)
            self._retrieval_report(report_dir, plan)
        return plan_path

    def _report(self, out: Path, solutions, chosen: int, problem, plan: Plan, losses, uniform: float) -> None:
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
            f"({c.validation_samples} samples); loss = answer CE + {c.context_weight} x context CE; rule loss is "
            "token-exact (per-offset influence sums); candidate sets: influence only and influence + w x retrieval "
            f"mass for w in {list(c.retrieval_weights)}"
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
