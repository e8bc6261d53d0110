"""The malformed-spec corpus (``tests/errors/``): every file gives a located, exact error.

Each entry: error class, line, column, field path, message, hint. ``archir validate`` on each
file exits 2 with one or two lines of output and no traceback.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from archir.cli import main
from archir.cost import check_budget
from archir.errors import ArchirError, BudgetError, GraphError, SpecError
from archir.ir import build_graph
from archir.paths import NAME_HINT
from archir.spec import load_spec

ERRORS = Path(__file__).resolve().parent / "errors"

EXPECTED: dict[str, tuple[type[ArchirError], int, int, str | None, str, str | None]] = {
    "bad_name.yaml": (
        SpecError,
        2,
        7,
        "name",
        "must be a valid name, got 'my model'",
        NAME_HINT,
    ),
    "bad_yaml_colon.yaml": (
        SpecError,
        6,
        44,
        None,
        "invalid YAML: expected ',' or '}', but got ']'",
        "check indentation and that ':' is followed by a space",
    ),
    "bad_yaml_indent.yaml": (
        SpecError,
        5,
        14,
        None,
        "invalid YAML: mapping values are not allowed here",
        "check indentation and that ':' is followed by a space",
    ),
    "bits_not_allowed.yaml": (
        SpecError,
        10,
        32,
        "model.layers.0.blocks.1.bits",
        "bits must be one of 32, 16, 8, 4, 2, 1.58, 1, got 3",
        None,
    ),
    "block_norm_typo.yaml": (
        SpecError,
        9,
        47,
        "model.layers.0.blocks.0.norm",
        "unknown norm kind 'layer_norm'",
        "did you mean 'layernorm'?",
    ),
    "blocks_not_list.yaml": (
        SpecError,
        8,
        15,
        "model.layers.0.blocks",
        "must be a valid list, got a mapping",
        None,
    ),
    "choice_heads_not_dividing.yaml": (
        GraphError,
        9,
        51,
        "model.layers.0.blocks.0.n_heads.choice.1",
        "n_heads 5 does not divide d_model 64",
        "no value of model.d_model makes it fit",
    ),
    "choice_option_typo.yaml": (
        SpecError,
        10,
        36,
        "model.layers.0.blocks.1.kind.choice.1",
        "unknown block kind 'mpl'",
        "did you mean 'mlp'?",
    ),
    "classifier_without_classes.yaml": (
        GraphError,
        11,
        9,
        "model.head",
        "classifier needs model.n_classes > 0",
        None,
    ),
    "comments_only.yaml": (SpecError, 1, 1, None, "the spec file is empty", "see specs/zoo/"),
    "d_model_float.yaml": (
        SpecError,
        5,
        12,
        "model.d_model",
        "must be a valid integer, got 64.5",
        None,
    ),
    "decision_string_range.yaml": (
        SpecError,
        8,
        21,
        "model.layers.0.repeat.int",
        "'int' needs [low, high]",
        "write {int: [2, 6]}",
    ),
    "duplicate_block_name.yaml": (
        GraphError,
        10,
        32,
        "model.layers.0.blocks.1.name",
        "block name 'a' is used twice",
        "give every named block its own name",
    ),
    "duplicate_key.yaml": (
        SpecError,
        6,
        3,
        "model.d_model",
        "duplicate key 'd_model'",
        "each field may appear once in a mapping",
    ),
    "embed_as_block.yaml": (
        SpecError,
        6,
        17,
        "model.embed.kind",
        "kind 'lm_head' is a head, not an embedding",
        "run 'archir blocks' to list kinds by role",
    ),
    "empty.yaml": (SpecError, 1, 1, None, "the spec file is empty", "see specs/zoo/"),
    "empty_choice.yaml": (
        SpecError,
        5,
        21,
        "model.d_model.choice",
        "a 'choice' needs a non-empty list of options",
        "write {choice: [a, b]}",
    ),
    "heads_not_dividing.yaml": (
        GraphError,
        10,
        38,
        "model.layers.0.blocks.0.n_heads",
        "n_heads 6 does not divide d_model 64",
        None,
    ),
    "heads_not_dividing_later_group.yaml": (
        GraphError,
        12,
        38,
        "model.layers.1.blocks.0.n_heads",
        "n_heads 3 does not divide d_model 64 (node layers.3.blocks.0)",
        None,
    ),
    "heads_string.yaml": (
        SpecError,
        9,
        38,
        "model.layers.0.blocks.0.n_heads",
        "must be a valid integer, got 'four'",
        None,
    ),
    "huge_params.yaml": (
        BudgetError,
        11,
        11,
        "model.layers.0.blocks.1",
        "the model would have 4.4e+12 parameters (16384.2 GiB in fp32), over the limit of 2e+09; largest node layers.0.blocks.1 (5.15e+10)",
        "reduce d_model, vocab_size or depth (or raise ARCHIR_MAX_PARAMS)",
    ),
    "inputs_cycle.yaml": (
        GraphError,
        9,
        58,
        "model.layers.0.blocks.0.inputs",
        "input 'b' is not the name of an earlier block (it names a later block: that would make a cycle)",
        "inputs may name 'embed' or blocks written above this one",
    ),
    "inputs_self.yaml": (
        GraphError,
        9,
        58,
        "model.layers.0.blocks.0.inputs",
        "input 'a' is not the name of an earlier block (it is this block's own name: that would make a cycle)",
        "inputs may name 'embed' or blocks written above this one",
    ),
    "inputs_unknown.yaml": (
        GraphError,
        10,
        34,
        "model.layers.0.blocks.1.inputs",
        "input 'atn' is not the name of an earlier block",
        "did you mean 'attn'?",
    ),
    "int_range_reversed.yaml": (
        SpecError,
        8,
        21,
        "model.layers.0.repeat.int",
        "'int' range is empty: low 6 > high 2",
        None,
    ),
    "kv_heads_not_dividing.yaml": (
        GraphError,
        9,
        53,
        "model.layers.0.blocks.0.n_kv_heads",
        "n_kv_heads 3 does not divide n_heads 4",
        None,
    ),
    "log_range_nonpositive.yaml": (
        SpecError,
        11,
        21,
        "train.lr.float",
        "a log-scale range needs low > 0",
        None,
    ),
    "merge_typo.yaml": (
        SpecError,
        10,
        53,
        "model.layers.0.blocks.1.merge",
        "must be 'sum', 'mean' or 'weighted', got 'average'",
        None,
    ),
    "missing_d_model.yaml": (
        SpecError,
        4,
        3,
        "model.d_model",
        "missing required field 'd_model'",
        None,
    ),
    "missing_kind.yaml": (
        SpecError,
        9,
        11,
        "model.layers.0.blocks.0.kind",
        "missing required field 'kind'",
        None,
    ),
    "missing_model.yaml": (SpecError, 1, 1, "model", "missing required field 'model'", None),
    "missing_vocab.yaml": (
        GraphError,
        5,
        10,
        "model.embed",
        "token_embedding needs model.vocab_size > 0",
        None,
    ),
    "negative_d_model.yaml": (
        SpecError,
        5,
        12,
        "model.d_model",
        "must be greater than 0, got -64",
        None,
    ),
    "negative_repeat.yaml": (
        SpecError,
        8,
        15,
        "model.layers.0.repeat",
        "must be greater than or equal to 1, got -1",
        None,
    ),
    "no_blocks.yaml": (
        SpecError,
        9,
        15,
        "model.layers.0.blocks",
        "must have at least 1 item, not 0",
        None,
    ),
    "norm_typo.yaml": (
        SpecError,
        6,
        9,
        "model.norm",
        "unknown norm kind 'rmsnrom'",
        "did you mean 'rmsnorm'?",
    ),
    "python_tag.yaml": (
        SpecError,
        2,
        7,
        "name",
        "the YAML tag 'tag:yaml.org,2002:python/object/apply:os.system' is not allowed",
        "specs hold plain data only (a spec can never run code); remove the '!!' tag",
    ),
    "python_tag_scalar.yaml": (
        SpecError,
        2,
        7,
        None,
        "invalid YAML: could not determine a constructor for the tag 'tag:yaml.org,2002:python/name:os.system'",
        "specs hold plain data only (a spec can never run code); remove the '!!' tag",
    ),
    "residual_typo.yaml": (
        SpecError,
        8,
        17,
        "model.layers.0.residual",
        "must be 'pre_norm', 'post_norm', 'peri_norm' or 'parallel', got 'prenorm'",
        "did you mean 'pre_norm'?",
    ),
    "role_mismatch.yaml": (
        SpecError,
        9,
        18,
        "model.layers.0.blocks.0.role",
        "role 'channel_mixer' does not match kind 'attention', which is a token_mixer",
        "write role: token_mixer or leave role out",
    ),
    "search_node_extra_key.yaml": (
        SpecError,
        5,
        32,
        "model.d_model.tied",
        "unknown key 'tied' in a 'choice' search node",
        "did you mean 'tie'?",
    ),
    "search_node_two_types.yaml": (
        SpecError,
        5,
        12,
        "model.d_model",
        "a search node has exactly one of 'choice', 'int', 'float', got ['choice', 'int']",
        "split it into separate fields",
    ),
    "tie_conflict.yaml": (
        SpecError,
        11,
        38,
        "model.layers.1.blocks.0.n_heads",
        "tie 'h' is used by nodes with different options (choice [2, 4] vs choice [2, 8])",
        "tied nodes must be written identically",
    ),
    "top_level_list.yaml": (
        SpecError,
        1,
        1,
        None,
        "a spec must be a mapping with 'archir', 'name' and 'model'",
        "see specs/zoo/transformer.yaml",
    ),
    "unknown_block_key.yaml": (
        SpecError,
        9,
        29,
        "model.layers.0.blocks.0.n_head",
        "unknown field 'n_head' for kind 'attention'",
        "did you mean 'n_heads'?",
    ),
    "unknown_head_kind.yaml": (
        SpecError,
        10,
        16,
        "model.head.kind",
        "unknown head kind 'lm_haed'",
        "did you mean 'lm_head'?",
    ),
    "unknown_kind.yaml": (
        SpecError,
        9,
        18,
        "model.layers.0.blocks.0.kind",
        "unknown block kind 'atention'",
        "did you mean 'attention'?",
    ),
    "unknown_layer_key.yaml": (
        SpecError,
        8,
        7,
        "model.layers.0.repeats",
        "unknown field 'repeats'",
        "did you mean 'repeat'?",
    ),
    "unknown_model_key.yaml": (
        SpecError,
        5,
        3,
        "model.d_modle",
        "unknown field 'd_modle'",
        "did you mean 'd_model'?; 1 more problem(s) after this one",
    ),
    "unknown_task.yaml": (
        SpecError,
        4,
        9,
        "model.task",
        "must be 'causal_lm', 'seq_classification' or 'image_classification', got 'causal_llm'",
        "did you mean 'causal_lm'?",
    ),
    "unknown_top_key.yaml": (
        SpecError,
        3,
        1,
        "trian",
        "unknown field 'trian'",
        "did you mean 'train'?",
    ),
    "unknown_train_key.yaml": (
        SpecError,
        11,
        20,
        "train.batchsize",
        "unknown field 'batchsize'",
        "did you mean 'batch_size'?",
    ),
    "wrong_type.json": (
        SpecError,
        8,
        60,
        "model.layers.0.blocks.0.expansion",
        "must be a valid number, got 'wide'",
        None,
    ),
    "wrong_version.yaml": (
        SpecError,
        1,
        9,
        "archir",
        "must be 1, got 2",
        "this version of archir reads spec format 'archir: 1'",
    ),
    "yaml_anchor_loop.yaml": (
        SpecError,
        3,
        8,
        "model.again",
        "a YAML alias refers to a mapping or list that contains it",
        "specs must be trees: remove the recursive '*alias'",
    ),
    "version_true.yaml": (
        SpecError,
        1,
        9,
        "archir",
        "must be 1, got True",
        "this version of archir reads spec format 'archir: 1'",
    ),
    "heads_bool.yaml": (
        SpecError,
        9,
        38,
        "model.layers.0.blocks.0.n_heads",
        "must be a valid integer, got True",
        None,
    ),
    "tie_embeddings_yes.yaml": (
        SpecError,
        10,
        41,
        "model.head.tie_embeddings",
        "must be a valid boolean, got 'yes'",
        None,
    ),
    "lr_inf.yaml": (SpecError, 11, 25, "train.lr", "must be a finite number, got inf", None),
    "name_dotdot.yaml": (SpecError, 2, 7, "name", "must be a valid name, got '..'", NAME_HINT),
    "too_many_blocks.yaml": (
        SpecError,
        8,
        5,
        "model.layers",
        "the model has 5120 blocks once layer groups are repeated, over the limit of 4096",
        None,
    ),
    "choice_too_many.yaml": (
        SpecError,
        5,
        21,
        "model.d_model.choice",
        "a 'choice' has 257 options, over the limit of 256",
        "use an {int: [low, high]} or {float: [low, high]} range for many values",
    ),
    "alias_bomb.yaml": (
        SpecError,
        7,
        8,
        "e.0",
        "the spec has more than 20000 keys and values (aliases counted at each use)",
        "a spec is a short file; an alias used many times multiplies its contents",
    ),
    "deep_nesting.yaml": (
        SpecError,
        4,
        75,
        "model.d_model.0.0.0.0.…",
        "the spec is nested more than 64 levels deep",
        "a spec is a shallow tree of mappings and lists",
    ),
    "big_int.json": (
        SpecError,
        1,
        51,
        "model.d_model",
        "integer literal of 5000 characters is too long (at most 40)",
        "integers in a spec lie within ±(2^63 - 1)",
    ),
    "merge_duplicate.yaml": (
        SpecError,
        6,
        3,
        "model.vocab_size",
        "duplicate key 'vocab_size'",
        "each field may appear once in a mapping",
    ),
    "nul_byte.yaml": (
        SpecError,
        2,
        10,
        None,
        "control character U+0000 is not allowed in a spec",
        "a spec is plain UTF-8 text; remove the character (a NUL suggests a binary file)",
    ),
    "zero_heads.yaml": (
        SpecError,
        9,
        38,
        "model.layers.0.blocks.0.n_heads",
        "must be greater than or equal to 1, got 0",
        None,
    ),
}


def _error(path: Path) -> ArchirError:
    try:
        spec = load_spec(path)
        if spec.is_concrete:
            check_budget(build_graph(spec))
    except ArchirError as exc:
        return exc
    raise AssertionError(f"{path.name} gave no error")


def test_corpus_is_complete() -> None:
    files = sorted(p.name for p in ERRORS.iterdir() if p.suffix in (".yaml", ".json"))
    assert files == sorted(EXPECTED)
    assert len(files) >= 30


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_located_error(name: str) -> None:
    cls, line, col, field, message, hint = EXPECTED[name]
    exc = _error(ERRORS / name)
    assert type(exc) is cls
    assert exc.location is not None
    assert exc.location.file == str(ERRORS / name)
    assert (exc.location.line, exc.location.column) == (line, col)
    assert exc.location.field == field
    assert exc.message == message
    assert exc.hint == hint
    text = str(exc)
    assert text.startswith(f"{ERRORS / name}:{line}:{col}: ")
    assert "\n" not in text


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_validate_exits_2_in_one_line(name: str, capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(["validate", str(ERRORS / name)])
    out, err = capsys.readouterr()
    assert rc == 2
    assert out == ""
    lines = err.strip().splitlines()
    assert 1 <= len(lines) <= 2
    assert lines[0].startswith(f"error: {ERRORS / name}:")
    assert "Traceback" not in err


def test_validate_subprocess_no_traceback() -> None:
    """End to end through the console script: exit 2, one line, no traceback."""
    files = [str(ERRORS / n) for n in ("heads_string.yaml", "bad_yaml_indent.yaml")]
    proc = subprocess.run(
        [sys.executable, "-m", "archir.cli", "validate", *files],
        capture_output=True,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert proc.stderr.splitlines() == [
        f"error: {files[0]}:9:38: model.layers.0.blocks.0.n_heads: must be a valid integer, "
        "got 'four'",
        f"error: {files[1]}:5:14: invalid YAML: mapping values are not allowed here "
        "(hint: check indentation and that ':' is followed by a space)",
    ]


def test_huge_model_refused_before_allocating(monkeypatch: pytest.MonkeyPatch) -> None:
    import archir
    from archir import compiler

    def boom(*_a: object, **_k: object) -> None:
        raise AssertionError("CompiledModel was constructed")

    monkeypatch.setattr(compiler.CompiledModel, "__init__", boom)
    spec = load_spec(ERRORS / "huge_params.yaml")
    t0 = time.perf_counter()
    with pytest.raises(BudgetError) as info:
        archir.compile(spec)
    assert time.perf_counter() - t0 < 2.0
    assert info.value.location is not None and info.value.location.line == 11
    assert "4.4e+12 parameters" in info.value.message


def test_huge_model_refused_by_train(tmp_path: Path) -> None:
    from archir.train import train

    spec = load_spec(ERRORS / "huge_params.yaml")
    with pytest.raises(BudgetError):
        train(spec, out_dir=tmp_path)


def test_budget_limit_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    spec = load_spec(Path(__file__).resolve().parents[1] / "specs" / "zoo" / "transformer.yaml")
    monkeypatch.setenv("ARCHIR_MAX_PARAMS", "1000")
    with pytest.raises(BudgetError, match="over the limit of 1e\\+03"):
        check_budget(build_graph(spec))


def test_spec_built_in_python_names_the_field() -> None:
    from archir.spec import spec_from_dict

    with pytest.raises(SpecError) as info:
        spec_from_dict(
            {
                "archir": 1,
                "name": "x",
                "model": {
                    "vocab_size": 16,
                    "d_model": 8,
                    "embed": {"kind": "token_embedding"},
                    "layers": [{"blocks": [{"kind": "attention", "n_heads": "four"}]}],
                    "head": {"kind": "lm_head"},
                },
            }
        )
    assert info.value.location is not None
    assert info.value.location.field == "model.layers.0.blocks.0.n_heads"
    assert info.value.location.line is None
    assert str(info.value) == "model.layers.0.blocks.0.n_heads: must be a valid integer, got 'four'"


def test_missing_file() -> None:
    with pytest.raises(SpecError, match="no such file"):
        load_spec(ERRORS / "does-not-exist.yaml")


def test_graph_error_class_for_cycles() -> None:
    assert issubclass(GraphError, ArchirError)
