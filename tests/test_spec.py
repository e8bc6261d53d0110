"""Spec loading, search-space nodes, fixing, the YAML round trip and the JSON Schema."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from archir import registry
from archir.errors import SpecError
from archir.ir import build_graph, graph_summary
from archir.spec import SearchNode, fix, load_spec, spec_from_dict, spec_from_text
from archir.spec.schema import spec_json_schema
from archir.spec.space import find_nodes
from tests.conftest import ZOO

OPEN = """\
archir: 1
name: space
model:
  vocab_size: 64
  d_model: {choice: [32, 48]}
  embed: {kind: token_embedding}
  layers:
    - repeat: {int: [1, 3]}
      blocks:
        - kind: {choice: [attention, mlp], tie: mixer}
          n_heads: {choice: [2, 4]}
        - {kind: swiglu, expansion: {float: [1.0, 4.0]}}
    - blocks:
        - kind: {choice: [attention, mlp], tie: mixer}
          n_heads: {choice: [2, 4]}
  head: {kind: lm_head, tie_embeddings: true}
train: {lr: {float: [1.0e-4, 1.0e-2], log: true}}
"""


def base(**model: Any) -> dict[str, Any]:
    m = {
        "vocab_size": 32,
        "d_model": 16,
        "embed": {"kind": "token_embedding"},
        "layers": [{"blocks": [{"kind": "attention", "n_heads": 2}, {"kind": "mlp"}]}],
        "head": {"kind": "lm_head"},
    }
    m.update(model)
    return {"archir": 1, "name": "t", "model": m}


def test_open_spec_nodes() -> None:
    spec = spec_from_text(OPEN, "space.yaml")
    assert not spec.is_concrete
    names = [n.name for n in spec.nodes]
    assert names.count("mixer") == 2  # one decision, written twice
    by = {n.name: n for n in spec.nodes}
    assert by["model.d_model"].options == (32, 48)
    rep = by["model.layers.0.repeat"]
    assert (rep.type, rep.low, rep.high, rep.step) == ("int", 1, 3, 1)
    lr = by["train.lr"]
    assert lr.type == "float" and lr.log
    with pytest.raises(SpecError, match="open search node"):
        _ = spec.model


def test_fix_with_dict() -> None:
    spec = spec_from_text(OPEN)
    fixed = spec.fix(
        {
            "model.d_model": 48,
            "model.layers.0.repeat": 2,
            "mixer": "attention",
            "model.layers.0.blocks.0.n_heads": 4,
            "model.layers.1.blocks.0.n_heads": 2,
            "model.layers.0.blocks.1.expansion": 2.0,
            "train.lr": 1e-3,
        }
    )
    assert fixed.is_concrete
    m = fixed.model.model
    assert m.d_model == 48 and m.layers[0].repeat == 2
    assert [g.blocks[0].kind for g in m.layers] == ["attention", "attention"]
    assert m.layers[0].blocks[0].params.n_heads == 4
    assert m.layers[1].blocks[0].params.n_heads == 2
    assert fixed.model.train.lr == 1e-3
    assert fixed.decisions["mixer"] == "attention"


def test_fix_with_callable_is_asked_once_per_tie() -> None:
    spec = spec_from_text(OPEN)
    asked: list[str] = []

    def decide(node: SearchNode) -> Any:
        asked.append(node.name)
        if node.type == "choice":
            return node.options[-1]  # type: ignore[index]
        return node.high

    fixed = spec.fix(decide)
    assert asked.count("mixer") == 1
    m = fixed.model.model
    # tie: both mixers took the same (last) option: mlp
    assert [g.blocks[0].kind for g in m.layers] == ["mlp", "mlp"]
    assert m.d_model == 48 and m.layers[0].repeat == 3


def test_conditional_nodes_only_asked_when_chosen() -> None:
    # n_heads sits beside a kind choice: pruned when mlp is chosen. A node *inside* an
    # option is only asked when that option is chosen.
    text = """\
archir: 1
name: cond
model:
  vocab_size: 32
  d_model: 16
  embed: {kind: token_embedding}
  layers:
    - blocks:
        - {choice: [{kind: attention, n_heads: {choice: [2, 4]}}, {kind: mlp, expansion: {int: [1, 4]}}]}
  head: {kind: lm_head}
"""
    spec = spec_from_text(text)
    conds = [n for n in spec.nodes if n.conditional]
    assert len(conds) == 2
    asked: list[str] = []

    def decide(i: int) -> Any:
        def f(node: SearchNode) -> Any:
            asked.append(node.name)
            if node.name == "model.layers.0.blocks.0":
                return i
            return node.options[0] if node.options else node.low  # type: ignore[index]

        return f

    fixed = spec.fix(decide(1))
    assert fixed.model.model.layers[0].blocks[0].kind == "mlp"
    assert asked == ["model.layers.0.blocks.0", "model.layers.0.blocks.0.choice.1.expansion"]
    asked.clear()
    fixed = spec.fix(decide(0))
    assert fixed.model.model.layers[0].blocks[0].params.n_heads == 2
    assert "model.layers.0.blocks.0.choice.1.expansion" not in asked


def test_kind_choice_prunes_keys_of_other_kinds() -> None:
    spec = spec_from_text(OPEN)
    fixed = spec.fix(lambda n: n.options[1] if n.type == "choice" else n.low)  # type: ignore[index]
    block = fixed.data["model"]["layers"][0]["blocks"][0]
    assert block == {"kind": "mlp"}  # n_heads dropped: mlp does not take it


@pytest.mark.parametrize(
    ("decisions", "match"),
    [
        ({"model.d_model": 40}, "not one of \\[32, 48\\]"),
        ({"model.layers.0.repeat": 4}, "outside \\[1, 3\\]"),
        ({"model.layers.0.repeat": 1.5}, "must be an integer"),
        ({"model.layers.0.blocks.1.expansion": 0.5}, "outside \\[1.0, 4.0\\]"),
        ({"train.lr": "big"}, "must be a number"),
        ({"mixer": "mamba2"}, "not one of"),
    ],
)
def test_decisions_out_of_range_rejected(decisions: dict[str, Any], match: str) -> None:
    spec = spec_from_text(OPEN, "space.yaml")
    good = {
        "model.d_model": 32,
        "model.layers.0.repeat": 1,
        "mixer": "attention",
        "model.layers.0.blocks.0.n_heads": 2,
        "model.layers.1.blocks.0.n_heads": 2,
        "model.layers.0.blocks.1.expansion": 2.0,
        "train.lr": 1e-3,
    }
    with pytest.raises(SpecError, match=match) as info:
        spec.fix({**good, **decisions})
    assert info.value.location is not None and info.value.location.line is not None


def test_missing_decision_is_named() -> None:
    spec = spec_from_text(OPEN, "space.yaml")
    with pytest.raises(SpecError, match="no decision given for 'model.d_model'") as info:
        spec.fix({})
    assert info.value.location is not None
    assert (info.value.location.line, info.value.location.column) == (5, 12)


def test_int_step_grid() -> None:
    data = base()
    data["model"]["layers"][0]["repeat"] = {"int": [2, 8], "step": 2}
    spec = spec_from_dict(data)
    assert spec.fix({"model.layers.0.repeat": 6}).model.model.layers[0].repeat == 6
    with pytest.raises(SpecError, match="not on the grid"):
        spec.fix({"model.layers.0.repeat": 5})


def test_option_index_for_mapping_choices() -> None:
    data = base()
    data["model"]["layers"][0]["blocks"][1] = {"choice": [{"kind": "mlp"}, {"kind": "swiglu"}]}
    spec = spec_from_dict(data)
    assert spec.fix({"model.layers.0.blocks.1": 1}).model.model.layers[0].blocks[1].kind == (
        "swiglu"
    )
    with pytest.raises(SpecError, match="option index 0..1"):
        spec.fix({"model.layers.0.blocks.1": 2})


def test_plain_fix_function() -> None:
    data = {
        "a": {"choice": [1, 2]},
        "b": [{"int": [0, 3], "tie": "t"}, {"int": [0, 3], "tie": "t"}],
    }
    out, decisions = fix(data, {"a": 2, "t": 3})
    assert out == {"a": 2, "b": [3, 3]}
    assert decisions == {"a": 2, "t": 3}
    assert data["a"] == {"choice": [1, 2]}  # input untouched
    assert [n.name for n in find_nodes(data)] == ["a", "t", "t"]


def test_space_with_combinations_that_fit_is_valid() -> None:
    # 6 heads do not divide 64 but divide 96: a valid space
    data = base(d_model={"choice": [64, 96]})
    data["model"]["layers"][0]["blocks"][0]["n_heads"] = {"choice": [4, 6]}
    spec = spec_from_dict(data)
    assert len(spec.nodes) == 2
    fixed = spec.fix({"model.d_model": 96, "model.layers.0.blocks.0.n_heads": 6})
    build_graph(fixed)


def test_fixed_graph_error_points_at_written_text() -> None:
    text = OPEN.replace("d_model: {choice: [32, 48]}", "d_model: {choice: [32, 36]}")
    spec = spec_from_text(text, "space.yaml")  # 36 works with 2 heads, not with 4
    decisions = {
        "model.d_model": 36,
        "model.layers.0.repeat": 1,
        "mixer": "attention",
        "model.layers.0.blocks.0.n_heads": 4,
        "model.layers.1.blocks.0.n_heads": 2,
        "model.layers.0.blocks.1.expansion": 2.0,
        "train.lr": 1e-3,
    }
    from archir.errors import GraphError

    with pytest.raises(GraphError, match="rope needs an even head_dim, got 9") as info:
        build_graph(spec.fix(decisions))
    loc = info.value.location
    assert loc is not None and loc.file == "space.yaml" and loc.line == 10


def test_yaml_round_trip_same_graph(tmp_path: Path) -> None:
    spec = spec_from_text(OPEN)
    fixed = spec.fix(lambda n: n.options[0] if n.type == "choice" else n.high)  # type: ignore[index]
    path = fixed.save(tmp_path / "fixed.yaml")
    again = load_spec(path)
    assert again.is_concrete
    assert graph_summary(build_graph(again)) == graph_summary(build_graph(fixed))
    assert again.model == fixed.model


@pytest.mark.parametrize("path", sorted(ZOO.glob("*.yaml")), ids=lambda p: p.stem)
def test_zoo_round_trip(path: Path, tmp_path: Path) -> None:
    spec = load_spec(path)
    if not spec.is_concrete:
        pytest.skip("search space")
    again = spec_from_text(spec.to_yaml())
    assert graph_summary(build_graph(again)) == graph_summary(build_graph(spec))


def test_json_spec_loads(tmp_path: Path) -> None:
    yaml_spec = load_spec(ZOO / "transformer.yaml")
    p = tmp_path / "t.json"
    p.write_text(json.dumps(yaml_spec.data, indent=2))
    spec = load_spec(p)
    assert graph_summary(build_graph(spec)) == graph_summary(build_graph(yaml_spec))
    # positions are kept for JSON too
    assert spec.smap.locate(("model", "d_model")).line == 7


def test_directory_with_spec_yaml(tmp_path: Path) -> None:
    (tmp_path / "spec.yaml").write_text((ZOO / "transformer.yaml").read_text())
    assert load_spec(tmp_path).name == "transformer"


def test_role_is_optional_and_checked() -> None:
    spec = spec_from_dict(base())
    assert spec.model.model.layers[0].blocks[0].role is None
    data = base()
    data["model"]["layers"][0]["blocks"][0]["role"] = "token_mixer"
    spec_from_dict(data)


# -- JSON Schema ------------------------------------------------------------------------------


def test_schema_is_valid_json_schema() -> None:
    schema = spec_json_schema()
    text = json.dumps(schema)
    assert json.loads(text) == schema
    assert schema["$schema"].endswith("2020-12/schema")
    for kind in registry.kinds():
        assert f"kind_{kind.name}" in schema["$defs"]
        assert kind.name in text
    assert set(schema["required"]) >= {"name", "model"}
    jsonschema = pytest.importorskip("jsonschema")
    jsonschema.Draft202012Validator.check_schema(schema)


SPECS = sorted((ZOO.parent).glob("*/*.yaml"))


def test_specs_folder_has_zoo_and_search() -> None:
    assert {p.parent.name for p in SPECS} >= {"zoo", "search"}
    assert sum(p.parent.name == "search" for p in SPECS) >= 3


@pytest.mark.parametrize("path", SPECS, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_every_spec_validates_against_schema(path: Path) -> None:
    """What ``archir validate`` accepts, ``archir schema`` accepts: zoo specs and search
    spaces (block-level search nodes: a whole block, ``kind`` or ``n_heads`` as a choice)."""
    import jsonschema

    spec = load_spec(path)
    jsonschema.Draft202012Validator(spec_json_schema()).validate(spec.data)


@pytest.mark.parametrize(
    "change",
    [
        ("trian", {}),  # unknown top-level key
        ("model.d_modle", 64),
        ("model.layers.0.blocks.0.n_head", 2),
        ("model.d_model", {"choice": [32, 64], "tied": "w"}),  # unknown key in a search node
        ("model.d_model", {"choice": []}),
        ("model.layers.0.blocks.0.kind", "attention_v2"),
        ("archir", 2),
        ("name", "../up"),
    ],
    ids=lambda c: c[0],
)
def test_schema_rejects_bad_specs(change: tuple[str, Any]) -> None:
    import jsonschema

    data = base()
    keys = [int(k) if k.isdigit() else k for k in change[0].split(".")]
    node: Any = data
    for k in keys[:-1]:
        node = node[k]
    node[keys[-1]] = change[1]
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.Draft202012Validator(spec_json_schema()).validate(data)


def test_schema_allows_search_nodes_in_lists() -> None:
    import jsonschema

    data = base()
    data["model"]["layers"][0]["blocks"][1] = {"choice": [{"kind": "mlp"}, {"kind": "swiglu"}]}
    data["model"]["layers"].append({"choice": [{"blocks": [{"kind": "mlp"}]}]})
    spec_from_dict(data)  # the loader accepts it ...
    jsonschema.Draft202012Validator(spec_json_schema()).validate(data)  # ... and so does the schema


def test_open_spec_validates_against_schema() -> None:
    jsonschema = pytest.importorskip("jsonschema")
    jsonschema.Draft202012Validator(spec_json_schema()).validate(spec_from_text(OPEN).data)


def test_schema_rejects_unknown_block_key() -> None:
    jsonschema = pytest.importorskip("jsonschema")
    data = base()
    data["model"]["layers"][0]["blocks"][0]["n_head"] = 2
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.Draft202012Validator(spec_json_schema()).validate(data)


# -- strict values and plain data ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("n_heads", True, "must be a valid integer, got True"),
        ("n_heads", "2", "must be a valid integer, got '2'"),
        ("n_heads", 2.0, "must be a valid integer, got 2.0"),
        ("qkv_bias", "yes", "must be a valid boolean, got 'yes'"),
        ("qkv_bias", 1, "must be a valid boolean, got 1"),
        ("rope_base", float("inf"), "must be a finite number"),
        ("n_heads", 10**6, "must be less than or equal to 65536"),
    ],
)
def test_block_params_are_strict(field: str, value: Any, message: str) -> None:
    data = base()
    data["model"]["layers"][0]["blocks"][0][field] = value
    with pytest.raises(SpecError, match=message.replace("(", r"\(")):
        spec_from_dict(data)


def test_ints_are_accepted_for_floats_and_bits() -> None:
    data = base()
    data["model"]["layers"][0]["blocks"][1].update(expansion=4, bits=8)
    data["train"] = {"lr": 1, "time_budget_s": 60}
    spec = spec_from_dict(data)
    assert spec.model.train.lr == 1.0 and isinstance(spec.model.train.lr, float)


def test_version_is_exactly_one() -> None:
    for bad in (True, 1.0, "1", 2, None):
        data = base()
        data["archir"] = bad
        with pytest.raises(SpecError, match="must be 1"):
            spec_from_dict(data)


def test_spec_from_dict_takes_python_data() -> None:
    """Tuples become lists and integral/real numbers of other types become int/float; other
    objects, huge integers and cycles are refused with a SpecError."""
    import numpy as np

    data = base()
    data["model"]["layers"] = ({"blocks": ({"kind": "attention", "n_heads": np.int64(2)},)},)
    data["model"]["d_model"] = np.int32(16)
    spec = spec_from_dict(data)
    assert spec.data["model"]["layers"] == [{"blocks": [{"kind": "attention", "n_heads": 2}]}]
    assert type(spec.data["model"]["d_model"]) is int
    for bad, match in ((object(), "plain data"), (10**400, "out of range"), ({1, 2}, "plain")):
        data = base()
        data["model"]["d_model"] = bad
        with pytest.raises(SpecError, match=match):
            spec_from_dict(data)
    loop: dict[str, Any] = base()
    loop["model"]["again"] = loop
    with pytest.raises(SpecError, match="keys and values|nested"):
        spec_from_dict(loop)


def test_decisions_keep_the_option_type() -> None:
    """A decision ``True`` does not pick the option ``1``, and ``2.0`` picks ``2``."""
    data = base(d_model={"choice": [16, 32]})
    spec = spec_from_dict(data)
    assert spec.fix({"model.d_model": 32.0}).data["model"]["d_model"] == 32
    assert type(spec.fix({"model.d_model": 32.0}).data["model"]["d_model"]) is int
    with pytest.raises(SpecError, match="is not one of"):
        spec.fix({"model.d_model": True})


def test_to_yaml_reads_back_the_same_data() -> None:
    """Strings the loader would read as something else (``1e3`` is a float in YAML 1.2,
    ``yes`` a string) are quoted when a spec is written, so a trial's spec.yaml loads back."""
    data = base()
    data["name"] = "1e3"
    data["description"] = "yes"
    data["train"] = {"task": "2024-01-01", "task_options": {"a": "on", "b": ".5", "c": 1e-3}}
    spec = spec_from_dict(data)
    again = spec_from_text(spec.to_yaml())
    assert again.data == spec.data
