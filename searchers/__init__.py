"""Searchers: everything that chooses (DESIGN.md §7).

``run_search(spec, searcher=..., ...)`` explores the choices a spec leaves open with a
registered :class:`Searcher` — ``optuna`` (TPE, NSGA-II, random or GP sampling, trial by
trial), ``darts`` / ``spos`` (one-shot supernets) ... (:func:`searcher_names`) — under the
objectives and constraints of the spec's ``search:`` section, and writes a Pareto front of
concrete specs (DESIGN.md §9).
"""

from __future__ import annotations

from searchers.base import Searcher, get_searcher, register_searcher, searcher_names
from searchers.objectives import Constraint, Objective, parse_constraint
from searchers.pareto import pareto_front
from searchers.run import SearchResult, run_search

__all__ = [
    "Constraint",
    "Objective",
    "SearchResult",
    "Searcher",
    "get_searcher",
    "pareto_front",
    "parse_constraint",
    "register_searcher",
    "run_search",
    "searcher_names",
]
