"""Lineage of an evolution search (issue 13, part 4): the family tree built from the trials'
``lineage`` records, promotions and retries resolved to their models, the mutation path
printed for each front member, ``RUN/lineage.png``, and the refusals.

The run folders are made the way a search makes them: trials in an Optuna study (journal in
the run folder, or SQLite), ``run.json`` naming the study and its storage, and ``pareto.json``
written from the study with the front code a search uses (:mod:`searchers.pareto`).
"""

from __future__ import annotations

import hashlib
import json
import random
import warnings
from pathlib import Path
from typing import Any

import optuna
import pytest
import yaml
from optuna.storages import JournalStorage
from optuna.storages.journal import JournalFileBackend
from optuna.trial import TrialState

from archir.errors import SearchError
from searchers.ladder import ATTR_CONTINUE, top_rung_trials
from searchers.lineage import (
    PNG_MARK,
    arch_label,
    build_tree,
    draw_lineage,
    format_path,
    model_roots,
    path_to,
    read_trials,
    written_by_archir,
)
from searchers.objectives import TRIAL_ATTR, Objective, parse_constraint
from searchers.pareto import front_trials, trial_row
from tests.hostile_util import ROOT, assert_refused, run_cli

optuna.logging.set_verbosity(optuna.logging.WARNING)

OBJECTIVES = [Objective("val_bpb", "minimize"), Objective("params", "minimize")]
CONSTRAINTS = [parse_constraint("params", "<= 5000")]
PNG_SIG = b"\x89PNG\r\n\x1a\n"

SWAP = "swap_mixer layer 1: attention -> mamba (d_state=16)"
INSERT = "insert_layer at 1 (copy of layer 0)"
WIDEN = "d_model 32 -> 48"
CROSS = "crossover: layers 0-0 of #2 + 1-1 of #1"
GLA = "swap_mixer layer 0: attention -> gla"


def spec_text(d_model: int, mixers: list[str]) -> str:
    """A concrete spec with one layer group per token mixer (each with a SwiGLU)."""
    extra = {"mamba": {"d_state": 16}, "attention": {"n_heads": 2}}
    doc = {
        "archir": 1,
        "name": "evo",
        "model": {
            "task": "causal_lm",
            "vocab_size": 256,
            "d_model": d_model,
            "max_seq_len": 64,
            "embed": {"kind": "token_embedding"},
            "layers": [
                {"blocks": [{"kind": k, **extra.get(k, {})}, {"kind": "swiglu", "expansion": 2}]}
                for k in mixers
            ],
            "head": {"kind": "lm_head", "tie_embeddings": True},
        },
    }
    return yaml.safe_dump(doc, sort_keys=False)


def rec(
    origin: str | None,
    parents: list[int] | None = None,
    mutations: list[str] | None = None,
    *,
    spec: tuple[int, list[str]] | None = None,
    inherited_from: int | None = None,
    status: str = "ok",
    values: dict[str, float] | None = None,
    **more: Any,
) -> dict[str, Any]:
    """An ``archir:trial`` record as the evolution searcher writes it."""
    r: dict[str, Any] = {"status": status, "values": values or {}, **more}
    if spec is not None:
        r["spec_yaml"] = spec_text(*spec)
        r["spec_hash"] = hashlib.sha256(r["spec_yaml"].encode()).hexdigest()[:16]
    if origin is not None:
        r["lineage"] = {
            "origin": origin,
            "parents": list(parents or []),
            "mutations": list(mutations or []),
            "inherited_from": inherited_from,
        }
    return r


def add(
    study: optuna.Study,
    number: int,
    r: dict[str, Any],
    state: TrialState = TrialState.COMPLETE,
    system: dict[str, Any] | None = None,
) -> None:
    vals = r.get("values", {})
    values = [vals["val_bpb"], vals["params"]] if state == TrialState.COMPLETE else None
    if state == TrialState.COMPLETE:
        over = max(0.0, vals["params"] - 5000)
        r = {**r, "violations": [over]}
        if over > 0:
            r["status"] = "infeasible"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        study.add_trial(
            optuna.trial.create_trial(
                state=state,
                values=values,
                user_attrs={TRIAL_ATTR: r},
                system_attrs=system or {},
            )
        )
    assert study.trials[-1].number == number


def v(bpb: float, params: float) -> dict[str, float]:
    return {"val_bpb": bpb, "params": params}


def family(study: optuna.Study) -> None:
    """Three generations and a crossover::

    #0 seed ── #2 (swap, weights of #0) ── #3 (insert, widen)       front
    #1 sampled ─┴── #4 crossover of #2 + #1 (cross, gla)            front
    #1 ── #5 infeasible; #3 ── #6 failed
    """
    add(study, 0, rec("seed", spec=(32, ["attention", "attention"]), values=v(3.0, 1000)))
    add(study, 1, rec("sampled", spec=(32, ["mamba", "mamba"]), values=v(3.2, 900)))
    add(
        study,
        2,
        rec(
            "mutation",
            [0],
            [SWAP],
            inherited_from=0,
            spec=(32, ["attention", "mamba"]),
            values=v(2.8, 1100),
        ),
    )
    add(
        study,
        3,
        rec(
            "mutation",
            [2],
            [INSERT, WIDEN],
            spec=(48, ["attention", "attention", "mamba"]),
            values=v(2.5, 1500),
        ),
    )
    add(
        study,
        4,
        rec("crossover", [2, 1], [CROSS, GLA], spec=(32, ["gla", "mamba"]), values=v(2.6, 1000)),
    )
    add(study, 5, rec("mutation", [1], ["d_model 32 -> 512"], values=v(2.0, 90000)))
    add(study, 6, rec("mutation", [3], ["drop_layer 0"], status="failed"), TrialState.FAIL)


def make_run(
    tmp_path: Path, build=family, name: str = "evo", storage: str = "journal"
) -> tuple[Path, optuna.Study]:
    """A run folder as ``archir search`` leaves it: study, run.json, pareto.json."""
    run = tmp_path / "runs" / name
    run.mkdir(parents=True)
    if storage == "journal":
        url = "study.journal"
        st: Any = JournalStorage(JournalFileBackend(str(run / "study.journal")))
    else:
        url = f"sqlite:///{run / 'study.db'}"
        st = optuna.storages.RDBStorage(url)
    study = optuna.create_study(study_name=name, storage=st, directions=["minimize"] * 2)
    build(study)
    (run / "spec.yaml").write_text(spec_text(32, ["attention", "attention"]))
    (run / "run.json").write_text(
        json.dumps({"spec": "spec.yaml", "study": name, "storage": url, "searcher": "evolution"})
    )
    trials = study.get_trials()
    pool, top = top_rung_trials(trials)
    front = front_trials(pool, OBJECTIVES)
    states: dict[str, int] = {}
    for t in trials:
        states[t.state.name.lower()] = states.get(t.state.name.lower(), 0) + 1
    doc = {
        "study": name,
        "objectives": {o.metric: o.direction for o in OBJECTIVES},
        "constraints": {c.metric: c.text for c in CONSTRAINTS},
        "n_trials": len(trials),
        "states": states,
        "fidelity": {"kind": "ladder" if top is not None else "proxy"},
        "front": [trial_row(t, OBJECTIVES, CONSTRAINTS) for t in front],
        "best": front[0].number if front else None,
        "trials": [trial_row(t, OBJECTIVES, CONSTRAINTS) for t in trials],
    }
    (run / "pareto.json").write_text(json.dumps(doc, indent=2))
    if storage != "journal":
        st.engine.dispose()
    return run, study


def snapshot(d: Path) -> dict[str, str]:
    return {
        p.relative_to(d).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        if p.is_file()
        else "dir"
        for p in sorted(d.rglob("*"))
    }


def in_order(text: str, parts: list[str]) -> None:
    """Each of ``parts`` occurs in ``text``, in this order."""
    at = 0
    for p in parts:
        i = text.find(p, at)
        assert i >= 0, f"{p!r} not found (in order) in:\n{text}"
        at = i + len(p)


# -- the tree -------------------------------------------------------------------------------
def test_tree_edges_attributes_and_generations(tmp_path):
    run, study = make_run(tmp_path)
    name, trials = read_trials(run)
    assert name == "evo" and [t.number for t in trials] == list(range(7))
    front = [r["trial"] for r in json.loads((run / "pareto.json").read_text())["front"]]
    assert sorted(front) == [1, 3, 4]
    tree = build_tree(trials, front, run_dir=run, study=name)
    assert sorted(tree.edges) == [(0, 2), (1, 4), (1, 5), (2, 3), (2, 4), (3, 6)]
    assert tree.edges[2, 4]["index"] == 0 and tree.edges[1, 4]["index"] == 1
    assert tree.edges[0, 2]["inherited"] and not tree.edges[2, 3]["inherited"]
    n = tree.nodes
    assert {k: n[k]["origin"] for k in n} == {
        0: "seed",
        1: "sampled",
        2: "mutation",
        3: "mutation",
        4: "crossover",
        5: "mutation",
        6: "mutation",
    }
    assert {k for k in n if n[k]["on_front"]} == {1, 3, 4}
    assert {k: n[k]["generation"] for k in n} == {0: 0, 1: 0, 2: 1, 3: 2, 4: 2, 5: 1, 6: 3}
    assert n[5]["status"] == "infeasible" and n[6]["status"] == "failed"
    assert n[3]["values"]["val_bpb"] == 2.5 and n[3]["mutations"] == [INSERT, WIDEN]
    assert n[0]["label"] == "d32 attn·attn"
    assert n[3]["label"] == "d48 attn·attn·mamba"
    assert n[4]["label"] == "d32 gla·mamba"
    assert n[5]["label"] == "?"  # no concrete spec recorded


def test_arch_label_counts_runs_and_uses_the_registry_roles():
    assert arch_label(spec_text(64, ["attention"] * 4 + ["mamba", "gla"])) == "d64 attn×4·mamba·gla"
    doc = yaml.safe_load(spec_text(16, ["hyena"]))
    doc["model"]["layers"][0]["repeat"] = 3
    assert arch_label(doc) == "d16 hyena×3"
    assert arch_label("not: [a spec") == "?"
    assert arch_label({"model": {"d_model": 8}}) == "?"


def ladder(study: optuna.Study) -> None:
    """Promotions (``continue_of`` in the record, or only the system attribute) and an
    interrupted trial with its retry, all of which are the same models::

    #0 seed ── #1 ── #3 (parent given as #2, a promotion of #1) ── #7 (retry of #6)
    #2 promotes #1 to rung 1, #4 promotes #2 to rung 2 (system attribute only), #5 promotes #3
    """

    def rungs(*vals: tuple[float, float]) -> list[dict[str, Any]]:
        return [{"rung": i, "steps": [10, 30, 90][i], "values": v(*x)} for i, x in enumerate(vals)]

    r0, r1, r2 = (3.0, 900), (2.7, 900), (2.4, 900)
    spec = (32, ["attention"])
    add(study, 0, rec("seed", spec=spec, values=v(*r0), rungs=rungs(r0), rung=0, steps=10))
    add(
        study,
        1,
        rec(
            "mutation",
            [0],
            [SWAP],
            spec=(32, ["mamba"]),
            values=v(*r0),
            rungs=rungs(r0),
            rung=0,
            steps=10,
        ),
    )
    add(
        study,
        2,
        rec(None, values=v(*r1), rungs=rungs(r0, r1), rung=1, steps=30, continue_of=1),
        system={ATTR_CONTINUE: 1, "archir:rung": 1},
    )
    add(
        study,
        3,
        rec(
            "mutation",
            [2],
            [INSERT],
            spec=(32, ["mamba", "mamba"]),
            values=v(3.1, 1800),
            rungs=rungs((3.1, 1800)),
            rung=0,
            steps=10,
        ),
    )
    add(
        study,
        4,
        rec(None, values=v(*r2), rungs=rungs(r0, r1, r2), rung=2, steps=90),
        system={ATTR_CONTINUE: 2, "archir:rung": 2},
    )
    add(
        study,
        5,
        rec(None, values=v(3.0, 1800), rungs=rungs((3.1, 1800), (3.0, 1800)), rung=1, steps=30),
        system={ATTR_CONTINUE: 3, "archir:rung": 1},
    )
    add(study, 6, {"status": "interrupted", "reason": "interrupted"}, TrialState.FAIL)
    add(
        study,
        7,
        rec("mutation", [3], [WIDEN], values=v(3.3, 2000), rungs=rungs((3.3, 2000)), rung=0),
        system={"failed_trial": 6, "retry_history": [6]},
    )


def test_promotions_and_retries_resolve_to_their_models(tmp_path):
    run, _ = make_run(tmp_path, ladder)
    name, trials = read_trials(run)
    assert model_roots(trials) == {0: 0, 1: 1, 2: 1, 3: 3, 4: 1, 5: 3, 6: 7, 7: 7}
    doc = json.loads((run / "pareto.json").read_text())
    assert [r["trial"] for r in doc["front"]] == [4]  # the top rung: a promotion
    tree = build_tree(trials, [4], run_dir=run, study=name)
    assert sorted(tree.nodes) == [0, 1, 3, 7]
    assert sorted(tree.edges) == [(0, 1), (1, 3), (3, 7)]
    assert tree.nodes[1]["on_front"] and tree.nodes[1]["trials"] == [1, 2, 4]
    assert tree.nodes[1]["trial"] == 4 and tree.nodes[1]["steps"] == 90
    assert tree.nodes[1]["values"]["val_bpb"] == 2.4  # from the rung it went furthest to
    assert tree.nodes[3]["parents"] == [1]  # recorded as #2, the promotion of #1
    assert tree.nodes[7]["trials"] == [6, 7]
    assert [s.node for s in path_to(tree, 4)] == [0, 1]  # any trial of the model


def test_report_prints_the_path_of_a_promoted_front_member(tmp_path):
    run, _ = make_run(tmp_path, ladder)
    o = run_cli(["report", run, "--lineage"], cwd=tmp_path)
    assert o.rc == 0, o.err
    in_order(o.out, ["front member #1 (trial 4, 90 steps): d32 mamba", "#0", "seed", "#1"])
    in_order(o.out, ["mutation of #0", f"- {SWAP}", "= val_bpb 2.4, params 900"])
    assert "#3" not in o.out  # not on the front's path


# -- paths and the printout -------------------------------------------------------------------
def test_path_of_a_three_generation_chain(tmp_path):
    run, _ = make_run(tmp_path)
    name, trials = read_trials(run)
    tree = build_tree(trials, [1, 3, 4], run_dir=run, study=name)
    steps = path_to(tree, 3)
    assert [s.node for s in steps] == [0, 2, 3]
    assert [s.origin for s in steps] == ["seed", "mutation", "mutation"]
    assert [list(s.mutations) for s in steps] == [[], [SWAP], [INSERT, WIDEN]]
    assert steps[1].inherited_from == 0 and steps[2].parents == (2,)
    text = format_path(tree, 3, metrics=["val_bpb", "params"])
    assert text.splitlines() == [
        "model #3",
        "  #0  seed                           d32 attn·attn",
        "  #2  mutation of #0, weights of #0  d32 attn·mamba",
        f"        - {SWAP}",
        "  #3  mutation of #2                 d48 attn·attn·mamba",
        f"        - {INSERT}",
        f"        - {WIDEN}",
        "  = val_bpb 2.5, params 1500",
    ]


def test_path_through_a_crossover_names_both_parents(tmp_path):
    run, _ = make_run(tmp_path)
    name, trials = read_trials(run)
    tree = build_tree(trials, [1, 3, 4], run_dir=run, study=name)
    steps = path_to(tree, 4)
    assert [s.node for s in steps] == [0, 2, 4]  # first parents
    assert steps[-1].origin == "crossover" and steps[-1].parents == (2, 1)
    assert list(steps[-1].mutations) == [CROSS, GLA]
    lines = format_path(tree, 4, metrics=["val_bpb"]).splitlines()
    assert lines[4].split()[:5] == ["#4", "crossover", "of", "#2", "+"]
    assert lines[4].split()[5] == "#1"
    assert [ln.strip() for ln in lines[5:7]] == [f"- {CROSS}", f"- {GLA}"]
    assert lines[-1].strip() == "= val_bpb 2.6"


def test_report_lineage_prints_each_front_member_and_draws_the_tree(tmp_path):
    run, _ = make_run(tmp_path)
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (outside / "keep.txt").write_text("x")
    before_run, before_all = snapshot(run), snapshot(tmp_path)
    o = run_cli(["report", run, "--lineage"], cwd=tmp_path)
    assert o.rc == 0, o.err
    assert o.err == ""
    # the front in pareto.json's order, each with its path from the seed and its values
    doc = json.loads((run / "pareto.json").read_text())
    order = [r["trial"] for r in doc["front"]]
    heads = [ln for ln in o.out.splitlines() if ln.startswith("front member #")]
    assert [int(h.split("#")[1].split(":")[0].split()[0]) for h in heads] == order
    assert o.out.splitlines()[0].startswith("evo: 7 models in 4 generation(s), 3 on the front")
    block3 = o.out.split("front member #3")[1].split("front member #")[0]
    in_order(block3, ["#0", "seed", "#2", f"- {SWAP}", "#3", f"- {INSERT}", f"- {WIDEN}"])
    in_order(block3, ["= val_bpb 2.5, params 1500"])
    block4 = o.out.split("front member #4")[1].split("front member #")[0]
    in_order(block4, ["#0", "seed", "#2", "#4", "crossover of #2 + #1", f"- {CROSS}", f"- {GLA}"])
    block1 = o.out.split("front member #1")[1].split("front member #")[0]
    in_order(block1, ["#1", "sampled", "= val_bpb 3.2, params 900"])
    # the PNG: a valid, non-empty image archir marks as its own
    png = run / "lineage.png"
    data = png.read_bytes()
    assert data.startswith(PNG_SIG) and len(data) > 1000
    assert written_by_archir(png)
    from PIL import Image

    with Image.open(png) as im:
        im.verify()
    with Image.open(png) as im:
        assert im.size[0] > 100 and im.size[1] > 100
        assert im.info.get("Software") == PNG_MARK
    # nothing else written or changed, in the run folder or outside it
    after = snapshot(tmp_path)
    assert {k for k in after if k not in before_all} == {"runs/evo/lineage.png"}
    assert all(after[k] == h for k, h in before_all.items())
    assert {k: h for k, h in snapshot(run).items() if k != "lineage.png"} == before_run
    # run again: it replaces its own drawing
    o = run_cli(["report", run, "--lineage", "--all"], cwd=tmp_path)
    assert o.rc == 0, o.err
    assert "model #5" in o.out and "model #6" in o.out and "[infeasible]" in o.out
    assert set(snapshot(tmp_path)) == set(after)
    # the plain report is unchanged by it
    o = run_cli(["report", run], cwd=tmp_path)
    assert o.rc == 0 and "Pareto front" in o.out and "front member" not in o.out


def test_a_torn_journal_tail_is_left_alone(tmp_path):
    """A running search may be appending: the report reads the whole records and writes
    nothing to the journal (no repair, no file moved aside)."""
    run, _ = make_run(tmp_path)
    with open(run / "study.journal", "ab") as f:
        f.write(b'{"op_code": 5, "worker_id": "x", "trial_id": 1, "user_attr')
    before = (run / "study.journal").read_bytes()
    _, trials = read_trials(run)
    assert len(trials) == 7
    assert (run / "study.journal").read_bytes() == before
    assert sorted(p.name for p in run.iterdir()) == [
        "pareto.json",
        "run.json",
        "spec.yaml",
        "study.journal",
    ]


def test_a_journal_damaged_in_the_middle_is_a_clean_error(tmp_path):
    run, _ = make_run(tmp_path)
    lines = (run / "study.journal").read_bytes().split(b"\n")
    lines[2] = b"garbage"
    (run / "study.journal").write_bytes(b"\n".join(lines))
    assert_refused(
        run_cli(["report", run, "--lineage"], cwd=tmp_path), contains="line 3", max_seconds=10
    )
    assert not (run / "lineage.png").exists()


def test_sqlite_storage_is_read_without_writing(tmp_path):
    run, _ = make_run(tmp_path, storage="sqlite")
    before = snapshot(run)
    o = run_cli(["report", run, "--lineage"], cwd=tmp_path)
    assert o.rc == 0, o.err
    assert "front member #3" in o.out
    after = snapshot(run)
    assert {k: h for k, h in after.items() if k != "lineage.png"} == before


# -- refusals ---------------------------------------------------------------------------------
def test_a_run_without_lineage_is_a_clean_error(tmp_path):
    """A real (cost-fidelity) search by the Optuna searcher records no lineage."""
    from searchers.run import run_search

    data = yaml.safe_load((ROOT / "specs" / "search" / "tiny.yaml").read_text())
    data["search"].update(
        objectives={"params": "minimize"}, constraints={}, fidelity="cost", budget={"trials": 3}
    )
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump(data, sort_keys=False))
    run_search(spec, out=tmp_path / "runs" / "tiny", export=False, say=lambda s: None)
    run = tmp_path / "runs" / "tiny"
    before = snapshot(tmp_path)
    o = run_cli(["report", run, "--lineage"], cwd=tmp_path)
    assert_refused(o, contains="no lineage", max_seconds=10, max_mb=500)
    assert "--searcher evolution" in o.err
    assert snapshot(tmp_path) == before
    assert run_cli(["report", run], cwd=tmp_path).rc == 0


def test_lineage_png_of_someone_else_is_never_overwritten(tmp_path):
    run, _ = make_run(tmp_path)
    mine = run / "lineage.png"
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig = plt.figure()
    fig.savefig(mine)  # a PNG, but not archir's
    plt.close(fig)
    before = mine.read_bytes()
    o = run_cli(["report", run, "--lineage"], cwd=tmp_path)
    assert_refused(o, contains="not written by archir", max_seconds=10)
    assert mine.read_bytes() == before
    mine.unlink()
    target = tmp_path / "target.png"
    target.write_bytes(b"mine")
    mine.symlink_to(target)
    assert_refused(
        run_cli(["report", run, "--lineage"], cwd=tmp_path),
        contains="not a regular file",
        max_seconds=10,
    )
    assert target.read_bytes() == b"mine" and mine.is_symlink()


@pytest.mark.parametrize(
    ("setup", "want"),
    [
        ("no run.json", "no run.json"),
        ("bad run.json", "does not name the study"),
        ("no journal", "journal"),
        ("not a journal", "not an Optuna journal"),
        ("other study", "is not in its storage"),
        ("no pareto.json", "no pareto.json"),
        ("json too", "cannot be combined"),
    ],
)
def test_bad_run_folders_are_clean_errors(tmp_path, setup, want):
    run, _ = make_run(tmp_path)
    extra = []
    if setup == "no run.json":
        (run / "run.json").unlink()
    elif setup == "bad run.json":
        (run / "run.json").write_text("[1, 2]")
    elif setup == "no journal":
        (run / "study.journal").unlink()
    elif setup == "not a journal":
        (run / "study.journal").write_text('{"a": 1}\n{"b": 2}\n')
    elif setup == "other study":
        doc = json.loads((run / "run.json").read_text())
        (run / "run.json").write_text(json.dumps({**doc, "study": "nope"}))
    elif setup == "no pareto.json":
        (run / "pareto.json").unlink()
    elif setup == "json too":
        extra = ["--json"]
    assert_refused(
        run_cli(["report", run, "--lineage", *extra], cwd=tmp_path), contains=want, max_seconds=10
    )
    assert not (run / "lineage.png").exists()


def test_a_cycle_in_the_recorded_parents_is_a_clean_error():
    study = optuna.create_study(directions=["minimize"] * 2)
    add(study, 0, rec("mutation", [1], ["a"], values=v(1.0, 10)))
    add(study, 1, rec("mutation", [0], ["b"], values=v(1.0, 11)))
    with pytest.raises(SearchError, match="cycle"):
        build_tree(study.trials)


def test_missing_parents_and_unrecorded_lineage_are_shown_not_fatal():
    study = optuna.create_study(directions=["minimize"] * 2)
    add(study, 0, rec("mutation", [41], ["x"], values=v(1.0, 10)))
    add(study, 1, rec(None, values=v(1.0, 12)))
    tree = build_tree(study.trials, [0])
    assert tree.nodes[41]["origin"] == "missing" and (41, 0) in tree.edges
    assert tree.nodes[1]["origin"] == "unknown"
    text = format_path(tree, 0)
    in_order(text, ["#41", "not in the study", "#0", "mutation of #41", "- x"])
    assert "lineage not recorded" in format_path(tree, 1)
    with pytest.raises(SearchError, match="not a model"):
        path_to(tree, 99)


def test_draws_a_large_tree(tmp_path):
    rng = random.Random(0)
    study = optuna.create_study(directions=["minimize"] * 2)
    for i in range(8):
        add(study, i, rec("sampled", values=v(3 + rng.random(), 1000 + i)))
    for i in range(8, 180):
        if rng.random() < 0.2:
            ps = rng.sample(range(i), 2)
            add(study, i, rec("crossover", ps, ["crossover"], values=v(rng.random() * 3, 900)))
        else:
            p = rng.randrange(max(0, i - 30), i)
            add(study, i, rec("mutation", [p], ["m"], inherited_from=p, values=v(3, 1000)))
    tree = build_tree(study.trials, [170, 175])
    assert tree.number_of_nodes() == 180
    png = draw_lineage(tree, tmp_path / "lineage.png")
    assert png.read_bytes().startswith(PNG_SIG) and written_by_archir(png)
    draw_lineage(tree, png)  # its own file: replaced
    (tmp_path / "other.png").write_bytes(PNG_SIG + b"junk")
    with pytest.raises(SearchError, match="not written by archir"):
        draw_lineage(tree, tmp_path / "other.png")


def test_a_queued_child_shows_the_lineage_it_was_queued_with():
    """The evolution searcher queues a child as a WAITING trial whose system attribute
    holds its lineage (a retry or a promotion copies it): it is in the tree before it ran."""
    from searchers.evolution import ATTR_LINEAGE as WRITTEN
    from searchers.lineage import ATTR_LINEAGE

    assert ATTR_LINEAGE == WRITTEN
    study = optuna.create_study(directions=["minimize"] * 2)
    add(study, 0, rec("seed", values=v(1.0, 10)))
    lin = {"origin": "mutation", "parents": [0], "mutations": [SWAP], "inherited_from": None}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        study.add_trial(
            optuna.trial.create_trial(state=TrialState.WAITING, system_attrs={ATTR_LINEAGE: lin})
        )
    tree = build_tree(study.trials)
    assert list(tree.edges) == [(0, 1)]
    assert tree.nodes[1]["status"] == "waiting" and tree.nodes[1]["mutations"] == [SWAP]
