"""Safe YAML/JSON loading that remembers where every value came from, within fixed limits.

``parse_source(text, file)`` returns plain Python data (dicts, lists, scalars) and a
:class:`SourceMap` from field paths (tuples of keys and indices) to 1-based (line, column)
positions, so any later error can point at the text. JSON is a subset of YAML and goes through
the same path.

A spec can never run code and never costs more than a small, fixed amount of time and memory:

- only plain data is built: mappings, lists, strings, integers, floats, booleans and null
  (any other tag — ``!!python/...``, ``!!binary``, ``!!set`` ... — is refused);
- scalars are read as in YAML 1.2 / JSON: ``1e-3`` is a float, only ``true``/``false`` are
  booleans (``yes``, ``on`` ... are strings), ``2024-01-01`` is a string;
- the data is built from the parser's event stream without recursion, counting as it goes:
  a file over :data:`MAX_SPEC_BYTES`, nesting deeper than :data:`MAX_DEPTH`, more than
  :data:`MAX_NODES` keys and values (aliases counted at every use, so an alias bomb is refused
  after a few milliseconds), an integer outside ±(2^63 - 1), or a control character is refused
  with a located :class:`~archir.errors.SpecError` before any further work;
- YAML merge keys (``<<: *base``) work as YAML defines them: keys written in the mapping
  override merged ones; a key written twice is an error;
- special files (devices, fifos, sockets) are refused from ``os.stat`` without being opened.

libyaml's event parser is used when PyYAML was built with it (about 30x faster than the pure
Python one); syntax errors are reported with PyYAML's wording either way.
"""

from __future__ import annotations

import copy
import errno
import numbers
import os
import re
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from yaml.constructor import SafeConstructor

from archir.errors import Location, SpecError

# libyaml's event parser, when PyYAML was built with it (None otherwise)
_CParser: Any = getattr(yaml, "CParser", None) or getattr(
    getattr(yaml, "cyaml", None), "CParser", None
)

PathKey = tuple[str | int, ...]

#: Largest spec file read (bytes; characters for text given in memory). The largest spec in
#: ``specs/`` is under 3 KiB.
MAX_SPEC_BYTES = 256 * 1024
#: Deepest nesting of mappings and lists (the length of a field path such as
#: ``model.layers.0.blocks.1.kind.choice.0.n_heads`` is 8).
MAX_DEPTH = 64
#: Most keys plus values in a spec, counting the contents of an alias at every use.
MAX_NODES = 20_000
#: Largest magnitude of an integer in a spec.
MAX_INT = 2**63 - 1
#: Longest integer literal read (characters); longer ones are refused unread.
MAX_INT_CHARS = 40
#: Syntax errors found by libyaml after at most this many events are re-read by PyYAML's own
#: parser, so messages are the same whichever parser is installed (bounded: a few ms).
_REPARSE_EVENTS = 2_000

_SIZE_HINT = "a spec is a short text file; check that this is the spec you meant"
_INT_HINT = "integers in a spec lie within ±(2^63 - 1)"


def path_str(path: PathKey) -> str:
    """``("model", "layers", 0, "kind")`` -> ``"model.layers.0.kind"``."""
    return ".".join(str(p) for p in path)


def field_str(path: PathKey) -> str:
    """:func:`path_str` for a message: a long key is cut to 40 characters (``ab...``)."""
    return ".".join(show_text(p, 40) for p in path)


@dataclass
class SourceMap:
    """Positions of values (and of mapping keys) in a spec file."""

    file: str | None = None
    values: dict[PathKey, tuple[int, int]] = field(default_factory=dict)
    keys: dict[PathKey, tuple[int, int]] = field(default_factory=dict)

    def locate(self, path: PathKey, *, key: bool = False) -> Location:
        """Location of ``path``; falls back to the nearest enclosing field that is known."""
        table = self.keys if key else self.values
        p = tuple(path)
        pos = table.get(p)
        probe = p
        while pos is None and probe:
            probe = probe[:-1]
            pos = self.values.get(probe)
        line, col = pos if pos else (None, None)
        return Location(self.file, line, col, field_str(path) or None)


# -- scalar resolution: YAML 1.2 core schema (as JSON), plus ints and merge keys of YAML 1.1 --

_T = "tag:yaml.org,2002:"
_STR, _INT, _FLOAT, _BOOL, _NULL = (_T + t for t in ("str", "int", "float", "bool", "null"))
_MAP, _SEQ, _MERGE = _T + "map", _T + "seq", _T + "merge"
_SCALAR_TAGS = frozenset({_STR, _INT, _FLOAT, _BOOL, _NULL})
_KEEP = frozenset({_INT, _NULL, _MERGE})


class _Resolver(yaml.resolver.BaseResolver):
    """Implicit tags of plain scalars: null, true/false, ints, floats (``1e-3``), ``<<``."""


_Resolver.yaml_implicit_resolvers = {
    k: [r for r in v if r[0] in _KEEP]
    for k, v in yaml.resolver.Resolver.yaml_implicit_resolvers.items()
}
_FLOAT_RE = re.compile(
    r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
    |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
    |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
    |[-+]?\.(?:inf|Inf|INF)
    |\.(?:nan|NaN|NAN))$""",
    re.X,
)
_Resolver.add_implicit_resolver(_FLOAT, _FLOAT_RE, list("-+0123456789."))
_Resolver.add_implicit_resolver(
    _BOOL, re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")
)
_RESOLVER = _Resolver()
_DECIMAL = re.compile(r"[-+]?[0-9]{1,18}\Z")
_CONSTRUCTOR = SafeConstructor()

# Characters YAML allows in a stream (PyYAML's printable set); anything else — NUL, other C0
# and C1 controls, DEL, lone surrogates, U+FFFE/U+FFFF — is refused before parsing.
_BAD_CHAR = re.compile("[^\t\n\r\x20-\x7e\x85\xa0-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")


class _PyEvents(yaml.reader.Reader, yaml.scanner.Scanner, yaml.parser.Parser):
    """PyYAML's pure Python event parser (no composer: nothing recursive), refusing flow
    nesting deeper than :data:`MAX_DEPTH` as it scans (its look-ahead for a key after
    ``[[[[...`` would otherwise take time quadratic in the depth)."""

    def __init__(self, text: str, file: str | None = None) -> None:
        yaml.reader.Reader.__init__(self, text)
        yaml.scanner.Scanner.__init__(self)
        yaml.parser.Parser.__init__(self)
        self.file = file

    def fetch_flow_collection_start(self, TokenClass: Any) -> None:  # noqa: N803 - PyYAML's name
        if self.flow_level >= MAX_DEPTH:
            mark = self.get_mark()
            raise _too_deep(self.file, (mark.line + 1, mark.column + 1), ())
        super().fetch_flow_collection_start(TokenClass)


def _too_deep(file: str | None, pos: tuple[int, int], path: PathKey) -> SpecError:
    shown = field_str(path[:6]) + (".…" if len(path) > 6 else "")
    return SpecError(
        f"the spec is nested more than {MAX_DEPTH} levels deep",
        Location(file, pos[0], pos[1], shown or None),
        "a spec is a shallow tree of mappings and lists",
    )


def _line_col(text: str, index: int) -> tuple[int, int]:
    line = text.count("\n", 0, index) + 1
    return line, index - (text.rfind("\n", 0, index) + 1) + 1


def _check_text(text: str, file: str | None) -> None:
    if len(text) > MAX_SPEC_BYTES:
        raise SpecError(
            f"the spec is {len(text)} characters long, over the limit of {MAX_SPEC_BYTES}",
            Location(file, 1, 1),
            _SIZE_HINT,
        )
    bad = _BAD_CHAR.search(text)
    if bad is not None:
        line, col = _line_col(text, bad.start())
        code = ord(bad.group())
        raise SpecError(
            f"control character U+{code:04X} is not allowed in a spec",
            Location(file, line, col),
            "a spec is plain UTF-8 text; remove the character (a NUL suggests a binary file)",
        )


@dataclass
class _Anchor:
    value: Any
    path: PathKey
    pos: tuple[int, int]
    lo: int  # log range of the entries recorded for the anchored value
    hi: int = -1
    depth: int = 0  # deepest path below the anchored value, relative


@dataclass
class _Frame:
    is_map: bool
    path: PathKey
    anchor: _Anchor | None  # the anchor this mapping or list defines
    out: Any
    key: Any = None  # the pending key of a mapping (None: a key comes next)
    key_pos: tuple[int, int] = (0, 0)
    merge_lo: int = 0  # where the log of the value of a pending '<<' starts
    merges: list[tuple[Any, PathKey, int, int, tuple[int, int]]] = field(default_factory=list)


_NO_KEY = object()
_MERGE_KEY = object()


class _Builder:
    """Plain data and a source map from a stream of YAML events, within the limits."""

    def __init__(self, file: str | None) -> None:
        self.file = file
        self.smap = SourceMap(file=file)
        self.log: list[tuple[bool, PathKey, tuple[int, int]]] = []
        self.anchors: dict[str, _Anchor] = {}
        self.stack: list[_Frame] = []
        self.root: Any = _NO_KEY

    # -- errors ----------------------------------------------------------------------------
    def error(self, msg: str, pos: tuple[int, int] | None, path: PathKey, hint: str) -> SpecError:
        line, col = pos if pos else (None, None)
        return SpecError(msg, Location(self.file, line, col, field_str(path) or None), hint)

    # -- bookkeeping -----------------------------------------------------------------------
    def record(self, path: PathKey, pos: tuple[int, int], key: bool = False) -> None:
        if len(path) > MAX_DEPTH:
            raise self.too_deep(pos, path)
        if len(self.log) >= MAX_NODES:
            raise self.too_many(pos, path)
        (self.smap.keys if key else self.smap.values)[path] = pos
        self.log.append((key, path, pos))

    def too_deep(self, pos: tuple[int, int], path: PathKey) -> SpecError:
        return _too_deep(self.file, pos, path)

    def too_many(self, pos: tuple[int, int], path: PathKey) -> SpecError:
        return self.error(
            f"the spec has more than {MAX_NODES} keys and values (aliases counted at each use)",
            pos,
            path,
            "a spec is a short file; an alias used many times multiplies its contents",
        )

    def child_path(self) -> PathKey:
        if not self.stack:
            return ()
        top = self.stack[-1]
        if not top.is_map:
            return top.path + (len(top.out),)
        return top.path + ("<<" if top.key is _MERGE_KEY else top.key,)

    def place(self, value: Any) -> None:
        if not self.stack:
            self.root = value
            return
        top = self.stack[-1]
        if not top.is_map:
            top.out.append(value)
            return
        if top.key is _MERGE_KEY:
            top.merges.append((value, top.path + ("<<",), top.merge_lo, len(self.log), top.key_pos))
        else:
            top.out[top.key] = value
        top.key = None

    def finish_anchor(self, anchor: _Anchor | None, value: Any) -> None:
        if anchor is None:
            return
        anchor.value = value
        anchor.hi = len(self.log)
        n = len(anchor.path)
        anchor.depth = max((len(p) - n for _, p, _ in self.log[anchor.lo : anchor.hi]), default=0)

    # -- events ----------------------------------------------------------------------------
    def key_event(self, ev: Any, top: _Frame) -> None:
        """The next event is a key of the mapping ``top``."""
        pos = (ev.start_mark.line + 1, ev.start_mark.column + 1)
        if not isinstance(ev, yaml.ScalarEvent):
            what = "an alias" if isinstance(ev, yaml.AliasEvent) else "a mapping or list"
            raise self.error(
                f"mapping keys must be plain names, got {what}",
                pos,
                top.path,
                "write keys as plain words",
            )
        tag = self.scalar_tag(ev, top.path, pos)
        if tag == _MERGE:
            key: Any = _MERGE_KEY
            name = "<<"
        else:
            key = self.scalar_value(ev, tag, top.path, pos)
            if not isinstance(key, str | int | float) or isinstance(key, bool):
                raise self.error(
                    f"mapping keys must be plain names, got {key!r}",
                    pos,
                    top.path,
                    "write keys as plain words",
                )
            key = name = str(key)
        if name in top.out or (key is _MERGE_KEY and top.merges):
            raise self.error(
                f"duplicate key '{show_text(name)}'",
                pos,
                top.path + (name,),
                "each field may appear once in a mapping",
            )
        top.key = key
        top.key_pos = pos
        if key is not _MERGE_KEY:
            self.record(top.path + (key,), pos, key=True)
        else:
            top.merge_lo = len(self.log)

    def scalar_tag(self, ev: Any, path: PathKey, pos: tuple[int, int]) -> str:
        tag = ev.tag
        if tag is None or tag == "!":
            return str(_RESOLVER.resolve(yaml.ScalarNode, ev.value, ev.implicit))
        if tag in _SCALAR_TAGS:
            return str(tag)
        if tag in SafeConstructor.yaml_constructors:
            raise self.error(
                f"the YAML tag '{show_text(tag)}' is not allowed",
                pos,
                path,
                "specs hold plain data only (a spec can never run code); remove the '!!' tag",
            )
        raise SpecError(
            f"invalid YAML: could not determine a constructor for the tag '{show_text(tag)}'",
            Location(self.file, pos[0], pos[1]),
            "specs hold plain data only (a spec can never run code); remove the '!!' tag",
        )

    def scalar_value(self, ev: Any, tag: str, path: PathKey, pos: tuple[int, int]) -> Any:
        text = ev.value
        node = yaml.ScalarNode(tag, text, ev.start_mark, ev.end_mark)
        try:
            if tag == _INT:
                if _DECIMAL.match(text):
                    value = int(text)
                    if abs(value) <= MAX_INT:
                        return value
                if len(text) > MAX_INT_CHARS:
                    raise self.error(
                        f"integer literal of {len(text)} characters is too long "
                        f"(at most {MAX_INT_CHARS})",
                        pos,
                        path,
                        _INT_HINT,
                    )
                value = _CONSTRUCTOR.construct_yaml_int(node)
                if abs(value) > MAX_INT:
                    raise self.error(
                        f"integer {value} is out of range",
                        pos,
                        path,
                        _INT_HINT,
                    )
                return value
            if tag == _FLOAT:
                return _CONSTRUCTOR.construct_yaml_float(node)
            if tag == _BOOL and text.lower() in ("true", "false"):
                return text.lower() == "true"
            if tag == _NULL and text in ("", "~", "null", "Null", "NULL"):
                return None
            if tag in (_BOOL, _NULL):
                raise ValueError(text)
        except (ValueError, IndexError, TypeError):
            raise self.error(
                f"'{show_text(text)}' is not a valid {tag.rsplit(':', 1)[-1]}",
                pos,
                path,
                "write the number in decimal",
            ) from None
        return text

    def alias(self, ev: Any, path: PathKey) -> Any:
        pos = (ev.start_mark.line + 1, ev.start_mark.column + 1)
        anchor = self.anchors.get(ev.anchor)
        if anchor is None:
            raise self.error(
                f"the alias '*{show_text(ev.anchor)}' names no anchor above it",
                pos,
                path,
                f"define it first with '&{show_text(ev.anchor)}'",
            )
        if anchor.hi < 0:
            raise self.error(
                "a YAML alias refers to a mapping or list that contains it",
                anchor.pos,
                path,
                "specs must be trees: remove the recursive '*alias'",
            )
        if len(path) + anchor.depth > MAX_DEPTH:
            raise self.too_deep(pos, path)
        if len(self.log) + (anchor.hi - anchor.lo) > MAX_NODES:
            raise self.too_many(pos, path)
        n = len(anchor.path)
        for is_key, p, p_pos in self.log[anchor.lo : anchor.hi]:
            self.record(path + p[n:], p_pos, key=is_key)
        return copy.deepcopy(anchor.value)

    def end_mapping(self, top: _Frame) -> dict[str, Any]:
        """Apply merge keys: merged keys first (earlier merges win), keys written override."""
        if not top.merges:
            return top.out
        merged: dict[str, tuple[Any, PathKey]] = {}
        for value, mpath, _lo, _hi, mpos in top.merges:
            if isinstance(value, dict):
                items = [(value, mpath)]
            elif isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
                items = [(v, mpath + (i,)) for i, v in enumerate(value)]
            else:
                raise self.error(
                    "a merge key '<<' needs a mapping or a list of mappings",
                    mpos,
                    top.path + ("<<",),
                    "write '<<: *name' where '&name' marks a mapping",
                )
            for sub, src in items:
                for k, v in sub.items():
                    merged.setdefault(k, (v, src))
        # the positions of merged keys that are used move to this mapping; the rest go
        used = {src + (k,) for k, (_, src) in merged.items() if k not in top.out}
        for _value, mpath, lo, hi, _mpos in top.merges:
            for is_key, p, pos in self.log[lo:hi]:
                table = self.smap.keys if is_key else self.smap.values
                if table.get(p) == pos:
                    del table[p]
                for plen in (len(mpath) + 1, len(mpath) + 2):
                    if len(p) >= plen and p[:plen] in used:
                        self.record(top.path + p[plen - 1 :], pos, key=is_key)
                        break
        out = {k: v for k, (v, _) in merged.items() if k not in top.out}
        out.update(top.out)
        return out

    def build(self, events: Any) -> Any:
        """Consume the events of one document; return its data."""
        while True:
            ev = events.get_event()
            if isinstance(ev, yaml.DocumentEndEvent):
                break
            top = self.stack[-1] if self.stack else None
            if top is not None and top.is_map and top.key is None:
                if isinstance(ev, yaml.MappingEndEvent):
                    self.stack.pop()
                    value = self.end_mapping(top)
                    self.finish_anchor(top.anchor, value)
                    self.place(value)
                    continue
                self.key_event(ev, top)
                continue
            if isinstance(ev, yaml.SequenceEndEvent):
                assert top is not None
                self.stack.pop()
                self.finish_anchor(top.anchor, top.out)
                self.place(top.out)
                continue
            path = self.child_path()
            pos = (ev.start_mark.line + 1, ev.start_mark.column + 1)
            if isinstance(ev, yaml.AliasEvent):
                self.place(self.alias(ev, path))
                continue
            self.record(path, pos)
            anchor = None
            if ev.anchor is not None:
                anchor = _Anchor(None, path, pos, len(self.log) - 1)
                self.anchors[ev.anchor] = anchor
            if isinstance(ev, yaml.ScalarEvent):
                tag = self.scalar_tag(ev, path, pos)
                if tag == _MERGE:
                    tag = _STR  # '<<' as a value is a plain string
                value = self.scalar_value(ev, tag, path, pos)
                self.finish_anchor(anchor, value)
                self.place(value)
                continue
            is_map = isinstance(ev, yaml.MappingStartEvent)
            if ev.tag not in (None, "!", _MAP if is_map else _SEQ):
                raise self.error(
                    f"the YAML tag '{show_text(ev.tag)}' is not allowed",
                    pos,
                    path,
                    "specs hold plain data only (a spec can never run code); remove the '!!' tag",
                )
            out: Any = {} if is_map else []
            self.stack.append(_Frame(is_map, path, anchor, out))
        return self.root


def show_text(text: Any, limit: int = 60) -> str:
    """``text`` for a one-line message: control characters escaped (``\\n``), cut to
    ``limit`` characters (``ab...``)."""
    s = str(text)
    if not s.isprintable():
        s = s.encode("unicode_escape").decode("ascii")
    return s if len(s) <= limit else s[: limit - 3] + "..."


def short_repr(value: Any, limit: int = 80) -> str:
    """``repr(value)`` cut to ``limit`` characters (a message stays one short line)."""
    try:
        text = repr(value)
    except ValueError:  # an integer over Python's digit limit, alone or inside a list
        return "<a value too large to show>"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _events(text: str, file: str | None, use_c: bool) -> Any:
    return _CParser(text) if use_c and _CParser is not None else _PyEvents(text, file)


def _yaml_error(exc: yaml.MarkedYAMLError, file: str | None) -> SpecError:
    mark = exc.problem_mark or exc.context_mark
    line = mark.line + 1 if mark else None
    col = mark.column + 1 if mark else None
    problem = exc.problem or exc.context or "invalid YAML"
    return SpecError(
        f"invalid YAML: {problem}",
        Location(file, line, col),
        "check indentation and that ':' is followed by a space",
    )


def _pure_error(text: str, file: str | None) -> SpecError | None:
    """PyYAML's own message for a syntax error (``None`` if its parser finds none)."""
    events = _PyEvents(text, file)
    try:
        for _ in range(2 * _REPARSE_EVENTS):
            if isinstance(events.get_event(), yaml.StreamEndEvent):
                break
    except SpecError as exc:
        return exc
    except yaml.MarkedYAMLError as exc:
        return _yaml_error(exc, file)
    except yaml.YAMLError:
        return None
    finally:
        events.dispose()
    return None


def parse_source(text: str, file: str | None = None) -> tuple[Any, SourceMap]:
    """Parse YAML or JSON text into data plus a :class:`SourceMap`.

    Raises:
        SpecError: the text is not valid YAML/JSON (with the line and column of the problem);
            has duplicate keys, non-string keys, tags other than plain data, or an alias to a
            mapping that contains it; or is over a limit: :data:`MAX_SPEC_BYTES` characters,
            a control character, nesting deeper than :data:`MAX_DEPTH`, more than
            :data:`MAX_NODES` keys and values, an integer outside ±:data:`MAX_INT`.
    """
    if not isinstance(text, str):
        raise SpecError("a spec is text", Location(file), "pass the file's text as a str")
    _check_text(text, file)
    use_c = _CParser is not None
    events = _events(text, file, use_c)
    builder = _Builder(file)
    count = 0
    try:
        ev = events.get_event()  # stream start
        ev = events.get_event()
        count = 2
        if isinstance(ev, yaml.StreamEndEvent):
            raise SpecError("the spec file is empty", Location(file, 1, 1), "see specs/zoo/")
        data = builder.build(events)
        count = len(builder.log)
        ev = events.get_event()
        if not isinstance(ev, yaml.StreamEndEvent):
            raise SpecError(
                "a spec is one YAML document, found a second one",
                Location(file, ev.start_mark.line + 1, ev.start_mark.column + 1),
                "remove the second '---' and what follows, or split the file",
            )
    except yaml.MarkedYAMLError as exc:
        err = None
        if use_c and max(count, len(builder.log)) <= _REPARSE_EVENTS:
            err = _pure_error(text, file)
        raise (err or _yaml_error(exc, file)) from None
    except yaml.YAMLError as exc:  # pragma: no cover - unmarked YAML errors are rare
        raise SpecError(f"invalid YAML: {exc}", Location(file)) from None
    finally:
        dispose = getattr(events, "dispose", None)
        if dispose is not None:
            dispose()
    return data, builder.smap


def plain_data(data: Any) -> Any:
    """A copy of spec data built in Python, checked like parsed text: only mappings, lists
    (tuples become lists), strings, numbers, booleans and null; mapping keys are strings
    (numbers become strings, as in YAML); integers within ±:data:`MAX_INT` (other integral and
    real number types become ``int``/``float``); at most :data:`MAX_DEPTH` levels and
    :data:`MAX_NODES` keys and values. Iterative: no recursion however deep the input.

    Raises:
        SpecError: located by field path, for a value of another type, a key that is not a
            plain name, an integer out of range, or a limit exceeded.
    """
    count = 0

    def bad(msg: str, path: PathKey, hint: str) -> SpecError:
        return SpecError(msg, Location(None, None, None, field_str(path) or None), hint)

    def convert(v: Any, path: PathKey) -> Any:
        nonlocal count
        count += 1
        if count > MAX_NODES:
            raise bad(f"the spec has more than {MAX_NODES} keys and values", path, _SIZE_HINT)
        if len(path) > MAX_DEPTH:
            raise bad(
                f"the spec is nested more than {MAX_DEPTH} levels deep",
                path[:6],
                "a spec is a shallow tree of mappings and lists",
            )
        if v is None or isinstance(v, bool | str):
            return v
        if isinstance(v, numbers.Integral):
            if abs(int(v)) > MAX_INT:
                raise bad(
                    f"integer of {int(v).bit_length()} bits is out of range",
                    path,
                    _INT_HINT,
                )
            return int(v)
        if isinstance(v, numbers.Real):
            return float(v)
        if isinstance(v, dict):
            return {}
        if isinstance(v, list | tuple):
            return []
        raise bad(
            f"a spec holds plain data (mappings, lists, strings, numbers, true/false, null), "
            f"got {show_text(type(v).__name__)}",
            path,
            "convert the value to one of those",
        )

    root = convert(data, ())
    todo: list[tuple[Any, Any, PathKey]] = [(data, root, ())]
    while todo:
        src, dst, path = todo.pop()
        items = src.items() if isinstance(src, dict) else enumerate(src)
        for k, v in items:
            if isinstance(dst, dict):
                if (
                    not isinstance(k, str | int | float)
                    or isinstance(k, bool)
                    or (isinstance(k, int) and abs(k) > MAX_INT)
                ):
                    raise bad(
                        f"mapping keys must be plain names, got a {type(k).__name__}",
                        path,
                        "write keys as plain words",
                    )
                k = str(k)
            child = convert(v, path + (k,))
            if isinstance(dst, dict):
                dst[k] = child
            else:
                dst.append(child)
            if isinstance(v, dict | list | tuple):
                todo.append((v, child, path + (k,)))
    return root


class _Dumper(yaml.SafeDumper):
    """PyYAML's safe dumper, quoting every string this module would read as something else
    (``1e3`` is a float here, not in YAML 1.1), so dumped data loads back the same."""


_Dumper.add_implicit_resolver(_FLOAT, _FLOAT_RE, list("-+0123456789."))


def dump_yaml(data: Any) -> str:
    """Spec data as YAML text that :func:`parse_source` reads back to the same data."""
    return yaml.dump(data, Dumper=_Dumper, sort_keys=False, allow_unicode=True, width=100)


def _stat_error(exc: OSError, shown: str) -> SpecError:
    if exc.errno == errno.ENOENT:
        return SpecError("no such file", Location(shown), "check the path")
    return SpecError(f"cannot read file: {exc.strerror or exc}", Location(shown))


def _kind_of(mode: int) -> str:
    if stat.S_ISFIFO(mode):
        return "a fifo (named pipe)"
    if stat.S_ISSOCK(mode):
        return "a socket"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    return "not a regular file"


def _check_regular(st: os.stat_result, shown: str) -> None:
    if not stat.S_ISREG(st.st_mode):
        raise SpecError(
            f"is {_kind_of(st.st_mode)}, not a spec file",
            Location(shown),
            "pass a spec file (YAML or JSON)",
        )
    if st.st_size > MAX_SPEC_BYTES:
        raise SpecError(
            f"the file is {st.st_size} bytes, over the limit of {MAX_SPEC_BYTES} bytes "
            f"({MAX_SPEC_BYTES // 1024} KiB) for a spec",
            Location(shown),
            _SIZE_HINT,
        )


def read_text(path: str | Path) -> tuple[str, str]:
    """The text of a spec file and the name to show for it (``path``, or ``path/spec.yaml``
    for a run folder), checked before reading.

    Special files (devices, fifos, sockets) are refused from ``os.stat`` without being opened;
    a file over :data:`MAX_SPEC_BYTES` is refused without being read; the file is opened
    non-blocking and at most ``MAX_SPEC_BYTES + 1`` bytes are read.

    Raises:
        SpecError: missing or unreadable file, a directory without ``spec.yaml``, a special
            file, a file over the size limit, or bytes that are not UTF-8 (with line:col).
    """
    shown = str(path)
    p = Path(path)
    try:
        st = os.stat(p)
    except OSError as exc:
        raise _stat_error(exc, shown) from None
    if stat.S_ISDIR(st.st_mode):
        for name in ("spec.yaml", "spec.yml", "spec.json"):
            try:
                inner = os.stat(p / name)
            except OSError:
                continue
            p, st = p / name, inner
            break
        else:
            raise SpecError("is a directory without spec.yaml", Location(shown), "pass a spec file")
    _check_regular(st, shown)
    try:
        fd = os.open(p, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    except OSError as exc:
        raise _stat_error(exc, shown) from None
    try:
        _check_regular(os.fstat(fd), shown)  # the file may have changed since os.stat
        chunks: list[bytes] = []
        left = MAX_SPEC_BYTES + 1
        while left > 0:
            chunk = os.read(fd, min(left, 1 << 16))
            if not chunk:
                break
            chunks.append(chunk)
            left -= len(chunk)
    except OSError as exc:
        raise _stat_error(exc, shown) from None
    finally:
        os.close(fd)
    data = b"".join(chunks)
    if len(data) > MAX_SPEC_BYTES:
        raise SpecError(
            f"the file is over the limit of {MAX_SPEC_BYTES} bytes "
            f"({MAX_SPEC_BYTES // 1024} KiB) for a spec",
            Location(shown),
            _SIZE_HINT,
        )
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        col = len(data[data.rfind(b"\n", 0, exc.start) + 1 : exc.start].decode("utf-8", "replace"))
        raise SpecError(
            f"not UTF-8 text: byte 0x{data[exc.start]:02x} cannot be decoded",
            Location(shown, line, col + 1),
            "a spec is UTF-8 text (YAML or JSON)",
        ) from None
    return text, shown


def read_source(path: str | Path) -> tuple[Any, SourceMap]:
    """Read and parse a spec file from disk (see :func:`read_text` and :func:`parse_source`).

    Raises:
        SpecError: missing/unreadable/special/oversized file, invalid YAML, or a limit of
            :func:`parse_source`.
    """
    text, shown = read_text(path)
    return parse_source(text, shown)
