"""A spec's search-space nodes as Optuna define-by-run suggestions.

``suggest(trial)`` returns a decider for :meth:`archir.spec.loader.Spec.fix`: the spec walks
its data and asks the decider only for nodes it actually reaches, so a parameter inside an
option that was not chosen is never suggested (conditional spaces for free). Tied nodes are
asked once, under their ``tie`` name.

========================= ================================================================
node                      Optuna call
========================= ================================================================
``{choice: [a, b]}``      ``suggest_categorical(name, [a, b])`` (scalars)
``{choice: [{..}, {..}]}``  ``suggest_categorical(name, [0, 1])`` (option index)
``{int: [lo, hi], step}`` ``suggest_int(name, lo, hi, step=step, log=log)``
``{float: [lo, hi]}``     ``suggest_float(name, lo, hi, log=log)``
========================= ================================================================
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import optuna

from archir.spec.space import SearchNode, random_decider

if TYPE_CHECKING:
    from archir.spec.loader import Spec

__all__ = ["random_decider", "space_description", "space_hash", "spec_hash", "suggest"]


def suggest(trial: optuna.Trial) -> Callable[[SearchNode], Any]:
    """A decider mapping each reached node to an Optuna suggestion on ``trial``."""

    def decide(node: SearchNode) -> Any:
        if node.type == "choice":
            return trial.suggest_categorical(node.name, list(node.allowed() or ()))
        assert node.low is not None and node.high is not None
        if node.type == "int":
            return trial.suggest_int(
                node.name,
                int(node.low),
                int(node.high),
                step=1 if node.log else int(node.step or 1),
                log=node.log,
            )
        return trial.suggest_float(node.name, float(node.low), float(node.high), log=node.log)

    return decide


def space_description(nodes: list[SearchNode]) -> list[list[str]]:
    """``[[decision name, description], ...]`` once per decision name (ties merged)."""
    seen: dict[str, str] = {}
    for n in nodes:
        seen.setdefault(n.name, n.describe())
    return [[k, v] for k, v in seen.items()]


def space_hash(nodes: list[SearchNode]) -> str:
    """A short stable hash of the space (decision names and their options/ranges); a study
    whose stored hash differs was made from a different space."""
    text = json.dumps(space_description(nodes), sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def spec_hash(spec: Spec) -> str:
    """Hash of what a trial trains: the architecture's canonical hash
    (:func:`archir.hashing.canonical_hash` — identical graphs written differently hash the
    same) combined with a hash of the validated ``train:`` section. Two trials with the same
    hash build and train the same model, so the later one reuses the earlier one's result.
    A MAD task's hash also holds its data version (:data:`archir.tasks.mad.DATA_VERSION`)."""
    from archir.hashing import canonical_hash

    train = spec.model.train.model_dump(mode="json")
    if train.get("init") is None:  # absent when unset: hashes of earlier studies stay
        train.pop("init", None)
    if str(train.get("task", "")).startswith("mad:"):
        # MAD's data and metric changed to the reference's (archir.tasks.mad.DATA_VERSION
        # 2): a study's version-1 results are not this version's (absent for other tasks,
        # whose hashes stay)
        from archir.tasks.mad import DATA_VERSION

        train["mad_data_version"] = DATA_VERSION
    t = hashlib.sha256(json.dumps(train, sort_keys=True, default=str).encode()).hexdigest()
    both = f"{canonical_hash(spec)}:{t}"
    return hashlib.sha256(both.encode()).hexdigest()[:16]
