"""Property test (issue 11, part 8): mutated zoo specs never make the loader raise anything but
archir's own errors.

Each example takes a spec from ``specs/zoo`` and mutates it — deletes keys, replaces values by
random JSON-like values (booleans, strings, huge integers, inf/nan, nested lists and mappings)
or numbers by in-range values at the edges of the bounds, inserts unknown keys, wraps values in
search nodes, or cuts the text at a random offset and inserts random characters — then loads it (from text and from a dict), builds its graph and its
cost report. Anything raised must be an :class:`~archir.errors.ArchirError`.
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from archir.errors import ArchirError
from archir.spec.source import parse_source

ZOO = Path(__file__).resolve().parents[1] / "specs" / "zoo"
TEXTS = {p.stem: p.read_text(encoding="utf-8") for p in sorted(ZOO.glob("*.yaml"))}
DATA = {k: parse_source(v)[0] for k, v in TEXTS.items()}

SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(10**30), max_value=10**30),
    st.sampled_from([0, 1, -1, 2**31, 2**63, 2**64, 65536, 65537, 10**9]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([0.0, -0.0, 1e-300, 1e300, 0.5, 2.667]),
    st.text(max_size=12),
    st.sampled_from(["", "yes", "8", "true", "attention", "mamba", "none", "..", "a/b", "\x00"]),
)
VALUES = st.recursive(
    SCALARS,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4),
        st.dictionaries(st.text(max_size=8), inner, max_size=4),
        st.builds(lambda xs: {"choice": xs}, st.lists(inner, max_size=4)),
        st.builds(lambda lo, hi: {"int": [lo, hi]}, inner, inner),
        st.builds(lambda lo, hi: {"float": [lo, hi], "log": True}, inner, inner),
    ),
    max_leaves=8,
)
HUGE = 10**5000  # over Python's int-to-str limit
# in-range values at the edges of the bounds: they pass validation and reach the graph,
# the cost formulas and the budget check
INT_EDGES = [0, 1, 2, 3, 5, 7, 64, 1023, 1024, 4096, 65535, 65536, 2**20, 2**24, 10**8]
FLOAT_EDGES = [0.0, 1e-300, 1e-9, 0.001, 0.5, 0.999, 1.0, 1.5, 7.99, 8.0, 16.0, 63.99, 64.0]
EDGES = st.sampled_from(INT_EDGES + FLOAT_EDGES)


def _paths(data: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Every path to a value in ``data`` (mapping keys and list indices)."""
    out = [prefix] if prefix else []
    if isinstance(data, dict):
        for k, v in data.items():
            out += _paths(v, prefix + (k,))
    elif isinstance(data, list):
        for i, v in enumerate(data):
            out += _paths(v, prefix + (i,))
    return out


def _parent(data: Any, path: tuple[Any, ...]) -> Any:
    for k in path[:-1]:
        data = data[k]
    return data


@st.composite
def mutated_data(draw: st.DrawFn, huge: bool = False) -> dict[str, Any]:
    data = copy.deepcopy(DATA[draw(st.sampled_from(sorted(DATA)))])
    for _ in range(draw(st.integers(1, 4))):
        paths = _paths(data)
        if not paths:
            break
        path = draw(st.sampled_from(paths))
        parent = _parent(data, path)
        op = draw(st.sampled_from(["delete", "replace", "insert", "wrap", "huge", "edge", "edge"]))
        if op == "delete":
            del parent[path[-1]]
        elif op == "replace":
            parent[path[-1]] = draw(VALUES)
        elif op == "insert" and isinstance(parent, dict):
            parent[draw(st.text(min_size=1, max_size=10))] = draw(VALUES)
        elif op == "wrap":
            parent[path[-1]] = {"choice": [parent[path[-1]], draw(VALUES)]}
        elif op == "huge" and huge:
            parent[path[-1]] = HUGE
        elif op == "edge":
            numeric = [
                p
                for p in paths
                if isinstance(_parent(data, p)[p[-1]], int | float)
                and not isinstance(_parent(data, p)[p[-1]], bool)
            ]
            if numeric:
                p = draw(st.sampled_from(numeric))
                _parent(data, p)[p[-1]] = draw(EDGES)
    return data


@st.composite
def edge_data(draw: st.DrawFn) -> dict[str, Any]:
    """A zoo spec with one to three numbers set to in-range edge values of the same type."""
    data = copy.deepcopy(DATA[draw(st.sampled_from(sorted(DATA)))])
    numeric = [
        p
        for p in _paths(data)
        if isinstance(_parent(data, p)[p[-1]], int | float)
        and not isinstance(_parent(data, p)[p[-1]], bool)
        and p != ("archir",)
    ]
    for _ in range(draw(st.integers(1, 3))):
        p = draw(st.sampled_from(numeric))
        old = _parent(data, p)[p[-1]]
        pool = INT_EDGES if isinstance(old, int) else FLOAT_EDGES
        _parent(data, p)[p[-1]] = draw(st.sampled_from(pool))
    return data


def _exercise(spec: Any) -> None:
    """Everything a load, ``archir validate`` and ``archir show`` do with a spec."""
    from archir.cost import analyze, check_budget
    from archir.ir import build_graph
    from archir.spec.space import default_decisions

    if not spec.is_concrete:
        spec = spec.fix(default_decisions(spec.nodes))
    graph = build_graph(spec)
    check_budget(graph)
    analyze(spec)
    spec.to_yaml()


def _only_archir_errors(fn: Any, *args: Any) -> None:
    try:
        fn(*args)
    except ArchirError as exc:
        text = str(exc)
        assert text and "\n" not in text, repr(text)
        assert len(text) < 1000, text[:300]


# ARCHIR_FUZZ_EXAMPLES=5000 runs a longer, randomized search (the default is quick and fixed)
_EXAMPLES = int(os.environ.get("ARCHIR_FUZZ_EXAMPLES", "0"))
FUZZ = settings(
    max_examples=_EXAMPLES or 200,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    derandomize=not _EXAMPLES,
    database=None,
)


def _load_text(text: str) -> None:
    from archir.spec import spec_from_text

    _exercise(spec_from_text(text, "fuzz.yaml"))


def _load_dict(data: dict[str, Any]) -> None:
    from archir.spec import spec_from_dict

    _exercise(spec_from_dict(data))


@FUZZ
@given(mutated_data(), st.booleans())
def test_mutated_specs_as_text(data: dict[str, Any], as_json: bool) -> None:
    text = json.dumps(data) if as_json else yaml.safe_dump(data, sort_keys=False)
    _only_archir_errors(_load_text, text)


@FUZZ
@given(mutated_data(huge=True))
def test_mutated_specs_as_dict(data: dict[str, Any]) -> None:
    _only_archir_errors(_load_dict, data)


@FUZZ
@given(edge_data())
def test_edge_values_reach_the_graph_and_costs(data: dict[str, Any]) -> None:
    _only_archir_errors(_load_dict, data)


@FUZZ
@given(
    st.sampled_from(sorted(TEXTS)),
    st.floats(0.0, 1.0),
    st.floats(0.0, 1.0),
    st.text(max_size=8),
    st.booleans(),
)
def test_cut_and_garbled_text(name: str, cut: float, at: float, junk: str, truncate: bool) -> None:
    text = TEXTS[name]
    if truncate:
        text = text[: int(cut * len(text))]
    i = int(at * len(text))
    text = text[:i] + junk + text[i:]
    _only_archir_errors(_load_text, text)


@FUZZ
@given(st.sampled_from(sorted(TEXTS)), st.floats(0.0, 1.0), st.binary(min_size=1, max_size=6))
def test_random_bytes_in_a_file(name: str, at: float, junk: bytes) -> None:
    from archir.spec import load_spec

    raw = TEXTS[name].encode()
    i = int(at * len(raw))
    path = _TMP / f"{name}.yaml"
    path.write_bytes(raw[:i] + junk + raw[i:])
    _only_archir_errors(lambda: _exercise(load_spec(path)))


_TMP = Path()


@pytest.fixture(autouse=True)
def _tmp(tmp_path: Path) -> None:
    global _TMP
    _TMP = tmp_path
