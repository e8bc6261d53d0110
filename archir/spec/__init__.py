"""Spec files: loading with source positions, typed models, search-space nodes."""

from archir.spec.loader import Spec, load_spec, spec_from_dict, spec_from_text
from archir.spec.space import SearchNode, find_nodes, fix

__all__ = [
    "Spec",
    "SearchNode",
    "find_nodes",
    "fix",
    "load_spec",
    "spec_from_dict",
    "spec_from_text",
]
