"""Hostile spec files (issue 11, parts 4, 5 and 8): ``archir validate FILE`` on each refuses it
with exit 2, one located line (the file, and line:column where the text has one), no
traceback, in under a second and under 200 MB of Python allocations
(:mod:`tests.hostile_util`).

Categories: special files and sizes (devices, fifos, sockets, directories, 20 MB, not UTF-8),
YAML structure (alias bombs, nesting in flow and block style, node counts, documents),
control bytes, huge integers, search spaces (options, nodes, blocks after repeat), strict
values (booleans and strings are not numbers, the format version is exactly 1), non-finite
floats in every float field, sizes out of range, unknown keys, bad names, YAML tags. Merge
keys work as YAML defines them (positive cases).

Cases run in this process (``run_cli``), where ``tracemalloc`` measures memory. Tracing every
allocation slows allocation-heavy parsing several times over, so cases that parse up to the
node limit (marked ``heavy``) check their time in a second run without tracing. The cases
that would hang or eat memory if they regressed (alias bomb, ``/dev/zero``, a fifo, deep
nesting, 20 MB) also run in a child with a timeout and an address-space limit
(``run_cli_subprocess``); such a refusal happens before torch is imported.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import os
import re
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from archir.spec.models import MAX_BLOCKS
from archir.spec.source import MAX_DEPTH, MAX_NODES, MAX_SPEC_BYTES
from archir.spec.space import MAX_CHOICE_OPTIONS
from tests.hostile_util import MAX_SECONDS, ROOT, assert_refused, run_cli, run_cli_subprocess

BASE: dict[str, Any] = {
    "archir": 1,
    "name": "hostile",
    "model": {
        "task": "causal_lm",
        "vocab_size": 64,
        "d_model": 32,
        "max_seq_len": 64,
        "dropout": 0.0,
        "embed": {"kind": "token_embedding"},
        "layers": [
            {
                "repeat": 2,
                "blocks": [
                    {"kind": "attention", "n_heads": 4, "residual_scale": 1.0},
                    {"kind": "swiglu", "expansion": 2.0},
                ],
            }
        ],
        "head": {"kind": "lm_head", "tie_embeddings": True},
    },
    "train": {"task": "text:pydoc", "steps": 10, "batch_size": 4, "seq_len": 32, "lr": 1e-3},
}

Maker = Callable[[Path], str]


@dataclass
class Case:
    id: str
    make: Maker
    contains: str
    heavy: bool = False  # parses up to a node limit: time checked without tracemalloc
    at_line: bool = True  # the message has file:line:col


def _write(tmp: Path, content: str | bytes, name: str = "spec.yaml") -> str:
    p = tmp / name
    if isinstance(content, bytes):
        p.write_bytes(content)
    else:
        p.write_text(content, encoding="utf-8")
    return str(p)


def text(content: str | bytes, name: str = "spec.yaml") -> Maker:
    return lambda tmp: _write(tmp, content, name)


def dump(data: Any) -> str:
    return yaml.safe_dump(data, sort_keys=False, width=1000)


def setv(dotted: str, value: Any, base: dict[str, Any] | None = None) -> dict[str, Any]:
    """A copy of ``base`` (default :data:`BASE`) with the field at ``dotted`` set."""
    data = copy.deepcopy(BASE if base is None else base)
    keys: list[str | int] = [int(k) if k.isdigit() else k for k in dotted.split(".")]
    node: Any = data
    for k in keys[:-1]:
        if isinstance(k, str) and k not in node:
            node[k] = {}
        node = node[k]
    node[keys[-1]] = value
    return data


def spec_with(dotted: str, value: Any, base: dict[str, Any] | None = None) -> Maker:
    return text(dump(setv(dotted, value, base)))


def with_block(block: dict[str, Any]) -> dict[str, Any]:
    """BASE with its second block replaced by ``block``."""
    return setv("model.layers.0.blocks.1", block)


def base_text() -> str:
    return dump(BASE)


# -- special files and sizes ---------------------------------------------------------------


def _fifo(tmp: Path) -> str:
    p = tmp / "spec.yaml"
    os.mkfifo(p)
    return str(p)


def _socket(tmp: Path) -> str:
    p = tmp / "s.yaml"
    if len(str(p)) > 100:  # AF_UNIX paths are short
        pytest.skip("temporary path too long for a unix socket")
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(str(p))
    _SOCKETS.append(s)
    return str(p)


_SOCKETS: list[socket.socket] = []


def _dir_fifo(tmp: Path) -> str:
    d = tmp / "run"
    d.mkdir()
    os.mkfifo(d / "spec.yaml")
    return str(d)


def _empty_dir(tmp: Path) -> str:
    d = tmp / "run"
    d.mkdir()
    return str(d)


def _symlink(target: str) -> Maker:
    def make(tmp: Path) -> str:
        p = tmp / "spec.yaml"
        p.symlink_to(target)
        return str(p)

    return make


def _blocks_20mb(tmp: Path) -> str:
    head = dump(setv("model.layers.0.blocks", [])).split("blocks: []")[0] + "blocks:\n"
    line = "        - {kind: swiglu, expansion: 2.0}\n"
    p = tmp / "spec.yaml"
    with open(p, "w", encoding="utf-8") as f:
        f.write(head)
        chunk = line * 10_000
        while f.tell() < 20 * 2**20:
            f.write(chunk)
    return str(p)


def _sparse(size: int) -> Maker:
    def make(tmp: Path) -> str:
        p = tmp / "spec.yaml"
        with open(p, "wb") as f:
            f.truncate(size)
        return str(p)

    return make


def _unreadable(tmp: Path) -> str:
    if os.geteuid() == 0:
        pytest.skip("root reads every file")
    p = Path(_write(tmp, base_text()))
    p.chmod(0)
    return str(p)


# -- YAML structure --------------------------------------------------------------------------


def _laughs(levels: int = 9, width: int = 10, mapping: bool = False) -> str:
    lines = ["archir: 1", "name: lol", "l0: &l0 [" + ", ".join(["lol"] * width) + "]"]
    for i in range(1, levels + 1):
        refs = [f"*l{i - 1}"] * width
        if mapping:
            body = "{" + ", ".join(f"k{j}: {r}" for j, r in enumerate(refs)) + "}"
        else:
            body = "[" + ", ".join(refs) + "]"
        lines.append(f"l{i}: &l{i} {body}")
    return "\n".join(lines) + "\n"


def _deep_block_map(depth: int) -> str:
    return "archir: 1\nname: deep\nmodel:\n" + "".join(
        "  " * (i + 1) + f"k{i}:\n" for i in range(depth)
    )


def _deep_block_seq(depth: int) -> str:
    return "archir: 1\nname: deep\nmodel:\n  layers:\n" + "".join(
        "    " + "  " * i + "-\n" for i in range(depth)
    )


def _many_blocks_written(n: int) -> str:
    return dump(setv("model.layers.0.blocks", [{"kind": "swiglu"} for _ in range(n)]))


def _anchored_block_override() -> str:
    return """archir: 1
name: merged
model:
  vocab_size: 64
  d_model: 32
  embed: {kind: token_embedding}
  layers:
    - blocks:
        - &attn {kind: attention, n_heads: 2, pos: rope}
        - &alibi {kind: attention, pos: alibi, n_heads: 8}
    - blocks:
        - {<<: *attn, n_heads: 4}
        - {<<: [*alibi, *attn]}
  head: {kind: lm_head}
"""


# -- search spaces ---------------------------------------------------------------------------


def _choice(n: int) -> Maker:
    return text(
        base_text().replace(
            "d_model: 32",
            "d_model: {choice: [" + ", ".join(str(8 * (i + 1)) for i in range(n)) + "]}",
        )
    )


def _many_nodes(n: int) -> Maker:
    data = copy.deepcopy(BASE)
    data["model"]["layers"] = [
        {"repeat": 1, "blocks": [{"kind": "swiglu", "expansion": {"choice": [1.0, 2.0]}}]}
        for _ in range(n)
    ]
    return text(dump(data))


# -- the cases -------------------------------------------------------------------------------

FLOAT_FIELDS: list[tuple[str, str, dict[str, Any] | None]] = [
    # (id, dotted field, base or None for BASE)
    ("lr", "train.lr", None),
    ("min_lr", "train.min_lr", None),
    ("weight_decay", "train.weight_decay", None),
    ("grad_clip", "train.grad_clip", None),
    ("time_budget_s", "train.time_budget_s", None),
    ("dropout", "model.dropout", None),
    ("bits", "model.bits", None),
    ("residual_scale", "model.layers.0.blocks.0.residual_scale", None),
    ("expansion", "model.layers.0.blocks.1.expansion", None),
    ("rope_base", "model.layers.0.blocks.0.rope_base", None),
    ("budget_timeout_s", "search.budget.timeout_s", None),
    ("fidelity_time_budget_s", "search.fidelity.time_budget_s", None),
    ("task_option", "train.task_options.scale", None),
    ("moe_capacity", "model.layers.0.blocks.1.capacity_factor", with_block({"kind": "moe"})),
    ("moe_aux", "model.layers.0.blocks.1.aux_loss_weight", with_block({"kind": "moe"})),
    ("mamba_dt_min", "model.layers.0.blocks.1.dt_min", with_block({"kind": "mamba"})),
    ("gla_normalizer", "model.layers.0.blocks.1.gate_normalizer", with_block({"kind": "gla"})),
    ("hyena_decay", "model.layers.0.blocks.1.decay_fast", with_block({"kind": "hyena"})),
    ("norm_eps", "model.layers.0.blocks.1.eps", with_block({"kind": "rmsnorm"})),
    ("dyt_alpha", "model.layers.0.blocks.1.alpha0", with_block({"kind": "dyt"})),
]

SIZES: list[tuple[str, str, Any]] = [
    ("d_model_huge", "model.d_model", 10**6),
    ("d_model_negative", "model.d_model", -64),
    ("vocab_huge", "model.vocab_size", 2**25),
    ("max_seq_len_huge", "model.max_seq_len", 2**21),
    ("n_heads_huge", "model.layers.0.blocks.0.n_heads", 10**5),
    ("window_huge", "model.layers.0.blocks.0.window", 10**8),
    ("expansion_huge", "model.layers.0.blocks.1.expansion", 1000.0),
    ("d_ff_huge", "model.layers.0.blocks.1.d_ff", 10**9),
    ("repeat_huge", "model.layers.0.repeat", 10**6),
    ("repeat_zero", "model.layers.0.repeat", 0),
    ("steps_huge", "train.steps", 10**9),
    ("steps_negative", "train.steps", -1),
    ("batch_huge", "train.batch_size", 10**6),
    ("seq_len_huge", "train.seq_len", 10**7),
    ("eval_every_huge", "train.eval_every", 10**9),
    ("seed_negative", "train.seed", -1),
    ("seed_huge", "train.seed", 2**40),
    ("threads_huge", "train.threads", 10**4),
    ("trials_huge", "search.budget.trials", 10**7),
    ("workers_huge", "search.workers", 10**4),
    ("latency_repeats_huge", "search.latency.repeats", 10**9),
]


def _cases() -> list[Case]:
    big = "9" * 5000
    cases = [
        # special files and sizes
        Case("dev_zero", lambda tmp: "/dev/zero", "is a device", at_line=False),
        Case("dev_urandom", lambda tmp: "/dev/urandom", "is a device", at_line=False),
        Case("fifo", _fifo, "fifo", at_line=False),
        Case("socket", _socket, "socket", at_line=False),
        Case("symlink_to_dev_zero", _symlink("/dev/zero"), "is a device", at_line=False),
        Case("directory_without_spec", _empty_dir, "directory without spec.yaml", at_line=False),
        Case("directory_with_fifo_spec", _dir_fifo, "fifo", at_line=False),
        Case("blocks_20mb", _blocks_20mb, "over the limit", at_line=False),
        Case("sparse_20mb", _sparse(20 * 2**20), "over the limit", at_line=False),
        Case("one_byte_over", _sparse(MAX_SPEC_BYTES + 1), "over the limit", at_line=False),
        Case("missing_file", lambda tmp: str(tmp / "nope.yaml"), "no such file", at_line=False),
        Case("unreadable", _unreadable, "cannot read", at_line=False),
        Case(
            "latin1_byte",
            text(base_text().replace("hostile", "h\xe9").encode("latin-1")),
            "not UTF-8",
        ),
        Case("surrogate_bytes", text(b"archir: 1\nname: \xed\xa0\x80\n"), "not UTF-8"),
        # YAML structure
        Case("alias_bomb_lists", text(_laughs()), "keys and values"),
        Case("alias_bomb_mappings", text(_laughs(mapping=True)), "keys and values"),
        Case("alias_bomb_wide", text(_laughs(levels=4, width=200)), "keys and values"),
        Case("alias_bomb_as_key", text(_laughs(3) + "? *l3\n: 1\n"), "plain names"),
        Case(
            "recursive_alias", text("archir: 1\nname: x\nmodel: &m\n  again: *m\n"), "contains it"
        ),
        Case("undefined_alias", text("archir: 1\nname: x\nmodel: *nothing\n"), "no anchor"),
        Case("flow_nesting_100k", text("model: " + "[" * 100_000 + "]" * 100_000), "nested"),
        Case("flow_nesting_500", text("model: " + "[" * 500 + "]" * 500), "nested"),
        Case("flow_map_nesting_500", text("model: " + "{a: " * 500 + "1" + "}" * 500), "nested"),
        Case(
            "flow_nesting_just_over",
            text("model: " + "[" * MAX_DEPTH + "1" + "]" * MAX_DEPTH),
            "nested",
        ),
        Case("block_map_nesting_500", text(_deep_block_map(500)), "nested"),
        Case("block_seq_nesting_500", text(_deep_block_seq(500)), "nested"),
        Case(
            "alias_nesting",
            text("a0: &a0 [1]\n" + "".join(f"a{i}: &a{i} [*a{i - 1}]\n" for i in range(1, 200))),
            "nested",
        ),
        Case(
            "many_scalars",
            text("archir: 1\nname: x\nl: [" + "1," * MAX_NODES + "1]\n"),
            "keys and values",
            heavy=True,
        ),
        Case(
            "many_blocks_written",
            text(_many_blocks_written(MAX_NODES // 2)),
            "keys and values",
            heavy=True,
        ),
        Case("two_documents", text(base_text() + "---\n" + base_text()), "one YAML document"),
        Case("duplicate_key", text(base_text() + "name: again\n"), "duplicate key 'name'"),
        # control characters
        Case("nul_in_value", text(base_text().replace("hostile", "host\x00ile")), "U+0000"),
        Case("nul_binary", text(b"\x00\x01\x02\x03archir: 1\n"), "U+0000"),
        Case("escape", text(base_text().replace("hostile", "\x1b[31mred")), "U+001B"),
        Case("delete", text(base_text().replace("hostile", "a\x7fb")), "U+007F"),
        Case("c1_control", text(base_text().replace("hostile", "a\x9bb")), "U+009B"),
        Case("vertical_tab", text(base_text().replace("hostile", "a\x0bb")), "U+000B"),
        # huge integers
        Case(
            "int_5000_digits_yaml",
            text(base_text().replace("d_model: 32", f"d_model: {big}")),
            "5000 characters",
        ),
        Case(
            "int_5000_digits_json",
            text(json.dumps(BASE).replace('"d_model": 32', f'"d_model": {big}'), "spec.json"),
            "5000 characters",
        ),
        Case("int_2_pow_64", spec_with("model.d_model", 2**64), "out of range"),
        Case(
            "int_hex_huge",
            text(base_text().replace("d_model: 32", "d_model: 0x" + "f" * 30)),
            "out of range",
        ),
        Case(
            "float_1e999_d_model",
            text(base_text().replace("d_model: 32", "d_model: 1e999")),
            "model.d_model",
        ),
        Case(
            "seed_huge_text",
            text(base_text().replace("lr: 0.001\n", f"lr: 0.001\n  seed: {big}\n")),
            "5000 characters",
        ),
        # search spaces
        Case(
            "choice_1e6_options",
            text(base_text().replace("d_model: 32", "d_model: {choice: [" + "8," * 10**6 + "8]}")),
            "over the limit",
            at_line=False,
        ),
        Case("choice_over_limit", _choice(MAX_CHOICE_OPTIONS + 1), "over the limit of 256"),
        Case("choice_1000", _choice(1000), "1000 options"),
        Case("many_search_nodes", _many_nodes(600), "search nodes", heavy=True),
        Case(
            "blocks_after_repeat",
            spec_with(
                "model.layers.0.repeat",
                1024,
                setv("model.layers.0.blocks", [{"kind": "mlp"} for _ in range(5)]),
            ),
            f"limit of {MAX_BLOCKS}",
        ),
        Case(
            "repeat_range_too_many_blocks",
            spec_with(
                "model.layers.0.repeat",
                {"int": [1, 1024]},
                setv("model.layers.0.blocks", [{"kind": "mlp"} for _ in range(8)]),
            ),
            f"limit of {MAX_BLOCKS}",
        ),
        Case("float_range_inf", spec_with("train.lr", {"float": [1e-4, float("inf")]}), "finite"),
        Case(
            "int_range_bool_step",
            spec_with("model.d_model", {"int": [16, 64], "step": True}),
            "'step' must be a positive integer",
        ),
        Case("choice_not_list", spec_with("model.d_model", {"choice": 5}), "non-empty list"),
        # strict values
        Case(
            "n_heads_true",
            spec_with("model.layers.0.blocks.0.n_heads", True),
            "must be a valid integer, got True",
        ),
        Case(
            "n_heads_string",
            spec_with("model.layers.0.blocks.0.n_heads", "8"),
            "must be a valid integer, got '8'",
        ),
        Case(
            "n_heads_float",
            spec_with("model.layers.0.blocks.0.n_heads", 4.0),
            "must be a valid integer, got 4.0",
        ),
        Case("d_model_string", spec_with("model.d_model", "64"), "model.d_model"),
        Case(
            "tie_embeddings_yes_quoted",
            spec_with("model.head.tie_embeddings", "yes"),
            "must be a valid boolean, got 'yes'",
        ),
        Case(
            "tie_embeddings_yes_plain",
            text(base_text().replace("tie_embeddings: true", "tie_embeddings: yes")),
            "must be a valid boolean, got 'yes'",
        ),
        Case(
            "tie_embeddings_one",
            spec_with("model.head.tie_embeddings", 1),
            "must be a valid boolean, got 1",
        ),
        Case(
            "share_weights_string",
            spec_with("model.layers.0.share_weights", "false"),
            "must be a valid boolean",
        ),
        Case(
            "tie_embeddings_on",
            text(base_text().replace("tie_embeddings: true", "tie_embeddings: on")),
            "must be a valid boolean, got 'on'",
        ),
        Case(
            "expansion_string",
            spec_with("model.layers.0.blocks.1.expansion", "2.0"),
            "must be a valid number",
        ),
        Case(
            "expansion_bool",
            spec_with("model.layers.0.blocks.1.expansion", True),
            "must be a valid number",
        ),
        Case("steps_string", spec_with("train.steps", "300"), "train.steps"),
        Case("steps_bool", spec_with("train.steps", True), "train.steps"),
        Case("version_true", spec_with("archir", True), "must be 1, got True"),
        Case("version_string", spec_with("archir", "1"), "must be 1, got '1'"),
        Case("version_2", spec_with("archir", 2), "must be 1, got 2"),
        Case("version_float", spec_with("archir", 1.0), "must be 1, got 1.0"),
        Case("name_int", spec_with("name", 123), "must be a valid string"),
        Case("task_option_list", spec_with("train.task_options.x", [1, 2]), "task_options.x"),
        Case("predict_yes", spec_with("search.latency.predict", "yes"), "valid boolean"),
        # unknown keys
        Case("unknown_top_key", spec_with("trian", {}), "unknown field 'trian'"),
        Case("unknown_model_key", spec_with("model.d_modle", 4), "unknown field 'd_modle'"),
        Case(
            "unknown_block_key",
            spec_with("model.layers.0.blocks.0.n_head", 4),
            "unknown field 'n_head'",
        ),
        Case(
            "unknown_search_key",
            spec_with("search.sampler_name", "tpe"),
            "unknown field 'sampler_name'",
        ),
        Case(
            "unknown_node_key",
            spec_with("model.d_model", {"choice": [16, 32], "tied": "x"}),
            "unknown key 'tied'",
        ),
        Case("unknown_key_long", spec_with("model." + "k" * 5000, 1), "unknown field"),
        # names (they become folder names)
        Case("name_dotdot", spec_with("name", ".."), "must be a valid name"),
        Case("name_dot", spec_with("name", "."), "must be a valid name"),
        Case("name_slash", spec_with("name", "a/b"), "must be a valid name"),
        Case("name_traversal", spec_with("name", "../../etc"), "must be a valid name"),
        Case("name_70_chars", spec_with("name", "a" * 70), "must be a valid name"),
        Case(
            "name_nul_json",
            text(json.dumps(setv("name", "x\u0000")), "spec.json"),
            "must be a valid name",
        ),
        Case("name_newline", spec_with("name", "x\n"), "must be a valid name"),
        Case("name_empty", spec_with("name", ""), "must be a valid name"),
        Case("name_space", spec_with("name", "my model"), "must be a valid name"),
        Case("name_leading_dash", spec_with("name", "-rf"), "must be a valid name"),
        # tags
        Case(
            "tag_python_object",
            text("archir: 1\nname: !!python/object/apply:os.system [ls]\n"),
            "is not allowed",
        ),
        Case(
            "tag_python_name_key",
            text("archir: 1\n!!python/name:os.system x: 1\n"),
            "could not determine a constructor",
        ),
        Case(
            "tag_binary",
            text(base_text().replace("name: hostile", "name: !!binary aGk=")),
            "is not allowed",
        ),
        Case("tag_set", text("archir: 1\nname: x\nmodel: !!set {a, b}\n"), "is not allowed"),
        Case("tag_custom", text("archir: 1\nname: !env HOME\n"), "could not determine"),
        Case(
            "merge_not_mapping",
            text(base_text().replace("model:\n", "model:\n  <<: 5\n", 1)),
            "merge key",
        ),
    ]
    for fid, field, base in FLOAT_FIELDS:
        for label, value in (("inf", float("inf")), ("nan", float("nan"))):
            cases.append(Case(f"{label}_{fid}", spec_with(field, value, base), field))
    cases.append(Case("neg_inf_lr", spec_with("train.lr", float("-inf")), "train.lr"))
    for sid, field, value in SIZES:
        cases.append(Case(sid, spec_with(field, value), field))
    return cases


CASES = _cases()


@pytest.fixture(scope="module", autouse=True)
def _warm() -> None:
    """Import what ``validate`` imports (torch, the blocks, the CLI and what it loads lazily)
    before the first timed case: whichever test a worker runs first must not pay for them."""
    from archir.cli import main
    from archir.cost import check_budget
    from archir.ir import build_graph
    from archir.spec import spec_from_dict

    check_budget(build_graph(spec_from_dict(BASE)))
    zoo = Path(__file__).resolve().parents[1] / "specs" / "zoo" / "transformer.yaml"
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        main(["validate", str(zoo)])


def _plain_seconds(args: list[str]) -> float:
    """Wall time of ``archir ARGS`` in this process without tracemalloc (best of two)."""
    from archir.cli import main

    best = float("inf")
    for _ in range(2):
        t0 = time.perf_counter()
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            main(args)
        best = min(best, time.perf_counter() - t0)
    return best


def test_case_count() -> None:
    assert len(CASES) >= 60
    assert len({c.id for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_hostile_spec_refused(case: Case, tmp_path: Path) -> None:
    path = case.make(tmp_path)
    o = run_cli(["validate", path])
    if case.heavy:
        assert_refused(o, contains=case.contains, max_seconds=30.0)
        assert _plain_seconds(["validate", path]) < MAX_SECONDS
    else:
        assert_refused(o, contains=case.contains)
    first = o.lines[0]
    assert first.startswith(f"error: {path}"), first
    if case.at_line:
        assert re.match(rf"error: {re.escape(path)}:\d+:\d+: ", first), first
    assert len(first) < 400, first


SUBPROCESS = ["alias_bomb_lists", "dev_zero", "fifo", "flow_nesting_100k",
              "block_map_nesting_500", "blocks_20mb", "many_scalars"]  # fmt: skip

_CHILD = """
import atexit, os, resource, sys
lim = int(os.environ["HOSTILE_AS_MB"]) * 2**20
resource.setrlimit(resource.RLIMIT_AS, (lim, lim))
def report():
    with open("/proc/self/status") as f:
        hwm = next(line.split()[1] for line in f if line.startswith("VmHWM:"))
    with open(os.environ["HOSTILE_RSS_FILE"], "w") as f:
        f.write(hwm)
atexit.register(report)
from archir.cli import main
sys.exit(main(sys.argv[1:]))
"""


def _own_peak_mb(args: list[str], tmp: Path, mem_limit_mb: int = 1024) -> tuple[int, str, float]:
    """Exit code, stderr and peak RSS (MB) of a child reporting its own ``VmHWM``.

    ``ru_maxrss`` of a child (what ``run_cli_subprocess`` reports) includes the image it was
    forked from: Linux folds the old address space's high-water mark into ``maxrss`` at
    ``exec``, so under a pytest process that imported torch it reads ~180-280 MB whatever the
    child does. ``VmHWM`` in ``/proc/self/status`` is the high-water mark of the address space
    after ``exec`` only.
    """
    rss_file = tmp / "rss.txt"
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "OMP_NUM_THREADS": "1",
        "HOSTILE_AS_MB": str(mem_limit_mb),
        "HOSTILE_RSS_FILE": str(rss_file),
    }
    p = subprocess.run(
        [sys.executable, "-c", _CHILD, *args],
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=60,
    )
    return p.returncode, p.stderr, int(rss_file.read_text()) / 1024.0


@pytest.mark.parametrize("name", SUBPROCESS)
def test_hostile_spec_refused_in_a_limited_child(name: str, tmp_path: Path) -> None:
    """A fresh ``python -m archir.cli validate`` with 1 GiB of address space: refused before
    torch is imported, so within seconds (interpreter start included) and a few tens of MB."""
    case = next(c for c in CASES if c.id == name)
    path = case.make(tmp_path)
    # the harness: exit 2, one line, no traceback, no hang under a 1 GiB address-space limit;
    # its peak includes this process's image (see _own_peak_mb), hence the relaxed max_mb
    o = run_cli_subprocess(["validate", path], timeout=60, mem_limit_mb=1024)
    assert_refused(o, contains=case.contains, max_seconds=30.0, max_mb=1024.0)
    rc, err, peak = _own_peak_mb(["validate", path], tmp_path)
    assert rc == 2 and case.contains in err and "Traceback" not in err, err
    assert peak < 200.0, f"peak {peak:.0f} MB"


# -- what must keep working ------------------------------------------------------------------


def _ok(path: str) -> None:
    o = run_cli(["validate", path])
    assert o.rc == 0, o.err
    assert o.out.startswith("ok: ")


def test_merge_key_override_is_yaml(tmp_path: Path) -> None:
    """``<<: *base`` then a key: the key written in the mapping wins (YAML merge); of a list
    of merged mappings the first wins; merged values keep the position they were written at."""
    from archir.spec import load_spec

    path = _write(tmp_path, _anchored_block_override())
    _ok(path)
    spec = load_spec(path)
    blocks = spec.data["model"]["layers"][1]["blocks"]
    assert blocks[0] == {"kind": "attention", "n_heads": 4, "pos": "rope"}
    assert blocks[1] == {"kind": "attention", "pos": "alibi", "n_heads": 8}
    assert spec.model.model.layers[1].blocks[0].params.n_heads == 4  # type: ignore[attr-defined]
    at = spec.smap.values
    assert at[("model", "layers", 1, "blocks", 0, "n_heads")] == (12, 32)  # written here
    assert at[("model", "layers", 1, "blocks", 0, "pos")] == (9, 52)  # merged from line 9
    assert at[("model", "layers", 1, "blocks", 1, "pos")] == (10, 41)
    assert not any("<<" in p for p in at)


def test_merge_keys_of_a_mapping_and_bounds_still_error(tmp_path: Path) -> None:
    text_ = base_text().replace(
        "  d_model: 32\n", "  <<: {d_model: 16, vocab_size: 32}\n  d_model: 32\n  d_model: 48\n"
    )
    o = run_cli(["validate", _write(tmp_path, text_)])
    assert_refused(o, contains="duplicate key 'd_model'")


def test_every_spec_in_specs_still_loads() -> None:
    root = Path(__file__).resolve().parents[1] / "specs"
    paths = sorted(root.glob("*/*.yaml"))
    assert len(paths) >= 19
    o = run_cli(["validate", *map(str, paths)])  # one process: each file is checked on its own
    assert o.rc == 0, o.err
    for p in paths:
        assert f"ok: {p}" in o.out, (p, o.out[-2000:])


def test_limits_leave_room_for_real_specs() -> None:
    """The largest spec in specs/ is far below every limit."""
    from archir.spec.source import parse_source

    root = Path(__file__).resolve().parents[1] / "specs"
    for p in root.glob("*/*.yaml"):
        raw = p.read_text()
        assert len(raw.encode()) * 20 < MAX_SPEC_BYTES
        _, smap = parse_source(raw, str(p))
        assert (len(smap.values) + len(smap.keys)) * 20 < MAX_NODES


def test_yaml_12_scalars(tmp_path: Path) -> None:
    """Only true/false are booleans; dates and 'on'/'off' are strings; 1e-3 is a float."""
    from archir.spec.source import parse_source

    data, _ = parse_source("a: on\nb: off\nc: 2024-01-01\nd: 1e-3\ne: TRUE\nf: ~\ng: 0x10\n")
    assert data == {"a": "on", "b": "off", "c": "2024-01-01", "d": 1e-3, "e": True, "f": None,
                    "g": 16}  # fmt: skip


@pytest.mark.slow  # 13 s; libyaml, the parser every install has, is tested throughout
def test_pure_python_parser_agrees(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Without libyaml the same limits and messages hold (PyYAML's own parser)."""
    from archir.spec import source

    monkeypatch.setattr(source, "_CParser", None)
    for name in ("flow_nesting_100k", "alias_bomb_lists", "nul_in_value", "block_seq_nesting_500",
                 "merge_not_mapping", "int_5000_digits_json", "two_documents"):  # fmt: skip
        case = next(c for c in CASES if c.id == name)
        (tmp_path / name).mkdir()
        o = run_cli(["validate", case.make(tmp_path / name)])
        assert_refused(o, contains=case.contains)
    _ok(str(Path(__file__).resolve().parents[1] / "specs" / "search" / "hybrid-lm.yaml"))
    _ok(_write(tmp_path, _anchored_block_override(), "merged.yaml"))


def test_syntax_error_messages_are_pyyaml_wording(tmp_path: Path) -> None:
    errors = Path(__file__).resolve().parent / "errors"
    o = run_cli(["validate", str(errors / "bad_yaml_indent.yaml")])
    assert "mapping values are not allowed here" in o.err


def test_special_file_not_opened(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A fifo is refused from stat: ``os.open`` is never called (it would block)."""
    from archir.spec import source

    calls: list[Any] = []
    real_open = os.open
    monkeypatch.setattr(source.os, "open", lambda *a, **k: calls.append(a) or real_open(*a, **k))
    path = _fifo(tmp_path)
    assert stat.S_ISFIFO(os.stat(path).st_mode)
    o = run_cli(["validate", path])
    assert_refused(o, contains="fifo")
    assert calls == []
