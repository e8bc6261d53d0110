"""Search-space nodes and fixing them into a concrete spec.

A search-space node may stand wherever a value may stand in a spec::

    d_model: {choice: [128, 192, 256]}          # categorical
    repeat: {int: [2, 6]}                        # integer range, inclusive; optional step, log
    lr: {float: [1e-4, 1e-2], log: true}         # float range
    kind: {choice: [attention, mamba], tie: mixer}   # one decision shared by every 'mixer'

Options of a ``choice`` may themselves be mappings holding further nodes; those nodes are
*conditional*: they are only decided when their option is chosen (define-by-run).

A node's decision name is its ``tie`` if given, else its field path (``model.d_model``).
A decision for a ``choice`` is the option itself when every option is a plain scalar,
otherwise the option's index.
"""

from __future__ import annotations

import copy
import math
import numbers
import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from archir.errors import SpecError, did_you_mean
from archir.spec.source import MAX_INT, PathKey, SourceMap, path_str, short_repr

NODE_KEYS = ("choice", "int", "float")
NODE_OPTIONAL = {"tie", "log", "step"}

#: Most options of one ``choice``.
MAX_CHOICE_OPTIONS = 256
#: Most open decisions (search nodes, conditional ones included) in one spec.
MAX_SEARCH_NODES = 512
#: Longest ``tie`` name.
MAX_TIE_CHARS = 128


@dataclass(frozen=True)
class SearchNode:
    """One open decision of a spec.

    Attributes:
        type: ``"choice"``, ``"int"`` or ``"float"``.
        name: decision name (the ``tie`` name or the dotted field path).
        path: where the node stands in the spec data.
        options: the options of a ``choice`` (``None`` otherwise).
        low, high: inclusive bounds of an ``int``/``float`` range.
        step: step of an ``int`` range (1 by default).
        log: sample on a log scale.
        conditional: the node sits inside a ``choice`` option.
    """

    type: str
    name: str
    path: PathKey
    options: tuple[Any, ...] | None = None
    low: float | None = None
    high: float | None = None
    step: int | None = None
    log: bool = False
    conditional: bool = False

    @property
    def scalar_options(self) -> bool:
        return self.options is not None and all(
            o is None or isinstance(o, bool | int | float | str) for o in self.options
        )

    def signature(self) -> tuple[Any, ...]:
        opts = repr(self.options) if self.options is not None else None
        return (self.type, opts, self.low, self.high, self.step, self.log)

    def allowed(self) -> Sequence[Any] | None:
        """Every decision the node allows, in order, as :meth:`Spec.fix` takes them: a
        ``choice``'s options (their indices when an option is not a plain scalar), every
        step of an ``int`` range (a ``range``: its length costs nothing to ask); ``None`` for
        a ``float`` range, a continuum. The one place that maps a node to its values, so
        deciders, defaults, space sizes and grids agree."""
        if self.type == "choice":
            opts = self.options or ()
            return opts if self.scalar_options else range(len(opts))
        if self.type == "int":
            assert self.low is not None and self.high is not None
            return range(int(self.low), int(self.high) + 1, int(self.step or 1))
        return None

    def describe(self) -> str:
        if self.type == "choice":
            return f"choice {short_repr(list(self.options or ()), 120)}"
        scale = " log" if self.log else ""
        return f"{self.type} [{self.low}, {self.high}]{scale}"


def is_node(value: Any) -> bool:
    """True when ``value`` is a mapping shaped like a search-space node."""
    return (
        isinstance(value, dict)
        and sum(k in value for k in NODE_KEYS) == 1
        and all(k in NODE_KEYS or k in NODE_OPTIONAL for k in value)
    )


def check_node_shape(value: Any, path: PathKey, smap: SourceMap | None) -> None:
    """Reject mappings that look like a search node but are not one (a typo'd key, two kinds).

    Raises:
        SpecError: e.g. ``{choice: [64, 128], tied: width}`` or ``{int: [1, 4], choice: [2]}``.
    """
    if not isinstance(value, dict) or is_node(value):
        return
    present = [k for k in NODE_KEYS if k in value]
    if not present:
        return
    loc = smap.locate(path) if smap else None
    if len(present) > 1:
        raise SpecError(
            f"a search node has exactly one of 'choice', 'int', 'float', got {present}",
            loc,
            "split it into separate fields",
        )
    for key in value:
        if key not in NODE_KEYS and key not in NODE_OPTIONAL:
            raise SpecError(
                f"unknown key '{key}' in a '{present[0]}' search node",
                smap.locate(path + (key,), key=True) if smap else None,
                did_you_mean(str(key), sorted(NODE_OPTIONAL)),
            )


def parse_node(
    value: dict[str, Any], path: PathKey, smap: SourceMap | None, conditional: bool = False
) -> SearchNode:
    """Validate a node mapping and return a :class:`SearchNode`.

    Raises:
        SpecError: empty choice, bad bounds, ``log`` with a non-positive bound, bad ``tie``.
    """

    def err(msg: str, sub: str | None = None, hint: str | None = None) -> SpecError:
        p = path + ((sub,) if sub else ())
        loc = smap.locate(p) if smap else None
        return SpecError(msg, loc, hint)

    tie = value.get("tie")
    if tie is not None and (
        not isinstance(tie, str) or not 0 < len(tie) <= MAX_TIE_CHARS or not tie.isprintable()
    ):
        raise err(f"'tie' must be a name of 1-{MAX_TIE_CHARS} printable characters", "tie")
    name = tie or path_str(path)
    log = value.get("log", False)
    if not isinstance(log, bool):
        raise err("'log' must be true or false", "log")
    if "choice" in value:
        opts = value["choice"]
        if not isinstance(opts, list) or not opts:
            raise err(
                "a 'choice' needs a non-empty list of options",
                "choice",
                "write {choice: [a, b]}",
            )
        if len(opts) > MAX_CHOICE_OPTIONS:
            raise err(
                f"a 'choice' has {len(opts)} options, over the limit of {MAX_CHOICE_OPTIONS}",
                "choice",
                "use an {int: [low, high]} or {float: [low, high]} range for many values",
            )
        if "step" in value or log:
            raise err("'step' and 'log' apply to int/float ranges, not to 'choice'")
        return SearchNode("choice", name, path, tuple(opts), conditional=conditional)
    typ = "int" if "int" in value else "float"
    bounds = value[typ]
    if (
        not isinstance(bounds, list)
        or len(bounds) != 2
        or not all(isinstance(b, int | float) and not isinstance(b, bool) for b in bounds)
    ):
        raise err(f"'{typ}' needs [low, high]", typ, f"write {{{typ}: [2, 6]}}")
    if not all(abs(b) <= MAX_INT for b in bounds):  # also refuses nan
        raise err(f"'{typ}' bounds must be finite numbers within ±{MAX_INT}", typ)
    low, high = bounds
    if typ == "int" and not all(float(b).is_integer() for b in bounds):
        raise err("'int' bounds must be whole numbers", typ)
    if low > high or (typ == "float" and low == high):
        raise err(f"'{typ}' range is empty: low {low} > high {high}", typ)
    if log and low <= 0:
        raise err("a log-scale range needs low > 0", typ)
    step = value.get("step")
    if step is not None:
        if typ != "int" or not isinstance(step, int) or isinstance(step, bool) or step < 1:
            raise err("'step' must be a positive integer on an 'int' range", "step")
        if log:
            raise err("'step' cannot be combined with 'log'", "step")
    if typ == "int":
        low, high = int(low), int(high)
    return SearchNode(
        typ, name, path, None, low, high, step or (1 if typ == "int" else None), log, conditional
    )


Decide = Mapping[str, Any] | Callable[[SearchNode], Any]


def find_nodes(data: Any, smap: SourceMap | None = None) -> list[SearchNode]:
    """Every search node of a spec, including conditional ones inside choice options.

    Raises:
        SpecError: a malformed node, or a ``tie`` name used by nodes that differ.
    """
    out: list[SearchNode] = []

    def walk(v: Any, path: PathKey, cond: bool) -> None:
        check_node_shape(v, path, smap)
        if is_node(v):
            node = parse_node(v, path, smap, cond)
            out.append(node)
            if node.options is not None:
                for i, opt in enumerate(node.options):
                    walk(opt, path + ("choice", i), True)
            return
        if isinstance(v, dict):
            for k, sub in v.items():
                walk(sub, path + (k,), cond)
        elif isinstance(v, list):
            for i, sub in enumerate(v):
                walk(sub, path + (i,), cond)

    walk(data, (), False)
    if len(out) > MAX_SEARCH_NODES:
        n = out[MAX_SEARCH_NODES]
        raise SpecError(
            f"the spec has {len(out)} search nodes, over the limit of {MAX_SEARCH_NODES}",
            smap.locate(n.path) if smap else None,
            "tie nodes that make the same decision ('tie: name') or fix some values",
        )
    ties: dict[str, SearchNode] = {}
    for n in out:
        if n.name in ties and ties[n.name].signature() != n.signature():
            loc = smap.locate(n.path) if smap else None
            raise SpecError(
                f"tie '{n.name}' is used by nodes with different options "
                f"({ties[n.name].describe()} vs {n.describe()})",
                loc,
                "tied nodes must be written identically",
            )
        ties.setdefault(n.name, n)
    return out


def _is_number(v: Any) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


def option_index(options: tuple[Any, ...], value: Any) -> int | None:
    """Index of the option ``value`` names: the same object, else an equal value of the same
    type, else an equal number (``2`` names ``2.0``); ``True`` never names ``1``."""
    for i, o in enumerate(options):
        if o is value:
            return i
    for i, o in enumerate(options):
        if type(o) is type(value) and o == value:
            return i
    if _is_number(value):
        for i, o in enumerate(options):
            if _is_number(o) and o == value:
                return i
    return None


def _check_decision(node: SearchNode, value: Any, smap: SourceMap | None) -> Any:
    loc = smap.locate(node.path) if smap else None
    if node.type == "choice":
        assert node.options is not None
        if node.scalar_options:
            idx = option_index(node.options, value)
            if idx is None:
                raise SpecError(
                    f"decision {short_repr(value)} for '{node.name}' is not one of "
                    f"{short_repr(list(node.options), 200)}",
                    loc,
                )
            return node.options[idx]
        if (
            not isinstance(value, int)
            or isinstance(value, bool)
            or not 0 <= value < len(node.options)
        ):
            raise SpecError(
                f"decision for '{node.name}' must be an option index 0..{len(node.options) - 1}",
                loc,
            )
        return node.options[value]
    assert node.low is not None and node.high is not None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise SpecError(
            f"decision for '{node.name}' must be a number, got {short_repr(value)}", loc
        )
    if not node.low <= value <= node.high:
        raise SpecError(
            f"decision {value} for '{node.name}' is outside [{node.low}, {node.high}]", loc
        )
    if node.type == "int":
        if not float(value).is_integer():
            raise SpecError(f"decision for '{node.name}' must be an integer", loc)
        if node.step and (int(value) - int(node.low)) % node.step:
            raise SpecError(
                f"decision {value} for '{node.name}' is not on the grid {node.low}, "
                f"{int(node.low) + node.step}, ... (step {node.step})",
                loc,
            )
        return int(value)
    return float(value)


def fix(
    data: Any,
    decide: Decide,
    smap: SourceMap | None = None,
    trace: dict[PathKey, PathKey] | None = None,
    post: Callable[[dict[str, Any], dict[str, Any]], dict[str, Any]] | None = None,
) -> tuple[Any, dict[str, Any]]:
    """Replace every search node by a decision; return ``(concrete_data, decisions)``.

    ``decide`` is a mapping from decision name to value, or a callable ``node -> value``
    (e.g. wrapping an Optuna trial). Nodes inside an option that was not chosen are never
    asked for (conditional, define-by-run). Tied nodes are decided once.

    ``trace``, when given, receives ``concrete path -> written path`` for every replaced node
    (so errors in the fixed spec can point at the text); ``post(raw_mapping, fixed_mapping)``
    may rewrite every fixed mapping.

    Raises:
        SpecError: a decision is missing or outside its node's options/range.
    """
    decisions: dict[str, Any] = {}

    def get(node: SearchNode) -> Any:
        if node.name in decisions:
            raw = decisions[node.name]
        elif callable(decide):
            raw = decide(node)
        else:
            if node.name not in decide:
                loc = smap.locate(node.path) if smap else None
                raise SpecError(
                    f"no decision given for '{node.name}' ({node.describe()})",
                    loc,
                    "give every open node a value",
                )
            raw = decide[node.name]
        decisions[node.name] = raw
        return _check_decision(node, raw, smap)

    def walk(v: Any, path: PathKey, dst: PathKey, cond: bool) -> Any:
        if is_node(v):
            node = parse_node(v, path, smap, cond)
            chosen = get(node)
            if node.type == "choice":
                idx = option_index(node.options or (), chosen)
                assert idx is not None
                src = path + ("choice", idx)
                if trace is not None:
                    trace[dst] = src
                return walk(chosen, src, dst, True)
            if trace is not None:
                trace[dst] = path
            return chosen
        if isinstance(v, dict):
            out = {k: walk(sub, path + (k,), dst + (k,), cond) for k, sub in v.items()}
            return post(v, out) if post is not None else out
        if isinstance(v, list):
            return [walk(sub, path + (i,), dst + (i,), cond) for i, sub in enumerate(v)]
        return copy.deepcopy(v)

    return walk(data, (), (), False), decisions


def default_decisions(nodes: list[SearchNode]) -> Callable[[SearchNode], Any]:
    """A decider picking the first option / the low end of every range."""

    def decide(node: SearchNode) -> Any:
        allowed = node.allowed()
        return allowed[0] if allowed is not None else node.low

    return decide


def random_decider(rng: random.Random) -> Callable[[SearchNode], Any]:
    """A decider drawing uniformly with ``rng`` (log-uniformly for ``log`` ranges: an
    ``int`` one rounded to the nearest whole number), for :meth:`Spec.fix`."""

    def decide(node: SearchNode) -> Any:
        allowed = node.allowed()
        if allowed is not None and not (node.log and node.type == "int"):
            return allowed[rng.randrange(len(allowed))]
        assert node.low is not None and node.high is not None
        if node.log:
            x = math.exp(rng.uniform(math.log(node.low), math.log(node.high)))
            return int(round(x)) if node.type == "int" else x
        return rng.uniform(node.low, node.high)

    return decide


def space_size(nodes: list[SearchNode]) -> float:
    """Number of distinct points of the unconditional part of a space (inf for floats)."""
    size = 1.0
    for n in nodes:
        if n.conditional:
            continue
        allowed = n.allowed()
        if allowed is None:
            return math.inf
        size *= len(allowed)
    return size
