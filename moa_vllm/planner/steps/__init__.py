"""The planner's steps, one module each, chained by moa_vllm/planner/chain.py:

    calibrate -> Calibration -> profile -> {length: LevelProfile}
                             -> retrieval -> {length: LevelRetrieval}        (when a candidate set needs it)
    profiles (+ retrieval) -> optimize -> ParetoSet per (density, retrieval weight)
    Pareto sets + retrieval + calibration -> validate (true losses, hybrids, fidelity, the gate) -> plan file
    calibration + profiles + Pareto truths -> diagnose -> diagnose.json

Each step is a function of its inputs and the PlannerConfig that returns a typed artefact and writes it to the work
dir, keyed by the digests of its inputs (moa_vllm/planner/artefacts.py): a step whose artefact matches is skipped.
The arithmetic each step runs lives in the planner modules beside this package (calibrate.py, profile.py, ...).
"""
