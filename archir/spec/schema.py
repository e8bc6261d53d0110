"""JSON Schema of the spec format (``archir schema``), for editors.

Built from the pydantic models: each block is one of the registered kinds (``kind`` as a
constant, that kind's parameters typed, nothing else allowed), and every value — a field, a
list item such as a whole block or layer group — may also be a search-space node
(``choice``/``int``/``float``), as the loader accepts. The options of a ``choice`` are not
checked by the schema (the loader checks each of them).
"""

from __future__ import annotations

from typing import Any

from archir import registry
from archir.spec.models import BlockSpec, ComponentSpec, SpecModel
from archir.spec.space import MAX_CHOICE_OPTIONS

SEARCH_NODE: dict[str, Any] = {
    "title": "SearchNode",
    "description": "an open decision: {choice: [...]}, {int: [lo, hi]} or {float: [lo, hi]}",
    "type": "object",
    "properties": {
        "choice": {"type": "array", "minItems": 1, "maxItems": MAX_CHOICE_OPTIONS},
        "int": {"type": "array", "items": {"type": "integer"}, "minItems": 2, "maxItems": 2},
        "float": {"type": "array", "items": {"type": "number"}, "minItems": 2, "maxItems": 2},
        "tie": {"type": "string"},
        "log": {"type": "boolean"},
        "step": {"type": "integer", "minimum": 1},
    },
    "additionalProperties": False,
    "oneOf": [{"required": ["choice"]}, {"required": ["int"]}, {"required": ["float"]}],
}


_NODE_REF = {"$ref": "#/$defs/SearchNode"}


def _or_node(schema: Any) -> dict[str, Any]:
    return {"anyOf": [schema, _NODE_REF]}


def _searchable(schema: Any) -> Any:
    """Allow a search node wherever a value may stand (recursively: on properties, on the
    items of lists and on the values of free-form mappings)."""
    if isinstance(schema, dict):
        out = {k: _searchable(v) for k, v in schema.items()}
        if "properties" in out:
            out["properties"] = {
                k: _or_node(v) if k != "kind" else v for k, v in out["properties"].items()
            }
        if isinstance(out.get("items"), dict):
            out["items"] = _or_node(out["items"])
        if isinstance(out.get("additionalProperties"), dict):
            out["additionalProperties"] = _or_node(out["additionalProperties"])
        return out
    if isinstance(schema, list):
        return [_searchable(v) for v in schema]
    return schema


def _kind_schema(
    kind: registry.BlockKind, base: type[BlockSpec] | type[ComponentSpec]
) -> dict[str, Any]:
    ps = kind.params.model_json_schema()
    common = base.model_json_schema()
    props = dict(common.get("properties", {}))
    props.update(ps.get("properties", {}))
    props["kind"] = {
        "anyOf": [{"const": kind.name}, {"$ref": "#/$defs/SearchNode"}],
        "description": f"{kind.summary} ({kind.paper})",
    }
    defs = {**common.get("$defs", {}), **ps.get("$defs", {})}
    out: dict[str, Any] = {
        "title": kind.name,
        "type": "object",
        "properties": props,
        "required": ["kind"],
        "additionalProperties": False,
    }
    return {"schema": out, "defs": defs}


def spec_json_schema() -> dict[str, Any]:
    """The JSON Schema (draft 2020-12) of spec files."""
    schema = SpecModel.model_json_schema()
    defs = schema.setdefault("$defs", {})
    block_variants, emb_variants, head_variants = [], [], []
    for k in registry.kinds():
        base = BlockSpec if k.role in ("token_mixer", "channel_mixer", "norm") else ComponentSpec
        ks = _kind_schema(k, base)
        defs.update(ks["defs"])
        name = f"kind_{k.name}"
        defs[name] = ks["schema"]
        ref = {"$ref": f"#/$defs/{name}"}
        {"embedding": emb_variants, "head": head_variants}.get(k.role, block_variants).append(ref)
    generic = {
        "type": "object",
        "required": ["kind"],
        "properties": {"kind": {"$ref": "#/$defs/SearchNode"}},
        "description": "a block whose kind is a search choice",
    }
    defs["BlockSpec"] = {"anyOf": [*block_variants, generic]}
    comp = {"anyOf": [*emb_variants, *head_variants, generic]}
    defs["ComponentSpec"] = comp
    schema = _searchable(schema)
    schema["$defs"]["SearchNode"] = SEARCH_NODE
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "archir spec"
    return schema
