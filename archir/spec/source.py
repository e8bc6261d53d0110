"""Safe YAML/JSON loading that remembers where every value came from.

``parse_source(text, file)`` returns plain Python data (dicts, lists, scalars) and a
:class:`SourceMap` from field paths (tuples of keys and indices) to 1-based (line, column)
positions, so any later error can point at the text. Only the YAML *safe* constructors are
used: a spec can never run code. JSON is a subset of YAML and goes through the same path.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from archir.errors import Location, SpecError

PathKey = tuple[str | int, ...]


def path_str(path: PathKey) -> str:
    """``("model", "layers", 0, "kind")`` -> ``"model.layers.0.kind"``."""
    return ".".join(str(p) for p in path)


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
        return Location(self.file, line, col, path_str(path) or None)


class _Loader(yaml.SafeLoader):
    """The safe loader, reading floats as YAML 1.2 and JSON do (``1e-3`` is a number)."""


_Loader.yaml_implicit_resolvers = {
    k: [r for r in v if r[0] != "tag:yaml.org,2002:float"]
    for k, v in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
        |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
        |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
        |[-+]?\.(?:inf|Inf|INF)
        |\.(?:nan|NaN|NAN))$""",
        re.X,
    ),
    list("-+0123456789."),
)

_PLAIN_TAGS = ("tag:yaml.org,2002:map", "tag:yaml.org,2002:seq")


def _build(
    loader: yaml.SafeLoader,
    node: yaml.Node,
    path: PathKey,
    smap: SourceMap,
    active: frozenset[int] = frozenset(),
) -> Any:
    pos = (node.start_mark.line + 1, node.start_mark.column + 1)
    smap.values[path] = pos
    if id(node) in active:
        raise SpecError(
            "a YAML alias refers to a mapping or list that contains it",
            Location(smap.file, pos[0], pos[1], path_str(path) or None),
            "specs must be trees: remove the recursive '*alias'",
        )
    active = active | {id(node)}
    if not isinstance(node, yaml.ScalarNode) and node.tag not in _PLAIN_TAGS:
        raise SpecError(
            f"the YAML tag '{node.tag}' is not allowed",
            Location(smap.file, pos[0], pos[1], path_str(path) or None),
            "specs hold plain data only (a spec can never run code); remove the '!!' tag",
        )
    if isinstance(node, yaml.MappingNode):
        loader.flatten_mapping(node)
        out: dict[str, Any] = {}
        for knode, vnode in node.value:
            key = loader.construct_object(knode, deep=True)
            if not isinstance(key, str | int | float | bool) or isinstance(key, bool):
                raise SpecError(
                    f"mapping keys must be plain names, got {key!r}",
                    smap.locate(path + (str(key),)),
                )
            key = str(key)
            kpos = (knode.start_mark.line + 1, knode.start_mark.column + 1)
            if key in out:
                raise SpecError(
                    f"duplicate key '{key}'",
                    Location(smap.file, kpos[0], kpos[1], path_str(path + (key,))),
                    "each field may appear once in a mapping",
                )
            smap.keys[path + (key,)] = kpos
            out[key] = _build(loader, vnode, path + (key,), smap, active)
        return out
    if isinstance(node, yaml.SequenceNode):
        return [_build(loader, v, path + (i,), smap, active) for i, v in enumerate(node.value)]
    return loader.construct_object(node, deep=True)


def parse_source(text: str, file: str | None = None) -> tuple[Any, SourceMap]:
    """Parse YAML or JSON text into data plus a :class:`SourceMap`.

    Raises:
        SpecError: the text is not valid YAML/JSON (with the line and column of the problem),
            or has duplicate keys or non-string keys.
    """
    smap = SourceMap(file=file)
    loader = _Loader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            raise SpecError("the spec file is empty", Location(file, 1, 1), "see specs/zoo/")
        data = _build(loader, node, (), smap)
    except yaml.constructor.ConstructorError as exc:
        mark = exc.problem_mark or exc.context_mark
        raise SpecError(
            f"invalid YAML: {exc.problem or exc.context}",
            Location(file, mark.line + 1 if mark else None, mark.column + 1 if mark else None),
            "specs hold plain data only (a spec can never run code); remove the '!!' tag",
        ) from None
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark else None
        col = mark.column + 1 if mark else None
        problem = exc.problem or exc.context or "invalid YAML"
        raise SpecError(
            f"invalid YAML: {problem}",
            Location(file, line, col),
            "check indentation and that ':' is followed by a space",
        ) from None
    except yaml.YAMLError as exc:  # pragma: no cover - unmarked YAML errors are rare
        raise SpecError(f"invalid YAML: {exc}", Location(file)) from None
    finally:
        loader.dispose()
    return data, smap


def read_source(path: str | Path) -> tuple[Any, SourceMap]:
    """Read and parse a spec file from disk.

    Raises:
        SpecError: missing/unreadable file or invalid YAML.
    """
    p = Path(path)
    if p.is_dir():
        for name in ("spec.yaml", "spec.yml", "spec.json"):
            if (p / name).is_file():
                p = p / name
                break
        else:
            raise SpecError(
                "is a directory without spec.yaml", Location(str(path)), "pass a spec file"
            )
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise SpecError("no such file", Location(str(path)), "check the path") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise SpecError(f"cannot read file: {exc}", Location(str(path))) from None
    return parse_source(text, str(path))
