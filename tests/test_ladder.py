"""The fidelity ladder (issue 12): the ``wsd`` schedule, rung branches that equal plain runs,
continuation from checkpoints, Pareto promotion, and a laddered search's bookkeeping."""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import optuna
import pytest
import yaml

import archir.train as tr
from archir.errors import TrainingError
from archir.spec.loader import spec_from_text
from archir.spec.sections import TrainSection
from archir.tasks.base import get_task
from archir.train import lr_at, train, train_ladder
from searchers.ladder import (
    ATTR_CONTINUE,
    ATTR_RUNG,
    Entry,
    crowding,
    pareto_ranks,
    promotions,
    rank,
)
from searchers.objectives import TRIAL_ATTR, Constraint, Objective, trial_attrs
from searchers.run import OVER_BUDGET
from searchers.storage import open_storage
from tests.hostile_util import ROOT, assert_refused, run_cli

TINY = ROOT / "specs" / "search" / "tiny.yaml"

SPEC = """
archir: 1
name: lad
model:
  task: causal_lm
  vocab_size: 256
  d_model: 16
  max_seq_len: 32
  embed: {kind: token_embedding}
  layers:
    - blocks:
        - {kind: attention, n_heads: 2}
        - {kind: swiglu, expansion: 2}
  head: {kind: lm_head, tie_embeddings: true}
"""
RUNGS = [6, 12, 24]


def _cfg(**kw: Any) -> TrainSection:
    base = dict(
        task="text:pydoc",
        steps=24,
        batch_size=4,
        seq_len=16,
        lr=3e-3,
        warmup_steps=2,
        eval_batches=3,
        threads=1,
    )
    return TrainSection(**{**base, **kw})


@pytest.fixture(scope="module")
def spec():
    return spec_from_text(SPEC)


@pytest.fixture(scope="module")
def task():
    return get_task("text:pydoc")


# -- the schedule -----------------------------------------------------------------------------
def test_wsd_short_run_is_a_prefix_of_a_long_one():
    cfg = _cfg(schedule="wsd", warmup_steps=4, lr=1e-2, min_lr=1e-4, decay_fraction=0.25)
    for short, long in ((40, 160), (17, 400)):
        start = tr.decay_start(short, cfg)
        assert start == short - round(0.25 * short)
        for s in range(start):
            assert lr_at(s, cfg, short) == lr_at(s, cfg, long)
        # warm-up, then the stable rate
        assert lr_at(0, cfg, long) == pytest.approx(1e-2 / 4)
        assert lr_at(4, cfg, long) == 1e-2
        # linear decay to min_lr, reached at the last step
        assert lr_at(short - 1, cfg, short) == pytest.approx(1e-4)
        d = tr.decay_steps(short, cfg)
        mid = start + d // 2 - 1
        want = 1e-2 + (1e-4 - 1e-2) * (d // 2) / d
        assert lr_at(mid, cfg, short) == pytest.approx(want)


def test_cosine_schedule_is_unchanged():
    cfg = _cfg(steps=100, warmup_steps=10, lr=1.0, min_lr=0.0)
    assert lr_at(4, cfg) == pytest.approx(0.5)
    assert lr_at(10, cfg) == pytest.approx(1.0)
    assert lr_at(55, cfg) == pytest.approx(0.5)
    assert lr_at(99, cfg) == pytest.approx(0.5 * (1 + math.cos(math.pi * 89 / 90)))


# -- rungs equal plain runs; continuation repeats nothing ----------------------------------------
def test_each_rung_equals_a_plain_wsd_run_of_its_length(spec, task):
    cfg = _cfg()
    got = train_ladder(spec, task, cfg, RUNGS)
    assert got.status == "ok"
    assert [r["steps"] for r in got.metrics["rungs"]] == RUNGS
    for rec, steps in zip(got.metrics["rungs"], RUNGS):
        plain = train(spec, task, None, cfg.model_copy(update={"steps": steps, "schedule": "wsd"}))
        assert rec["val_bpb"] == plain.metrics["val_bpb"], steps
        assert rec["val_bpb_se"] > 0
    assert got.metrics["val_bpb"] == got.metrics["rungs"][-1]["val_bpb"]
    # and they learn: the top rung is better than the first
    assert got.metrics["rungs"][-1]["val_bpb"] < got.metrics["rungs"][0]["val_bpb"]


def test_continuing_from_a_rung_checkpoint_equals_an_uninterrupted_run(
    spec, task, tmp_path, monkeypatch
):
    cfg = _cfg()
    whole = train_ladder(spec, task, cfg, RUNGS)
    steps_taken = []
    real = tr.Trainer.train_step

    def counting(self, lr):
        steps_taken.append(self.step)
        return real(self, lr)

    monkeypatch.setattr(tr.Trainer, "train_step", counting)
    first = train_ladder(spec, task, cfg, RUNGS, until=0, out_dir=tmp_path)
    assert [r["rung"] for r in first.metrics["rungs"]] == [0]
    assert len(steps_taken) == RUNGS[0]
    man = json.loads((tmp_path / "checkpoint.json").read_text())
    assert man["step"] == tr.decay_start(RUNGS[0], cfg.model_copy(update={"schedule": "wsd"}))
    assert [r["rung"] for r in man["rungs"]] == [0]
    steps_taken.clear()
    rest = train_ladder(spec, task, cfg, RUNGS, out_dir=tmp_path)
    # only the trunk between the rungs and the new decays: no rung repeated
    wsd = cfg.model_copy(update={"schedule": "wsd"})
    want = RUNGS[-1] - tr.decay_start(RUNGS[0], wsd) + tr.decay_steps(RUNGS[1], wsd)
    assert len(steps_taken) == want
    assert [r["val_bpb"] for r in rest.metrics["rungs"]] == [
        r["val_bpb"] for r in whole.metrics["rungs"]
    ]


def test_the_model_of_a_rung_already_evaluated_is_made_again(spec, task, tmp_path):
    cfg = _cfg()
    a = train_ladder(spec, task, cfg, RUNGS, until=1, out_dir=tmp_path)
    b = train_ladder(spec, task, cfg, RUNGS, until=1, out_dir=tmp_path)  # e.g. after a kill
    sa, sb = a.model.state_dict(), b.model.state_dict()
    assert all(bool((sa[k] == sb[k]).all()) for k in sa)
    with pytest.raises(TrainingError, match="past rung 0"):
        train_ladder(spec, task, cfg, RUNGS, until=0, out_dir=tmp_path)


@pytest.mark.parametrize(
    "rungs, kw, want",
    [
        ([10, 10, 20], {}, "must be step counts that grow"),
        ([20, 10], {}, "must be step counts that grow"),
        ([10, 40], {"warmup_steps": 9}, "reaches into the first rung's decay"),
    ],
)
def test_bad_ladders_are_refused(spec, task, rungs, kw, want):
    with pytest.raises(TrainingError, match=want):
        train_ladder(spec, task, _cfg(**kw), rungs)


def test_old_checkpoints_without_the_new_settings_still_resume(spec, task, tmp_path):
    cfg = _cfg(steps=6)
    train(spec, task, tmp_path, cfg, checkpoint_every=3)
    man = json.loads((tmp_path / "checkpoint.json").read_text())
    for k in ("schedule", "decay_fraction", "eval_batch_size"):
        del man["train"][k]  # written before these settings existed
    (tmp_path / "checkpoint.json").write_text(json.dumps(man))
    again = train(spec, task, tmp_path, cfg.model_copy(update={"steps": 6}), resume=True)
    assert again.status == "ok"
    with pytest.raises(TrainingError, match="schedule='cosine', this run has schedule='wsd'"):
        train(spec, task, tmp_path, cfg.model_copy(update={"schedule": "wsd"}), resume=True)


# -- promotion by Pareto rank ---------------------------------------------------------------------
def _entry(n: int, vec: list[float], viol: float = 0.0) -> Entry:
    return Entry(SimpleNamespace(number=n), f"h{n}", vec, viol)  # type: ignore[arg-type]


def test_pareto_ranks_and_crowding():
    pts = [[1, 5], [2, 2], [5, 1], [3, 3], [4, 4], [6, 6]]
    assert pareto_ranks(pts) == [0, 0, 0, 1, 2, 3]
    d = crowding([[1, 5], [2, 2], [5, 1]])
    assert d[0] == d[2] == math.inf and d[1] == pytest.approx((5 - 1) / 4 + (5 - 1) / 4)


def test_rank_puts_feasible_first_then_front_then_spread():
    es = [
        _entry(0, [0.5, 0.5], viol=0.3),  # dominates all, but infeasible
        _entry(1, [3, 3]),
        _entry(2, [1, 5]),
        _entry(3, [2, 2.1]),
        _entry(4, [5, 1]),
        _entry(5, [0.9, 0.9], viol=0.1),
        _entry(6, [2.1, 2]),
    ]
    got = [e.trial.number for e in rank(es)]
    # front {2, 3, 4, 6}: the ends (2, 4) first, then the less crowded of 3 and 6; then 1;
    # infeasible last, the smaller violation first
    assert got[:2] == [2, 4] and set(got[2:4]) == {3, 6} and got[4:] == [1, 5, 0]


def test_rank_breaks_a_tie_of_the_front_ends_by_the_first_objective():
    """The two ends of a front both have infinite crowding distance: the one best in the
    first-listed objective ranks first, whatever the trial numbers (the lower trial number
    won before, which on the main job sent the fastest, smallest models to the top rung)."""
    fast = _entry(3, [2.99, 0.69])  # worse quality, lowest latency, lower trial number
    good = _entry(12, [2.67, 1.97])
    middle = _entry(4, [2.79, 1.62])
    assert [e.trial.number for e in rank([fast, middle, good])] == [12, 3, 4]
    assert [e.trial.number for e in rank([good, fast])] == [12, 3]
    # equal vectors: the trial number decides
    assert [e.trial.number for e in rank([_entry(9, [1, 1]), _entry(2, [1, 1])])] == [2, 9]


def _ft(
    number: int,
    values: list[float],
    rungs: list[dict[str, Any]],
    spec_hash: str | None = None,
    continue_of: int | None = None,
    rung_target: int | None = None,
) -> optuna.trial.FrozenTrial:
    sys_attrs = {}
    if continue_of is not None:
        sys_attrs = {ATTR_CONTINUE: continue_of, ATTR_RUNG: rung_target}
    t = optuna.trial.create_trial(
        values=values,
        user_attrs={
            TRIAL_ATTR: {
                "spec_hash": spec_hash or f"h{number}",
                "status": "ok",
                "values": rungs[-1]["values"],
                "violations": rungs[-1]["violations"],
                "rungs": rungs,
            }
        },
        system_attrs=sys_attrs,
    )
    t.number = number
    return t


def _rec(k: int, bpb: float, ms: float) -> dict[str, Any]:
    return {
        "rung": k,
        "steps": 10 * 4**k,
        "values": {"val_bpb": bpb, "latency_ms": ms},
        "violations": [0.0],
    }


def test_promotions_take_the_top_third_of_each_rung_by_pareto_rank():
    objs = [Objective("val_bpb", "minimize"), Objective("latency_ms", "minimize")]
    cons: list[Constraint] = []
    # rung 0: six models; on the front: 0 (best bpb) and 3 (fastest); 5 is dominated by 0
    rung0 = {
        0: (3.0, 2.0),
        1: (3.5, 2.5),
        2: (3.6, 3.0),
        3: (4.0, 0.5),
        4: (4.2, 3.0),
        5: (3.1, 2.1),
    }
    trials = [_ft(n, list(v), [_rec(0, *v)]) for n, v in rung0.items()]
    due = promotions(trials, objs, cons, n_rungs=3, eta=3)
    assert sorted((t.number, r) for t, r in due) == [(0, 1), (3, 1)]
    # a promotion of 0 exists (waiting or running): only 3 is still due
    trials.append(_ft(6, [9, 9], [_rec(0, 9.0, 9.0)], continue_of=0, rung_target=1))
    trials[-1].state = optuna.trial.TrialState.WAITING
    due = promotions(trials, objs, cons, n_rungs=3, eta=3)
    assert [(t.number, r) for t, r in due] == [(3, 1)]
    # the promotion of 0 finished at rung 1 (same model, spec hash h0); 3's too: with two
    # models at rung 1, floor(2/3) = 0 go on to rung 2
    trials[-1] = _ft(6, [2.0, 2.0], [_rec(0, 3.0, 2.0), _rec(1, 2.0, 2.0)], "h0", 0, 1)
    trials.append(_ft(7, [2.5, 0.5], [_rec(0, 4.0, 0.5), _rec(1, 2.5, 0.5)], "h3", 3, 1))
    assert promotions(trials, objs, cons, n_rungs=3, eta=3) == []
    # with eta 2 the top one of rung 1 goes on, from the trial holding its rung-1 checkpoint
    due = promotions(trials, objs, cons, n_rungs=3, eta=2)
    assert [(t.number, r) for t, r in due][0] in ((6, 2), (7, 2))
    assert all(t.number not in (0, 3) or r == 1 for t, r in due)


# -- a laddered search -------------------------------------------------------------------------
def _ladder_spec(tmp_path: Path, trials: int = 6, **fid: Any) -> Path:
    data = yaml.safe_load(TINY.read_text())
    data["train"].update(steps=16, warmup_steps=1)
    data["search"].update(
        budget={"trials": trials},
        sampler="random",
        fidelity={"kind": "ladder", "rungs": [4, 8, 16], "eta": 2, **fid},
    )
    p = tmp_path / "tiny.yaml"
    p.write_text(yaml.safe_dump(data, sort_keys=False))
    return p


def _trials(run: Path) -> list[optuna.trial.FrozenTrial]:
    st = open_storage(None, run / "study.journal")
    return optuna.load_study(study_name="tiny", storage=st).trials


def test_a_laddered_search_records_every_rung_and_reports_the_top_one(tmp_path):
    spec = _ladder_spec(tmp_path)
    run = tmp_path / "run"
    r = run_cli(["search", str(spec), "--out", str(run), "--no-export"], cwd=tmp_path)
    assert r.rc == 0, r.err
    trials = _trials(run)
    drawn = [t for t in trials if ATTR_CONTINUE not in t.system_attrs]
    promoted = [t for t in trials if ATTR_CONTINUE in t.system_attrs]
    distinct = {
        trial_attrs(t)["spec_hash"] for t in drawn if not trial_attrs(t).get("duplicate_of")
    }
    assert len(distinct) == 6  # the budget counts models drawn, not promotions
    assert promoted, "nothing was promoted"
    for t in promoted:
        a = trial_attrs(t)
        src = trials[a["continue_of"]]
        assert t.params == src.params
        assert a["spec_hash"] == trial_attrs(src)["spec_hash"]
        # the rungs below come from the trial it continues; one new rung on top
        assert a["rungs"][:-1] == trial_attrs(src)["rungs"]
        assert a["rung"] == len(trial_attrs(src)["rungs"])
        assert (
            "continues from the checkpoint of trial"
            in (run / "trials" / str(t.number) / "log").read_text()
        )
        # learning curves: one intermediate value per rung, at its steps
        assert sorted(t.intermediate_values) == [rec["steps"] for rec in a["rungs"]]
    study = optuna.load_study(study_name="tiny", storage=open_storage(None, run / "study.journal"))
    assert study.metric_names == ["val_bpb", "params"]
    doc = json.loads((run / "pareto.json").read_text())
    fid = doc["fidelity"]
    assert fid["kind"] == "ladder" and fid["rungs"] == [4, 8, 16]
    assert fid["models_per_rung"][0] == 6 and fid["models_per_rung"][-1] >= 1
    top = fid["rung"]
    assert doc["front"] and all(
        row["steps"] == fid["steps"] == [4, 8, 16][top] for row in doc["front"]
    )
    for row in doc["front"]:
        assert row["rung"] == top and row["noise"]["val_bpb_se"] > 0
        assert row["objectives"]["val_bpb"] == row["rungs"][-1]["val_bpb"]
    # the checkpoints went with the search; the front's weights stay
    assert not list(run.glob("trials/*/ladder"))
    for row in doc["front"]:
        assert (run / "trials" / str(row["trial"]) / "model.safetensors").is_file()


def test_rungs_that_do_not_grow_are_a_located_spec_error(tmp_path):
    spec = _ladder_spec(tmp_path, rungs=[8, 4])
    r = run_cli(["search", str(spec), "--out", str(tmp_path / "run")], cwd=tmp_path)
    assert_refused(r, contains="rungs must grow")
    assert "search.fidelity.rungs" in r.err


def test_resume_with_other_rungs_is_refused(tmp_path):
    spec = _ladder_spec(tmp_path, trials=2)
    run = tmp_path / "run"
    assert run_cli(["search", str(spec), "--out", str(run), "--no-export"], cwd=tmp_path).rc == 0
    spec = _ladder_spec(tmp_path, trials=2, rungs=[4, 16])
    r = run_cli(["search", str(spec), "--out", str(run), "--no-export"], cwd=tmp_path)
    assert_refused(r, contains="rungs [4, 8, 16] -> [4, 16]")


@pytest.mark.heavy
def test_a_promotion_killed_with_kill_9_resumes_from_its_checkpoint(tmp_path):
    """kill -9 while a promotion trains; the same command again retries it from the
    checkpoint it had (no rung is trained twice or lost) and finishes the ladder."""
    import os
    import signal
    import subprocess
    import sys
    import time

    spec = _ladder_spec(tmp_path, trials=3, rungs=[20, 600], eta=2)
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "archir.cli", "search", str(spec), "--out", str(run)]
    cmd.append("--no-export")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    victim = None
    deadline = time.time() + 180
    while victim is None and time.time() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"the search ended before a promotion: {proc.stderr.read()[-2000:]!r}")
        for d in run.glob("trials/*"):
            # a promotion on its way from rung 0 to rung 1: a checkpoint past rung 0's 20
            # steps (one every 200 steps) and not ended (no metrics.json)
            man = d / "ladder" / "checkpoint.json"
            try:
                step = json.loads(man.read_text())["step"] if man.exists() else 0
            except (OSError, ValueError):
                step = 0  # being replaced
            if step > 20 and not (d / "metrics.json").exists():
                victim = int(d.name)
        time.sleep(0.01)
    assert victim is not None, "no promotion started"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"trial {victim} was left running by a killed process" in done.stdout
    trials = _trials(run)
    killed = trials[victim]
    assert killed.state == optuna.trial.TrialState.FAIL
    (retry,) = [t for t in trials if t.system_attrs.get("failed_trial") == victim]
    assert retry.state == optuna.trial.TrialState.COMPLETE
    assert retry.system_attrs[ATTR_CONTINUE] == killed.system_attrs[ATTR_CONTINUE]
    log = (run / "trials" / str(retry.number) / "log").read_text()
    assert f"continues from the checkpoint of trial {victim}" in log
    a = trial_attrs(retry)
    src = trials[a["continue_of"]]
    # it went on from the killed attempt's last checkpoint (step 200, 400 or 480), not rung 0's
    import re

    m = re.search(rf"continues from the checkpoint of trial {victim} \(step (\d+)\)", log)
    assert m and int(m.group(1)) in (200, 400, 480), log
    assert a["rung"] == 1 and a["rungs"][:1] == trial_attrs(src)["rungs"]
    assert all(t.state != optuna.trial.TrialState.RUNNING for t in trials)
    # that model reached rung 1 once: the killed attempt and its retry, nothing else
    same = [
        t
        for t in trials
        if t.system_attrs.get(ATTR_CONTINUE) == a["continue_of"]
        and t.state == optuna.trial.TrialState.COMPLETE
    ]
    assert [t.number for t in same] == [retry.number]


@pytest.mark.heavy
def test_two_workers_share_one_ladder(tmp_path):
    spec = _ladder_spec(tmp_path, trials=8)
    run = tmp_path / "run"
    r = run_cli(
        ["search", str(spec), "--out", str(run), "--no-export", "--workers", "2"], cwd=tmp_path
    )
    assert r.rc == 0, r.err
    trials = _trials(run)
    # a worker that lost the race for the last model stops its trial unrun (OVER_BUDGET)
    assert all(
        t.state == optuna.trial.TrialState.COMPLETE or trial_attrs(t)["status"] == OVER_BUDGET
        for t in trials
    )
    promoted = [t for t in trials if ATTR_CONTINUE in t.system_attrs]
    keys = [(t.system_attrs[ATTR_CONTINUE], t.system_attrs[ATTR_RUNG]) for t in promoted]
    trained = [t for t in promoted if trial_attrs(t).get("duplicate_of") is None]
    assert len(
        {(t.system_attrs[ATTR_CONTINUE], t.system_attrs[ATTR_RUNG]) for t in trained}
    ) == len(trained), keys  # no promotion trained twice
    doc = json.loads((run / "pareto.json").read_text())
    per_rung = doc["fidelity"]["models_per_rung"]
    assert per_rung[0] == 8 and per_rung[0] >= per_rung[1] >= per_rung[2] >= 1
    # successive halving is complete: each rung holds at least floor(n / eta) of the one below
    assert all(b >= a // 2 for a, b in zip(per_rung, per_rung[1:]))


def test_steps_flag_on_a_ladder_is_refused_and_fidelity_flag_picks_one(tmp_path):
    spec = _ladder_spec(tmp_path, trials=2)
    r = run_cli(["search", str(spec), "--out", str(tmp_path / "a"), "--steps", "40"], cwd=tmp_path)
    assert_refused(r, contains="its budget is its rungs")
    assert not (tmp_path / "a").exists()
    # --fidelity ladder on a proxy spec: default rungs train.steps / 16, / 4, train.steps
    data = yaml.safe_load(TINY.read_text())
    data["train"].update(steps=32, warmup_steps=1)
    data["search"]["budget"] = {"trials": 3}
    p = tmp_path / "proxy.yaml"
    p.write_text(yaml.safe_dump(data, sort_keys=False))
    run = tmp_path / "b"
    r = run_cli(
        ["search", str(p), "--out", str(run), "--fidelity", "ladder", "--no-export"], cwd=tmp_path
    )
    assert r.rc == 0, r.err
    assert json.loads((run / "pareto.json").read_text())["fidelity"]["rungs"] == [2, 8, 32]


def test_a_study_made_before_the_new_train_settings_resumes():
    from searchers.config import fidelity_changes

    new = {"kind": "proxy", "train": TrainSection(steps=40).model_dump(mode="json")}
    new["train"].pop("threads")
    old = {"kind": "proxy", "train": dict(new["train"])}
    for k in ("schedule", "decay_fraction", "eval_batch_size"):
        del old["train"][k]
    assert fidelity_changes(old, new) == []
    new["train"]["schedule"] = "wsd"
    assert fidelity_changes(old, new) == ["train.schedule 'cosine' -> 'wsd'"]


def test_a_rung_never_takes_more_than_its_share():
    """Successive halving's counts: rung 1 holds at most floor(n_0 / eta) models, however the
    ranking of rung 0 shifts as models arrive (ASHA alone would promote every model that is
    momentarily in the top third)."""
    objs = [Objective("val_bpb", "minimize"), Objective("latency_ms", "minimize")]
    trials = [
        _ft(n, [3.0 + n / 10, 5.0 - n / 10], [_rec(0, 3.0 + n / 10, 5.0 - n / 10)])
        for n in range(6)
    ]
    due = promotions(trials, objs, [], n_rungs=3, eta=3)
    assert len(due) == 2
    for i, (t, r) in enumerate(due):  # both promoted (waiting)
        p = _ft(10 + i, [9, 9], [_rec(0, 9, 9)], continue_of=t.number, rung_target=r)
        p.state = optuna.trial.TrialState.WAITING
        trials.append(p)
    # a new model better than all on both objectives: rung 1's share (floor(7/3) = 2) is taken
    trials.append(_ft(6, [1.0, 1.0], [_rec(0, 1.0, 1.0)]))
    assert promotions(trials, objs, [], n_rungs=3, eta=3) == []
    # two more models: the share grows to 3, and the best one not promoted yet goes on
    trials += [_ft(n, [4.0, 6.0], [_rec(0, 4.0 + n, 6.0)]) for n in (7, 8)]
    assert [(t.number, r) for t, r in promotions(trials, objs, [], n_rungs=3, eta=3)] == [(6, 1)]


@pytest.mark.heavy
def test_a_promotion_queued_twice_is_trained_once(tmp_path):
    """Two workers may queue the same promotion at once; the second one to run reuses the
    first's model (``duplicate_of``) and trains nothing."""
    from searchers.run import enqueue_promotion

    spec = _ladder_spec(tmp_path, trials=3)
    run = tmp_path / "run"
    assert run_cli(["search", str(spec), "--out", str(run), "--no-export"], cwd=tmp_path).rc == 0
    st = open_storage(None, run / "study.journal")
    study = optuna.load_study(study_name="tiny", storage=st)
    stopped = [
        t
        for t in study.trials
        if ATTR_CONTINUE not in t.system_attrs
        and len(trial_attrs(t).get("rungs", [])) == 1
        and not trial_attrs(t).get("duplicate_of")
        and not any(u.system_attrs.get(ATTR_CONTINUE) == t.number for u in study.trials)
    ]
    assert stopped
    src = stopped[0]
    enqueue_promotion(study, src, 1)
    enqueue_promotion(study, src, 1)
    r = run_cli(["search", str(spec), "--out", str(run), "--no-export"], cwd=tmp_path)
    assert r.rc == 0, r.err
    twins = [t for t in _trials(run) if t.system_attrs.get(ATTR_CONTINUE) == src.number]
    assert [t.state for t in twins] == [optuna.trial.TrialState.COMPLETE] * 2
    first, second = twins
    assert trial_attrs(first)["rung"] == 1 and not trial_attrs(first).get("duplicate_of")
    assert trial_attrs(second)["duplicate_of"] == src.number
    assert "already promotes" in (run / "trials" / str(second.number) / "log").read_text()
