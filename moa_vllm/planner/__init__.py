"""Offline planner: rule grid, MILP over profiled losses (OR-Tools CP-SAT), Pareto reports. Imports no vLLM."""
