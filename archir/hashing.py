"""Canonical hash of an architecture: two specs that build the same graph hash the same.

The hash covers what determines the model — node kinds, their validated parameters (defaults
filled in), wiring, residual structure, bits, weight sharing and the model-wide sizes — and
ignores how the spec was written (names, comments, key order, a ``repeat: 2`` versus two
written-out layer groups, explicit defaults). Searchers use it to avoid training a
candidate twice.
"""

from __future__ import annotations

import hashlib
import json
from typing import TYPE_CHECKING

from archir.ir import Graph, build_graph, graph_summary
from archir.spec.models import SpecModel

if TYPE_CHECKING:
    from archir.spec.loader import Spec


def graph_hash(graph: Graph) -> str:
    """SHA-256 (hex) of the canonical description of a built graph."""
    m = graph.spec.model
    head = {
        "task": m.task,
        "vocab_size": m.vocab_size,
        "n_classes": m.n_classes,
        "image_size": m.image_size,
        "channels": m.channels,
        "d_model": m.d_model,
        "max_seq_len": m.max_seq_len,
        "dropout": m.dropout,
    }
    if m.norm_eps is not None and m.norm_eps != 1e-5:
        # absent when unset or the norms' own default: hashes of earlier studies stay
        head["norm_eps"] = m.norm_eps
    payload = json.dumps(
        {"model": head, "nodes": graph_summary(graph)}, sort_keys=True, default=str
    )
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()


def canonical_hash(spec: Spec | SpecModel) -> str:
    """Canonical hash of a concrete spec (see module docstring).

    Raises:
        SpecError: the spec is open; GraphError: it does not validate.
    """
    return graph_hash(build_graph(spec))
