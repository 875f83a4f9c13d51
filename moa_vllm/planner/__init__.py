"""Offline planner: rule grid, MILP over profiled losses (HiGHS via OR-Tools), Pareto reports. Imports no vLLM."""
