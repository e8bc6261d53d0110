"""Searchers: everything that chooses.

``run_search(spec_path, ...)`` explores the choices a spec leaves open with an Optuna study
(TPE, NSGA-II, random or GP sampling), under the objectives and constraints of the spec's
``search:`` section, and writes a Pareto front of concrete specs (DESIGN.md §7, §9).
"""

from __future__ import annotations

from searchers.objectives import Constraint, Objective, parse_constraint
from searchers.pareto import pareto_front
from searchers.run import SearchResult, run_search

__all__ = [
    "Constraint",
    "Objective",
    "SearchResult",
    "pareto_front",
    "parse_constraint",
    "run_search",
]
