"""Loading and validating spec files: ``load_spec(path) -> Spec``.

A :class:`Spec` wraps the spec data as written (possibly holding search-space nodes), the
source map used to locate errors, and — for a concrete spec — the validated
:class:`~archir.spec.models.SpecModel`. An *open* spec (one with search nodes) is validated
by checking every option of every node against the typed models, so a typo in an option that
a search would only reach after an hour is reported at load time.
"""

from __future__ import annotations

import itertools
import re
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError

from archir import registry
from archir.errors import SpecError, did_you_mean
from archir.paths import NAME_HINT
from archir.spec.models import COMMON_BLOCK_KEYS, BlockSpec, ComponentSpec, SpecModel
from archir.spec.source import (
    PathKey,
    SourceMap,
    dump_yaml,
    field_str,
    parse_source,
    plain_data,
    read_source,
    short_repr,
    show_text,
)
from archir.spec.space import (
    Decide,
    SearchNode,
    default_decisions,
    find_nodes,
    fix,
    is_node,
    option_index,
)

Trace = dict[PathKey, PathKey]


def _translate(path: PathKey, trace: Trace | None) -> PathKey:
    """Map a path in fixed (concrete) data back to the path in the written spec."""
    if not trace:
        return path
    for n in range(len(path), -1, -1):
        src = trace.get(path[:n])
        if src is not None:
            return src + path[n:]
    return path


def _model_fields(model: type[BaseModel]) -> list[str]:
    return list(model.model_fields)


def _fields_at(loc: tuple[Any, ...]) -> list[str]:
    """Valid field names of the pydantic model that sits at ``loc`` (for hints)."""
    from archir.spec import models as m
    from archir.spec import sections as s

    table: dict[tuple[Any, ...], type[BaseModel]] = {
        (): m.SpecModel,
        ("model",): m.ModelSpec,
        ("train",): s.TrainSection,
        ("search",): s.SearchSection,
        ("search", "budget"): s.BudgetSection,
    }
    if len(loc) == 3 and loc[:1] == ("model",) and loc[1] == "layers":
        return _model_fields(m.LayerGroup)
    model = table.get(tuple(loc))
    return _model_fields(model) if model else []


_KIND_OF = {dict: "a mapping", list: "a list"}


def _clean_message(err: Any) -> str:
    """Pydantic's message as ``must be ..., got <value>`` (one ``got``, no internals)."""
    msg = str(err["msg"])
    typ = str(err["type"])
    if msg.startswith("Value error, "):
        msg = msg[len("Value error, ") :]
    if msg.startswith("Assertion failed, "):
        msg = msg[len("Assertion failed, ") :]
    if typ.endswith(("_parsing", "_type", "_from_float")) and ", " in msg:
        msg = msg.split(", ")[0]  # "Input should be a valid integer, unable to parse ..."
    if msg.startswith("Input should be "):
        msg = "must be " + msg[len("Input should be ") :]
    elif msg.startswith("String should "):
        msg = "must " + msg[len("String should ") :]
    elif msg.startswith("List should "):
        msg = "must " + msg[len("List should ") :]
        msg = msg.replace(" after validation", "")
    value = err.get("input")
    if isinstance(value, dict | list):
        if typ.endswith("_type") or typ == "literal_error":
            msg += f", got {_KIND_OF[type(value)]}"
    elif "got " not in msg:
        msg += f", got {short_repr(value)}"
    return msg


def _literal_options(err: Any) -> list[str]:
    expected = str((err.get("ctx") or {}).get("expected", ""))
    return re.findall(r"'([^']*)'", expected)


def _raise_validation(
    exc: ValidationError,
    prefix: PathKey,
    smap: SourceMap | None,
    trace: Trace | None,
    fields_hint: list[str] | None = None,
    what: str = "",
) -> None:
    errors = exc.errors(include_url=False)
    # an unknown key is usually a typo of a required one: report it before 'missing'
    err = next((e for e in errors if e["type"] == "extra_forbidden"), errors[0])
    loc = prefix + tuple(err["loc"])
    src = _translate(loc, trace)
    typ = err["type"]
    hint = None
    if typ == "extra_forbidden":
        key = show_text(str(loc[-1]))
        options = fields_hint if fields_hint is not None else _fields_at(tuple(err["loc"])[:-1])
        hint = did_you_mean(key, options) if options else None
        msg = f"unknown field '{key}'{what}"
        location = smap.locate(src, key=True) if smap else None
    elif typ == "missing":
        msg = f"missing required field '{loc[-1]}'{what}"
        location = smap.locate(src[:-1]) if smap else None
        location = (
            type(location)(location.file, location.line, location.column, field_str(src))
            if location
            else None
        )
    else:
        msg = _clean_message(err)
        if typ == "literal_error" and isinstance(err.get("input"), str):
            hint = did_you_mean(err["input"], _literal_options(err))
            if hint and hint.startswith("expected one of"):
                hint = None  # the message already lists them
        location = smap.locate(src) if smap else None
        if tuple(loc) == ("archir",):
            hint = "this version of archir reads spec format 'archir: 1'"
        if tuple(loc) == ("name",):
            hint = NAME_HINT
    more = len(errors) - 1
    if more > 0:
        hint = (hint + "; " if hint else "") + f"{more} more problem(s) after this one"
    raise SpecError(msg, location, hint) from None


def _a(word: str) -> str:
    return ("an " if word[:1] in "aeiou" else "a ") + word


def _validate_component(
    comp: BlockSpec | ComponentSpec,
    path: PathKey,
    expected_roles: tuple[str, ...],
    smap: SourceMap | None,
    trace: Trace | None,
) -> None:
    def loc(p: PathKey) -> Any:
        return smap.locate(_translate(p, trace)) if smap else None

    try:
        kind = registry.get(comp.kind)
    except KeyError:
        role_word = "block" if len(expected_roles) > 1 else expected_roles[0]
        raise SpecError(
            f"unknown {role_word} kind '{show_text(comp.kind)}'",
            loc(path + ("kind",)),
            did_you_mean(comp.kind, [k.name for r in expected_roles for k in registry.kinds(r)])
            or "run 'archir blocks' to list kinds",
        ) from None
    if kind.role not in expected_roles:
        raise SpecError(
            f"kind '{comp.kind}' is a {kind.role}, not {_a(' or '.join(expected_roles))}",
            loc(path + ("kind",)),
            "run 'archir blocks' to list kinds by role",
        )
    if isinstance(comp, BlockSpec) and comp.role is not None and comp.role != kind.role:
        raise SpecError(
            f"role '{show_text(comp.role)}' does not match kind '{comp.kind}', "
            f"which is a {kind.role}",
            loc(path + ("role",)),
            f"write role: {kind.role} or leave role out",
        )
    try:
        params = kind.params.model_validate(comp.kind_params())
    except ValidationError as exc:
        common = COMMON_BLOCK_KEYS if isinstance(comp, BlockSpec) else {"kind", "bits"}
        _raise_validation(
            exc,
            path,
            smap,
            trace,
            list(kind.params.model_fields) + sorted(common),
            f" for kind '{comp.kind}'",
        )
    comp._params = params


def _check_norm(name: str | None, path: PathKey, smap: SourceMap | None, trace: Trace | None):
    if name is None or name == "none":
        return
    if name not in registry.names("norm"):
        raise SpecError(
            f"unknown norm kind '{show_text(name)}'",
            smap.locate(_translate(path, trace)) if smap else None,
            did_you_mean(name, registry.names("norm") + ["none"]),
        )


def validate_concrete(
    data: Any, smap: SourceMap | None = None, trace: Trace | None = None
) -> SpecModel:
    """Validate concrete spec data into a :class:`SpecModel` with each kind's params attached.

    Raises:
        SpecError: located at the offending field, with a hint where one is known.
    """
    if not isinstance(data, dict):
        raise SpecError(
            "a spec must be a mapping with 'archir', 'name' and 'model'",
            smap.locate(()) if smap else None,
            "see specs/zoo/transformer.yaml",
        )
    try:
        spec = SpecModel.model_validate(data)
    except ValidationError as exc:
        _raise_validation(exc, (), smap, trace)
    m = spec.model
    _validate_component(m.embed, ("model", "embed"), ("embedding",), smap, trace)
    _validate_component(m.head, ("model", "head"), ("head",), smap, trace)
    _check_norm(m.norm, ("model", "norm"), smap, trace)
    _check_norm(m.final_norm, ("model", "final_norm"), smap, trace)
    for gi, group in enumerate(m.layers):
        if group.downsample is not None:
            dpath: PathKey = ("model", "layers", gi, "downsample")
            _validate_component(group.downsample, dpath, ("embedding",), smap, trace)
            if not registry.get(group.downsample.kind).extra.get("downsample"):
                down = [k.name for k in registry.kinds("embedding") if k.extra.get("downsample")]
                raise SpecError(
                    f"kind '{group.downsample.kind}' does not downsample a token grid",
                    smap.locate(_translate(dpath + ("kind",), trace)) if smap else None,
                    "a layer group's downsample is one of: " + ", ".join(down),
                )
        for bi, block in enumerate(group.blocks):
            path: PathKey = ("model", "layers", gi, "blocks", bi)
            _validate_component(block, path, ("token_mixer", "channel_mixer", "norm"), smap, trace)
            _check_norm(block.norm, path + ("norm",), smap, trace)
    return spec


def _prune_choice_kind(raw: Any, concrete: Any) -> Any:
    """A block whose ``kind`` was a choice keeps only the keys its chosen kind accepts."""
    if not (isinstance(raw, dict) and isinstance(concrete, dict) and is_node(raw.get("kind"))):
        return concrete
    kind = concrete.get("kind")
    if not isinstance(kind, str):
        return concrete
    try:
        accepted = set(registry.get(kind).params.model_fields)
    except KeyError:
        return concrete
    return {k: v for k, v in concrete.items() if k in COMMON_BLOCK_KEYS or k in accepted}


def _check_choice_kind_keys(data: Any, smap: SourceMap | None) -> None:
    """Keys beside a ``kind: {choice: [...]}`` must be accepted by at least one option."""

    def walk(v: Any, path: PathKey) -> None:
        if isinstance(v, dict):
            kn = v.get("kind")
            if is_node(kn) and "choice" in kn and all(isinstance(o, str) for o in kn["choice"]):
                accepted: set[str] = set(COMMON_BLOCK_KEYS)
                for opt in kn["choice"]:
                    try:
                        accepted |= set(registry.get(opt).params.model_fields)
                    except KeyError:
                        pass  # reported by the per-option validation
                for key in v:
                    if key not in accepted:
                        raise SpecError(
                            f"unknown field '{show_text(key)}': no kind in "
                            f"{short_repr(kn['choice'], 120)} accepts it",
                            smap.locate(path + (key,), key=True) if smap else None,
                            did_you_mean(key, sorted(accepted)),
                        )
            for k, sub in v.items():
                walk(sub, path + (k,))
        elif isinstance(v, list):
            for i, sub in enumerate(v):
                walk(sub, path + (i,))

    walk(data, ())


class Spec:
    """A spec as written: data (possibly open), where it came from, and its validation.

    Attributes:
        data: the spec data as loaded (search nodes kept).
        smap: positions of fields in the source text (for errors).
        nodes: the open decisions (empty for a concrete spec).
        decisions: for a spec made by :meth:`fix`, the decisions that made it.
    """

    def __init__(
        self,
        data: Any,
        smap: SourceMap | None = None,
        *,
        decisions: dict[str, Any] | None = None,
        trace: Trace | None = None,
    ) -> None:
        self.data = data
        self.smap = smap or SourceMap()
        self.decisions = decisions or {}
        self.nodes: list[SearchNode] = find_nodes(data, self.smap)
        self._model: SpecModel | None = None
        if self.nodes:
            self._validate_open()
        else:
            self._model = validate_concrete(data, self.smap, trace)

    # -- properties -------------------------------------------------------------------
    @property
    def file(self) -> str | None:
        return self.smap.file

    @property
    def is_concrete(self) -> bool:
        return not self.nodes

    @property
    def name(self) -> str:
        return str(self.data.get("name", "spec")) if isinstance(self.data, dict) else "spec"

    @property
    def model(self) -> SpecModel:
        """The validated concrete spec. Raises SpecError for an open spec."""
        if self._model is None:
            raise SpecError(
                f"the spec has {len(self.nodes)} open search node(s) (first: {self.nodes[0].name})",
                self.smap.locate(self.nodes[0].path),
                "fix the choices (archir search does) or replace them by values",
            )
        return self._model

    # -- operations --------------------------------------------------------------------
    def fix(self, decide: Decide) -> Spec:
        """The concrete spec for the given decisions (mapping or ``node -> value``).

        Raises:
            SpecError: missing/invalid decision, or the fixed spec does not validate.
        """
        trace: Trace = {}
        concrete, decisions = _fix_traced(self.data, decide, self.smap, trace)
        return Spec._concrete(concrete, self.smap, decisions, trace)

    @classmethod
    def _concrete(cls, data: Any, smap: SourceMap, decisions: dict[str, Any], trace: Trace) -> Spec:
        obj = cls.__new__(cls)
        obj.data = data
        # Errors in a fixed spec (also graph errors) point at the written text via the trace.
        obj.smap = _TracedMap(smap, trace)
        obj.decisions = decisions
        obj.nodes = []
        obj._model = validate_concrete(data, obj.smap, None)
        return obj

    def to_yaml(self) -> str:
        """The spec as YAML text; for a concrete spec it loads back to the same graph."""
        return dump_yaml(self.data)

    def save(self, path: str | Path) -> Path:
        p = Path(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(self.to_yaml(), encoding="utf-8")
        return p

    def _validate_open(self) -> None:
        """Check every option of every node: types at once, graph rules (heads dividing
        d_model ...) against some value of the other nodes that could make it work.

        The checks stop after validating :data:`_MAX_OPEN_WORK` blocks in all (a space so
        large is checked up to there; later options are checked when a search fixes them),
        so loading an open spec takes a bounded time.

        Raises:
            SpecError: an option does not type-check (at the defaults of the other nodes).
            GraphError: an option fails the graph checks for every combination tried.
        """
        from archir.errors import GraphError
        from archir.ir import build_graph

        _check_choice_kind_keys(self.data, self.smap)
        work = 0
        by_name: dict[str, SearchNode] = {n.name: n for n in self.nodes}
        base = default_decisions(self.nodes)
        for node in self.nodes:
            # ancestors of a conditional node must choose the option that holds it
            forced: dict[str, Any] = {}
            for other in self.nodes:
                plen = len(other.path)
                if (
                    other.type == "choice"
                    and len(node.path) > plen + 1
                    and node.path[:plen] == other.path
                    and node.path[plen] == "choice"
                ):
                    idx = int(node.path[plen + 1])
                    forced[other.name] = (other.allowed() or ())[idx]
            relevant = [
                o
                for o in by_name.values()
                if o.name != node.name and o.name not in forced and _related(node, o)
            ]
            for value in _values(node):
                first_error: GraphError | None = None
                for combo in _combos(relevant, limit=_MAX_COMBOS):

                    def decide(
                        n: SearchNode,
                        _v: Any = value,
                        _t: str = node.name,
                        _f: dict[str, Any] = forced,
                        _c: dict[str, Any] = combo,
                    ) -> Any:
                        if n.name == _t:
                            return _v
                        if n.name in _f:
                            return _f[n.name]
                        if n.name in _c:
                            return _c[n.name]
                        return base(by_name.get(n.name, n))

                    if work > _MAX_OPEN_WORK:
                        return  # the budget is spent: the rest is checked when fixed
                    trace: Trace = {}
                    try:
                        concrete, _ = _fix_traced(self.data, decide, self.smap, trace)
                        model = validate_concrete(concrete, self.smap, trace)
                    except SpecError:
                        if first_error is None and not combo:
                            raise  # a type error of this option at the defaults
                        work += 1
                        continue
                    work += 1 + sum(len(g.blocks) * g.repeat for g in model.model.layers)
                    try:
                        build_graph(model, source=_TracedMap(self.smap, trace))
                    except GraphError as exc:
                        first_error = first_error or exc
                        continue
                    first_error = None
                    break
                if first_error is not None:
                    where = node.path
                    if node.type == "choice":
                        at: Any = value
                        if node.scalar_options:
                            at = option_index(node.options or (), value)
                        where = node.path + ("choice", at)
                    first_error.location = self.smap.locate(where)
                    others = ", ".join(o.name for o in relevant[:4])
                    if len(relevant) > 4:
                        others += f" (or {len(relevant) - 4} more)"
                    extra = f"no value of {others} makes it fit" if others else None
                    if extra:
                        first_error.hint = (
                            f"{first_error.hint}; {extra}" if first_error.hint else extra
                        )
                        first_error.args = (str(first_error),)
                    raise first_error

    def __repr__(self) -> str:
        state = "concrete" if self.is_concrete else f"{len(self.nodes)} open nodes"
        return f"Spec({self.name!r}, {state})"


_MAX_COMBOS = 64
#: Blocks validated in all while checking the options of an open spec (about 80 µs each).
_MAX_OPEN_WORK = 50_000


def _values(node: SearchNode) -> list[Any]:
    """The decisions tried for ``node`` when validating an open spec: every option, the
    ends of a range."""
    allowed = node.allowed()
    if node.type == "choice":
        return list(allowed or ())
    if allowed is not None:
        return sorted({allowed[0], allowed[-1]})
    return [node.low, node.high]


def _combos(nodes: list[SearchNode], limit: int) -> list[dict[str, Any]]:
    """``{}`` (everyone at the default) then up to ``limit`` assignments of ``nodes``."""
    out: list[dict[str, Any]] = [{}]
    if not nodes:
        return out
    pools = []
    for n in nodes:
        allowed = n.allowed()
        short = n.type == "int" and allowed is not None and len(allowed) <= 16
        pools.append(list(allowed) if short and allowed is not None else _values(n))
    for i, combo in enumerate(itertools.product(*pools)):
        if i >= limit:
            break
        out.append({n.name: v for n, v in zip(nodes, combo, strict=True)})
    return out


def _related(node: SearchNode, other: SearchNode) -> bool:
    """Could ``other``'s decision change whether ``node``'s option passes the graph checks?

    A block's checks depend on its own parameters and the model-wide fields (``d_model``
    ...); a model-wide field's checks depend on every block, and so do a layer group's
    ``d_model`` and ``downsample`` (a vision stage).
    """

    def block_of(p: PathKey) -> PathKey | None:
        if len(p) >= 5 and p[:2] == ("model", "layers") and p[3] == "blocks":
            return p[:5]
        return None

    def model_wide(p: PathKey) -> bool:
        return len(p) >= 2 and p[0] == "model" and p[1] not in ("layers", "embed", "head")

    def stage(p: PathKey) -> bool:
        # a vision stage's width or downsampling changes what every later block sees
        return len(p) >= 4 and p[:2] == ("model", "layers") and p[3] in ("d_model", "downsample")

    if other.path[:1] != ("model",):
        return False
    if model_wide(node.path) or model_wide(other.path) or stage(node.path) or stage(other.path):
        return True
    b = block_of(node.path)
    return b is not None and b == block_of(other.path)


class _TracedMap(SourceMap):
    """A source map that first translates fixed-data paths to written-spec paths."""

    def __init__(self, inner: SourceMap, trace: Trace) -> None:
        super().__init__(inner.file, inner.values, inner.keys)
        self._trace = trace

    def locate(self, path: PathKey, *, key: bool = False):  # type: ignore[override]
        return super().locate(_translate(tuple(path), self._trace), key=key)


def _fix_traced(
    data: Any, decide: Decide, smap: SourceMap, trace: Trace
) -> tuple[Any, dict[str, Any]]:
    """:func:`fix` recording concrete path -> source path, pruning keys a chosen kind rejects."""
    return fix(data, decide, smap, trace=trace, post=_prune_choice_kind)


def load_spec(path: str | Path) -> Spec:
    """Load, parse and validate a spec file (YAML or JSON).

    Raises:
        SpecError: with file, line, column, field path and a hint.
    """
    data, smap = read_source(path)
    return Spec(data, smap)


def spec_from_text(text: str, file: str | None = None) -> Spec:
    """Like :func:`load_spec` for text already in memory.

    Raises:
        SpecError: with file, line, column, field path and a hint.
    """
    data, smap = parse_source(text, file)
    return Spec(data, smap)


def spec_from_dict(data: dict[str, Any]) -> Spec:
    """A spec built in Python (no source positions). The data is copied and checked like a
    parsed file (:func:`~archir.spec.source.plain_data`: plain types, tuples become lists,
    integers in range, depth and size limits).

    Raises:
        SpecError: located by field path.
    """
    return Spec(plain_data(data))
