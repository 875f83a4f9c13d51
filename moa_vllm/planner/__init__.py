"""Offline planner: rule grid, MILP over profiled losses (HiGHS via OR-Tools, column-generation bound), reports."""
