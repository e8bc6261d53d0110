"""Search end to end: space -> Optuna, constraints, outputs, resume after kill -9, workers."""

from __future__ import annotations

import json
import math
import os
import random
import signal
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

import optuna
import pytest
import torch
import yaml

from archir.errors import SearchError
from archir.quant import quantize_model, quantize_tensor
from archir.spec import load_spec
from searchers.objectives import parse_constraint, trial_attrs
from searchers.run import run_search

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "specs" / "search" / "tiny.yaml"


def make_spec(tmp_path: Path, name: str = "tiny", **search) -> Path:
    data = yaml.safe_load(TINY.read_text())
    data["name"] = name
    for k, v in search.items():
        data["search"][k] = v
    p = tmp_path / f"{name}.yaml"
    p.write_text(yaml.safe_dump(data, sort_keys=False))
    return p


def study_of(run: Path, name: str = "tiny") -> optuna.Study:
    from searchers.run import open_storage

    return optuna.load_study(study_name=name, storage=open_storage(None, run / "study.journal"))


# -- quantization ------------------------------------------------------------------------
def test_quantize_tensor_levels():
    w = torch.randn(6, 40)
    for bits, levels in ((8, 255), (4, 15), (2, 3)):
        q = quantize_tensor(w, bits)
        assert q.shape == w.shape
        for row in q:
            assert len(torch.unique(row)) <= levels
        # per-channel symmetric: the largest magnitude of each row is kept
        assert torch.allclose(q.abs().amax(1), w.abs().amax(1), rtol=1e-5)
    t = quantize_tensor(w, 1.58)
    gamma = w.abs().mean()
    assert set(torch.unique((t / gamma).round()).tolist()) <= {-1.0, 0.0, 1.0}
    b = quantize_tensor(w, 1)
    assert torch.allclose(b.abs(), w.abs().mean(1, keepdim=True).expand_as(w))
    assert torch.equal(torch.sign(b), torch.where(w >= 0, 1.0, -1.0))
    assert quantize_tensor(w, 16) is w
    with pytest.raises(ValueError):
        quantize_tensor(w, 3)


def test_quantize_model_only_low_bit_blocks():
    import archir

    spec = load_spec(TINY).fix(
        {
            "model.d_model": 16,
            "model.layers.0.repeat": 1,
            "model.layers.0.blocks.0": 0,
            "model.layers.0.blocks.0.choice.0.n_heads": 2,
            "model.layers.0.blocks.1.bits": 4,
        }
    )
    model = archir.compile(spec)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    info = quantize_model(model)
    assert info["quantized"] == {"layers.0.blocks.1": 4.0}
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.startswith("blocks.1.fn.") for k in changed)


# -- objectives / constraints -------------------------------------------------------------
def test_parse_constraint():
    c = parse_constraint("params", "<= 2e6")
    assert (c.op, c.bound) == ("<=", 2e6) and c.ok(2e6) and not c.ok(2e6 + 1)
    assert c.violation(3e6) == pytest.approx(1e6)
    assert parse_constraint("params", "< 2M").bound == 2e6
    assert parse_constraint("accuracy", ">= 0.9").violation(0.8) == pytest.approx(0.1)
    for bad in ("2e6", "<== 3", "<= lots", "", 5):
        with pytest.raises(SearchError, match="malformed constraint"):
            parse_constraint("params", bad)


# -- cost-fidelity searches (no training) -------------------------------------------------
def test_cost_search_outputs_and_front_compiles(tmp_path):
    import archir

    spec = make_spec(
        tmp_path,
        objectives={"params": "minimize", "flops_per_token": "minimize"},
        constraints={"weight_bytes": "<= 60000"},
        fidelity="cost",
        budget={"trials": 12},
    )
    run = tmp_path / "run"
    res = run_search(spec, out=run, say=lambda s: None)
    assert res.n_trials >= 12
    for f in ("spec.yaml", "study.journal", "pareto.json", "pareto.png", "run.json"):
        assert (run / f).is_file(), f
    doc = json.loads((run / "pareto.json").read_text())
    assert doc["front"]
    for row in doc["front"]:
        assert set(row["objectives"]) == {"params", "flops_per_token"}
        assert row["constraints"]["weight_bytes"]["ok"]
        concrete = load_spec(run / row["spec"])  # validates on its own
        assert concrete.is_concrete
        model = archir.compile(concrete)
        assert sum(p.numel() for p in model.parameters()) == row["values"]["params"]
    assert (run / "best" / "spec.yaml").is_file()
    assert json.loads((run / "best" / "report.json").read_text())["trial"] == doc["best"]
    for n in range(res.n_trials):
        assert (run / "trials" / str(n) / "metrics.json").is_file()
        assert (run / "trials" / str(n) / "log").is_file()


def test_infeasible_recorded_before_training(tmp_path):
    spec = make_spec(
        tmp_path,
        objectives={"params": "minimize"},
        constraints={"params": "<= 12000"},
        fidelity="cost",
        budget={"trials": 10},
        sampler="tpe",
    )
    run = tmp_path / "run"
    run_search(spec, out=run, say=lambda s: None)
    doc = json.loads((run / "pareto.json").read_text())
    bad = [t for t in doc["trials"] if t["status"] == "infeasible"]
    good = [t for t in doc["trials"] if t["status"] == "ok"]
    assert bad and good
    for t in bad:
        # COMPLETE with its cost values, so the sampler's constraints_func sees it
        assert "params <= 12000" in t["reason"] and t["state"] == "COMPLETE"
        assert t["values"]["params"] > 12000 and not t["constraints"]["params"]["ok"]
        m = json.loads((run / "trials" / str(t["trial"]) / "metrics.json").read_text())
        assert m["status"] == "infeasible" and "train" not in m
    assert all(t["values"]["params"] <= 12000 for t in doc["front"])
    front = {r["trial"] for r in doc["front"]}
    assert not front & {t["trial"] for t in bad}
    by_number = {t.number: t for t in study_of(run).trials}
    for t in bad:
        ot = by_number[t["trial"]]
        assert ot.values == [t["values"]["params"]]  # the real cost, no penalty needed
        assert trial_attrs(ot)["violations"] == [pytest.approx(t["values"]["params"] - 12000)]
        # the samplers see it as infeasible through Optuna's constraint values
        assert ot.constraints["params"] == pytest.approx(t["values"]["params"] - 12000)


def test_rejected_candidate_gets_a_penalty_for_quality(tmp_path):
    spec = make_spec(
        tmp_path,
        objectives={"val_bpb": "minimize"},
        constraints={"params": "<= 14000"},
        budget={"trials": 5},
        fidelity={"kind": "proxy", "steps": 2},
        pruner="none",
        sampler="random",
        seed=1,
    )
    run = tmp_path / "run"
    run_search(spec, out=run, export=False, say=lambda s: None)
    trials = sorted(study_of(run).trials, key=lambda t: t.number)
    bad = [t for t in trials if trial_attrs(t).get("status") == "infeasible"]
    assert bad and any(trial_attrs(t).get("status") == "ok" for t in trials)
    for t in bad:
        assert t.state == optuna.trial.TrialState.COMPLETE
        assert trial_attrs(t)["penalized"] == ["val_bpb"]
        assert "val_bpb" not in trial_attrs(t)["values"]  # reports show measured values only
        trained = [
            trial_attrs(u)["values"]["val_bpb"]
            for u in trials
            if u.number < t.number and "val_bpb" in trial_attrs(u).get("values", {})
        ]
        assert t.values[0] == (max(trained) if trained else math.inf)
    doc = json.loads((run / "pareto.json").read_text())
    assert all(r["objectives"]["val_bpb"] is not None for r in doc["front"])


def test_search_option_errors_are_readable(tmp_path, capsys):
    from archir.cli import main

    cases = [
        (["--workers", "0"], "--workers (search.workers)", "got 0"),
        (["--steps", "-1"], "--steps (search.fidelity.steps)", "got -1"),
        (["--timeout", "-3"], "--timeout (search.budget.timeout_s)", "got -3.0"),
        (["--trials", "0"], "--trials (search.budget.trials)", "got 0"),
        (["--trials", "-2"], "--trials (search.budget.trials)", "got -2"),
        (["--relax", "gumbel"], "--relax applies to the one-shot searchers only", ""),
        (["--supernet-steps", "3"], "--supernet-steps applies to the one-shot", ""),
        (["--searcher", "darts", "--sampler", "tpe"], "--sampler does not apply", ""),
        (["--searcher", "darts", "--workers", "2", "--sampler", "tpe"], "--sampler", "--workers"),
        (["--searcher", "spos", "--relax", "gumbel"], "--relax applies to --searcher darts", ""),
    ]
    for extra, want, got in cases:
        out = tmp_path / "run"
        rc = main(["search", str(TINY), "--out", str(out), *extra])
        err = capsys.readouterr().err
        assert rc == 2, (extra, err)
        assert want in err and got in err, (extra, err)
        assert "errors.pydantic.dev" not in err
        assert not out.exists()


def test_spec_hash_is_canonical_and_covers_training():
    import copy

    from archir.spec import spec_from_dict
    from searchers.space import spec_hash

    # archir's own YAML reading (YAML 1.2 numbers: ``lr: 2e-3`` is a float, not a string)
    base = copy.deepcopy(load_spec(ROOT / "specs" / "zoo" / "transformer.yaml").data)
    a = spec_from_dict(base)
    renamed = {**base, "name": "other-name", "description": "written differently"}
    b = spec_from_dict(renamed)
    assert spec_hash(a) == spec_hash(b)
    layers = base["model"]["layers"]
    n = layers[0]["repeat"]
    assert len(layers) == 1 and n > 1
    g = {k: v for k, v in layers[0].items() if k != "repeat"}
    unrolled = {**base, "model": {**base["model"], "layers": [g] * n}}  # repeat: n == n groups
    assert spec_hash(spec_from_dict(unrolled)) == spec_hash(a)
    trained_longer = {**base, "train": {**(base.get("train") or {}), "steps": 12345}}
    assert spec_hash(spec_from_dict(trained_longer)) != spec_hash(a)
    wider = {**base, "model": {**base["model"], "d_model": base["model"]["d_model"] * 2}}
    assert spec_hash(spec_from_dict(wider)) != spec_hash(a)


def test_spec_hash_of_a_mad_task_holds_its_data_version(monkeypatch):
    """A resumed MAD study does not reuse results scored with another data version."""
    import copy

    import archir.tasks.mad as mad
    from archir.spec import spec_from_dict
    from searchers.space import spec_hash

    base = copy.deepcopy(load_spec(ROOT / "specs" / "zoo" / "transformer.yaml").data)
    base["train"] = {**base["train"], "task": "mad:in_context_recall"}
    spec = spec_from_dict(base)
    now = spec_hash(spec)
    monkeypatch.setattr(mad, "DATA_VERSION", mad.DATA_VERSION - 1)
    assert spec_hash(spec) != now
    text = spec_from_dict({**base, "train": {**base["train"], "task": "text:pydoc"}})
    h = spec_hash(text)
    monkeypatch.setattr(mad, "DATA_VERSION", mad.DATA_VERSION + 1)
    assert spec_hash(text) == h  # other tasks' hashes do not move


def test_a_trial_record_is_one_user_attribute_write(tmp_path, monkeypatch):
    """What archir records about a trial is one user attribute (one storage write: RDB
    storages cannot group writes), read back through ``trial_attrs``; the journal still
    takes three appends (fsyncs) per trial."""
    from searchers.objectives import TRIAL_ATTR
    from searchers.storage import HeartbeatJournalStorage

    writes: list[str] = []
    real = HeartbeatJournalStorage.set_trial_user_attr

    def counting(self, trial_id, key, value):
        writes.append(key)
        return real(self, trial_id, key, value)

    monkeypatch.setattr(HeartbeatJournalStorage, "set_trial_user_attr", counting)
    fsyncs = [0]
    real_fsync = os.fsync

    def counting_fsync(fd):
        fsyncs[0] += 1
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", counting_fsync)
    spec = make_spec(
        tmp_path,
        objectives={"params": "minimize"},
        constraints={"params": "<= 30000"},
        fidelity="cost",
        budget={"trials": 8},
    )
    run = tmp_path / "run"
    res = run_search(spec, out=run, export=False, say=lambda s: None)
    n = res.n_trials
    assert writes == [TRIAL_ATTR] * n  # cost fidelity: model and result in one write
    assert fsyncs[0] <= 3 * n + 12  # + the study's creation and its attributes
    for t in study_of(run).trials:
        assert set(t.user_attrs) == {TRIAL_ATTR}
        a = trial_attrs(t)
        assert a["spec"] == f"trials/{t.number}/spec.yaml" and a["spec_hash"]
        assert a["status"] in ("ok", "infeasible") and "params" in a["values"]


def _legacy_copy(src: Path, dst: Path, name: str = "tiny") -> int:
    """A copy of run folder ``src`` whose journal holds what an earlier archir wrote: a user
    attribute per key (``spec``, ``spec_hash``, ``status``, ``values`` ...)."""
    import shutil

    from searchers.objectives import TRIAL_ATTR
    from searchers.run import open_storage

    shutil.copytree(src, dst)
    (dst / "study.journal").unlink()
    old = study_of(src, name)
    st = open_storage(None, dst / "study.journal")
    new = optuna.create_study(storage=st, study_name=name, directions=old.directions)
    for k, v in old.user_attrs.items():
        new.set_user_attr(k, v)
    for t in old.get_trials(deepcopy=False):
        flat = {k: v for k, v in t.user_attrs.items() if k != TRIAL_ATTR}
        flat.update(t.user_attrs.get(TRIAL_ATTR, {}))
        new.add_trial(
            optuna.trial.create_trial(
                state=t.state,
                values=t.values,
                params=t.params,
                distributions=t.distributions,
                user_attrs=flat,
                system_attrs=t.system_attrs,
            )
        )
    return len(old.trials)


def test_studies_of_earlier_versions_load_resume_and_report(tmp_path):
    """A study whose trials hold a user attribute per key (archir before the one-record
    layout) resumes: its trials count against the budget, are found as duplicates, and the
    report and best/ come from them."""
    from searchers.objectives import TRIAL_ATTR
    from searchers.run import budget_used, distinct_models

    spec = make_spec(
        tmp_path,
        objectives={"params": "minimize", "flops_per_token": "minimize"},
        constraints={"params": "<= 30000"},
        fidelity="cost",
        budget={"trials": 6},
    )
    run_search(spec, out=tmp_path / "new", export=False, say=lambda s: None)
    n_old = _legacy_copy(tmp_path / "new", tmp_path / "old")
    legacy = study_of(tmp_path / "old").trials
    assert not any(TRIAL_ATTR in t.user_attrs for t in legacy)
    assert budget_used(legacy) == 6
    assert distinct_models(legacy) == distinct_models(study_of(tmp_path / "new").trials)
    said: list[str] = []
    res = run_search(spec, out=tmp_path / "old", trials=9, export=False, say=said.append)
    assert any("(6 done, resuming)" in s for s in said), said
    trials = study_of(tmp_path / "old").trials
    assert res.n_trials >= 9 and len(trials) > n_old
    assert budget_used(trials) == 9
    doc = json.loads((tmp_path / "old" / "pareto.json").read_text())
    assert doc["front"] and all(r["status"] == "ok" for r in doc["front"])
    assert (tmp_path / "old" / "best" / "spec.yaml").is_file()
    for t in trials:  # both layouts read the same way
        a = trial_attrs(t)
        assert a["spec_hash"] and a["status"] in ("ok", "infeasible") and a["values"]


def test_a_trial_that_loses_the_race_for_the_last_model_stops_unrun(tmp_path):
    """Two workers that both saw one model left each create a trial; the one numbered
    higher stops unrun (PRUNED, status ``over budget``, not counted), so the study holds
    exactly ``--trials`` drawn models — a two-worker ladder once drew nine of eight."""
    from dataclasses import replace

    from searchers.base import get_searcher
    from searchers.run import OVER_BUDGET, Evaluator, TrialFailed, budget_used, open_storage
    from searchers.setup import prepare_run

    spec = make_spec(
        tmp_path, objectives={"params": "minimize"}, fidelity="cost", budget={"trials": 3}
    )
    run = tmp_path / "run"
    run_search(spec, out=run, trials=2, export=False, say=lambda s: None)
    plan = prepare_run(spec, get_searcher("optuna")(), out=run, trials=3, say=lambda s: None)
    cfg = replace(plan.cfg, workers=2)
    study = optuna.load_study(study_name="tiny", storage=open_storage(None, run / "study.journal"))
    other = study.ask()  # another worker's trial, begun first: it holds the third model
    study.optimize(Evaluator(cfg, load_spec(spec)), n_trials=1, catch=(TrialFailed,))
    late = study.trials[-1]
    assert late.number == other.number + 1
    assert late.state == optuna.trial.TrialState.PRUNED and not late.params
    a = trial_attrs(late)
    assert a["status"] == OVER_BUDGET
    assert f"trial {other.number} running" in a["reason"] and "nothing was drawn" in a["reason"]
    metrics = json.loads((run / "trials" / str(late.number) / "metrics.json").read_text())
    assert metrics["status"] == OVER_BUDGET
    assert budget_used(study.trials) == 2
    # the other worker's trial ends without counting (interrupted): the next trial is
    # drawn and evaluated as usual
    other.set_user_attr("status", "interrupted")
    study.tell(other, state=optuna.trial.TrialState.FAIL)
    study.optimize(Evaluator(cfg, load_spec(spec)), n_trials=1, catch=(TrialFailed,))
    assert trial_attrs(study.trials[-1])["status"] in ("ok", "infeasible")


def test_trial_attrs_reads_both_layouts_and_killed_trials():
    from optuna.distributions import IntDistribution
    from optuna.trial import TrialState, create_trial

    from searchers.objectives import TRIAL_ATTR

    def frozen(state, **user):
        return create_trial(
            state=state,
            value=None if state != TrialState.COMPLETE else 1.0,
            params={"x": 1},
            distributions={"x": IntDistribution(0, 9)},
            user_attrs=user,
        )

    model = {"spec": "trials/3/spec.yaml", "spec_hash": "h", "spec_yaml": "y"}
    old = frozen(TrialState.COMPLETE, spec_hash="h", status="ok", values={"params": 1.0})
    assert trial_attrs(old) == {"spec_hash": "h", "status": "ok", "values": {"params": 1.0}}
    rec = {**model, "status": "ok", "values": {"params": 2.0}}
    new = frozen(TrialState.COMPLETE, searcher="darts", **{TRIAL_ATTR: rec})
    assert trial_attrs(new) == {**rec, "searcher": "darts"}
    # a retry of a killed trial starts with its original's separate status/reason: the
    # retry's own record replaces them all
    retry = frozen(
        TrialState.COMPLETE,
        status="failed",
        reason="its process died",
        penalized=["val_bpb"],
        **{TRIAL_ATTR: rec},
    )
    assert trial_attrs(retry) == rec
    # killed after its record was written, before its state: the kill's status/reason win
    killed = frozen(TrialState.FAIL, status="failed", reason="killed", **{TRIAL_ATTR: rec})
    assert trial_attrs(killed)["status"] == "failed"
    assert trial_attrs(killed)["reason"] == "killed"
    # a trial that failed by itself after a killed original: its own reason
    own = {**model, "status": "failed", "reason": "diverged"}
    failed = frozen(TrialState.FAIL, status="failed", reason="killed", **{TRIAL_ATTR: own})
    assert trial_attrs(failed)["reason"] == "diverged"
    # only the model recorded yet (a killed trial): the separate status/reason show
    running = frozen(TrialState.FAIL, status="failed", reason="killed", **{TRIAL_ATTR: model})
    assert trial_attrs(running) == {**model, "status": "failed", "reason": "killed"}


@pytest.mark.filterwarnings("ignore:Heartbeat")
def test_grouped_journal_writes_are_one_append_and_replay(tmp_path):
    from searchers.storage import open_storage

    st = open_storage(None, tmp_path / "j.journal")
    study = optuna.create_study(storage=st, study_name="g")
    trial = study.ask()
    before = st.appends
    with st.grouped():
        for i in range(10):
            trial.suggest_int(f"p{i}", 0, 9)
        trial.set_user_attr("a", 1)
        trial.set_user_attr("b", [1, 2])
    assert st.appends == before + 1
    study.tell(trial, 1.0)
    # a fresh reader (another process) sees every grouped write
    t = study_of_path(tmp_path / "j.journal", "g").trials[0]
    assert len(t.params) == 10 and t.user_attrs == {"a": 1, "b": [1, 2]}


def test_stale_latency_calibration_is_measured_around_or_refused(tmp_path, monkeypatch):
    from types import SimpleNamespace

    from exporters.latency.calibrate import (
        FORMAT,
        VERSION,
        default_path,
        draw_from_space,
        machine_key,
    )
    from searchers.latency import check_available, trial_latency

    monkeypatch.setenv("ARCHIR_CACHE", str(tmp_path / "cache"))
    stale = default_path("ort", 1)  # a file from an older archir: format version - 1
    stale.parent.mkdir(parents=True)
    stale.write_text(json.dumps({"format": FORMAT, "version": VERSION - 1, "key": machine_key()}))
    lat = SimpleNamespace(
        predict=None, runtime="ort", threads=1, batch=1, seq_len=16, warmup=1, repeats=3
    )
    concrete = draw_from_space(load_spec(make_spec(tmp_path)), random.Random(0))
    rec = trial_latency(concrete, lat, 16)  # predicting is not possible: measured instead
    assert rec["predicted"] is False and rec["ms"] > 0 and rec["runs"] == 3
    check_available(lat)  # predict: null never refuses
    lat.predict = True
    with pytest.raises(SearchError, match="cannot be used.*version") as e:
        check_available(lat)
    assert "archir latency calibrate" in str(e.value)


def study_of_path(path: Path, name: str) -> optuna.Study:
    from searchers.storage import open_storage

    return optuna.load_study(study_name=name, storage=open_storage(None, path))


def test_latency_objective_uses_exporters_and_front_is_remeasured(tmp_path, monkeypatch):
    import exporters.latency as xl

    monkeypatch.setenv("ARCHIR_CACHE", str(tmp_path / "cache"))  # no calibration here
    calls: list[dict] = []
    real = xl.latency_ms

    def spy(spec, *a, **kw):
        calls.append(kw)
        return real(spec, *a, **kw)

    monkeypatch.setattr(xl, "latency_ms", spy)
    import exporters.latency.harness as xh
    from exporters.latency.harness import INTERLEAVED_ROUNDS

    interleaved: list[int] = []
    probed: list[bool] = []
    real_inter = xh.measure_interleaved

    def spy_inter(fns, **kw):
        interleaved.append(len(fns))
        probed.append(kw.get("probe") is not None)
        return real_inter(fns, **kw)

    monkeypatch.setattr(xh, "measure_interleaved", spy_inter)
    spec = make_spec(
        tmp_path,
        objectives={"params": "minimize", "latency_ms": "minimize"},
        constraints={},
        fidelity="cost",
        budget={"trials": 4},
        latency={"repeats": 3, "warmup": 1},
    )
    run = tmp_path / "run"
    run_search(spec, out=run, export=False, say=lambda s: None)
    for n in range(4):
        m = json.loads((run / "trials" / str(n) / "metrics.json").read_text())
        if "duplicate_of" in m:
            continue
        rec = m["latency"]
        assert rec["predicted"] is False and rec["runs"] == 3
        assert m["values"]["latency_ms"] == rec["ms"] > 0
    doc = json.loads((run / "pareto.json").read_text())
    assert doc["front"]
    for row in doc["front"]:
        assert row["latency"]["remeasured"] and row["latency"]["predicted"] is False
        assert row["values"]["latency_ms"] == row["latency"]["ms"] == row["latency"]["min_ms"]
        # one window per round; with the speed probe, more rounds until two ran at the
        # machine's fastest speed (here: no calibration, the probe's own fastest window)
        assert INTERLEAVED_ROUNDS <= row["latency"]["windows"] <= 3 * INTERLEAVED_ROUNDS
        assert row["values"]["latency_ms_search"] > 0
    # the trial screen goes through exporters.latency.latency_ms; the front is re-measured
    # together, interleaved (members that turn out dominated after re-measurement leave the
    # front, so the number re-measured is at least the final front's size)
    assert len(interleaved) == 1 and interleaved[0] >= len(doc["front"]) and probed == [True]
    assert all(c.get("predict") is False for c in calls)

    bad = make_spec(
        tmp_path,
        name="needs-cal",
        fidelity="cost",
        latency={"predict": True},
        objectives={"latency_ms": "minimize"},
        constraints={},
    )
    with pytest.raises(SearchError, match="no latency calibration"):
        run_search(bad, out=tmp_path / "r2", say=lambda s: None)
    assert not (tmp_path / "r2").exists()


def test_front_is_remeasured_with_its_trained_weights(tmp_path, monkeypatch):
    """The front's latency is re-measured on the model that ships: the trial's trained
    weights (a trained model can run slower than a fresh one), not a fresh compile of its
    spec; a torn weights file falls back to the initial weights and says so."""
    from safetensors.torch import load_file

    import archir
    import searchers.latency as sl

    monkeypatch.setenv("ARCHIR_CACHE", str(tmp_path / "cache"))
    seen: dict[int, dict[str, torch.Tensor]] = {}
    real = sl.remeasure_all

    def spy(specs, lat, seq, models=None):
        for k, m in (models or {}).items():
            seen[k] = {n: v.detach().clone() for n, v in m.state_dict().items()}
        return real(specs, lat, seq, models)

    monkeypatch.setattr(sl, "remeasure_all", spy)
    spec = make_spec(
        tmp_path,
        objectives={"val_bpb": "minimize", "latency_ms": "minimize"},
        constraints={},
        fidelity={"kind": "proxy", "steps": 3},
        budget={"trials": 3},
        latency={"repeats": 2, "warmup": 1},
    )
    run = tmp_path / "run"
    said: list[str] = []
    run_search(spec, out=run, export=False, say=said.append)
    doc = json.loads((run / "pareto.json").read_text())
    assert doc["front"] and seen
    for row in doc["front"]:
        n = int(row["trial"])
        assert row["latency"]["weights"] == "trained"
        src = int(row.get("duplicate_of", n))
        saved = load_file(str(run / "trials" / str(src) / "model.safetensors"))
        assert set(saved) <= set(seen[n])
        assert all(torch.equal(seen[n][k], v) for k, v in saved.items())
        fresh = archir.compile(load_spec(run / "trials" / str(n) / "spec.yaml"), seed=0)
        assert any(not torch.equal(fresh.state_dict()[k], v) for k, v in saved.items())

    # a torn weights file: re-measured at the initial weights, said, the report still made
    n = int(doc["front"][0]["trial"])
    w = run / "trials" / str(int(doc["front"][0].get("duplicate_of", n))) / "model.safetensors"
    w.write_bytes(w.read_bytes()[:100])
    seen.clear()
    said.clear()
    run_search(spec, out=run, export=False, say=said.append)
    doc = json.loads((run / "pareto.json").read_text())
    row = next(r for r in doc["front"] + doc["trials"] if int(r["trial"]) == n and "latency" in r)
    assert row["latency"]["weights"] == "initial" and n not in seen
    assert any(f"trial {n}: trained weights not loaded" in m for m in said)


def test_conditional_space_and_seed_reproduces(tmp_path):
    def proposals(seed: int, sub: str) -> list[dict]:
        spec = make_spec(
            tmp_path,
            objectives={"params": "minimize"},
            constraints={},
            fidelity="cost",
            budget={"trials": 8},
            sampler="tpe",
            seed=seed,
        )
        run_search(spec, out=tmp_path / sub, say=lambda s: None)
        return [t.params for t in study_of(tmp_path / sub).trials]

    a, b, c = proposals(3, "a"), proposals(3, "b"), proposals(4, "c")
    assert a == b and a != c
    for p in a:  # define-by-run: only the chosen mixer's parameters are suggested
        chosen = p["model.layers.0.blocks.0"]
        assert ("model.layers.0.blocks.0.choice.0.n_heads" in p) == (chosen == 0)
        assert ("model.layers.0.blocks.0.choice.1.d_state" in p) == (chosen == 1)


# -- bad input ---------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("search", "match"),
    [
        ({"objectives": {"val_bpbb": "minimize"}}, "unknown objective 'val_bpbb'"),
        ({"constraints": {"params": "at most 5"}}, "malformed constraint"),
        ({"constraints": {"parms": "<= 5"}}, "unknown constraint metric 'parms'"),
        ({"constraints": {"params": "<= 10"}}, "no candidate meets the constraints.*closest"),
        (
            {"objectives": {"val_bpb": "minimize"}, "fidelity": "cost"},
            "needs training",
        ),
    ],
)
def test_bad_search_input_leaves_nothing(tmp_path, search, match):
    spec = make_spec(tmp_path, **search)
    run = tmp_path / "run"
    with pytest.raises(SearchError, match=match):
        run_search(spec, out=run, say=lambda s: None)
    assert not run.exists()


def test_unreachable_storage(tmp_path):
    spec = make_spec(tmp_path, fidelity="cost", objectives={"params": "minimize"})
    for url in ("sqlite:////nonexistent-dir/x/y.db", "postgresql://nobody@127.0.0.1:1/none"):
        with pytest.raises(SearchError, match="cannot open storage"):
            run_search(spec, out=tmp_path / "run", storage=url, say=lambda s: None)
    assert not (tmp_path / "run").exists()


def test_study_with_different_space(tmp_path):
    db = f"sqlite:///{tmp_path / 's.db'}"
    spec = make_spec(
        tmp_path, fidelity="cost", objectives={"params": "minimize"}, budget={"trials": 2}
    )
    run_search(spec, out=tmp_path / "r1", storage=db, study="shared", say=lambda s: None)
    data = yaml.safe_load(spec.read_text())
    data["model"]["d_model"] = {"choice": [16, 48]}
    other = tmp_path / "other.yaml"
    other.write_text(yaml.safe_dump(data, sort_keys=False))
    with pytest.raises(SearchError, match="different search space"):
        run_search(other, out=tmp_path / "r2", storage=db, study="shared", say=lambda s: None)
    assert not (tmp_path / "r2").exists()


def test_concrete_spec_has_nothing_to_search(zoo):
    with pytest.raises(SearchError, match="nothing to search"):
        run_search(zoo / "transformer.yaml", say=lambda s: None)


# -- training fidelity, resume, workers ----------------------------------------------------
def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "archir.cli", *args]


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


@pytest.mark.heavy
def test_kill9_then_resume_loses_nothing(tmp_path):
    spec = make_spec(
        tmp_path,
        objectives={"val_bpb": "minimize"},
        budget={"trials": 4},
        fidelity={"kind": "proxy", "steps": 30},
        pruner="none",
        sampler="random",
    )
    run = tmp_path / "run"
    cmd = _cli("search", str(spec), "--out", str(run), "--no-export")
    proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    # trials/2/spec.yaml is written right after trial 2's parameters reach the journal and
    # before its 30 training steps: killing then leaves trial 2 RUNNING
    target = run / "trials" / "2"
    deadline = time.time() + 120
    while time.time() < deadline and not (target / "spec.yaml").exists():
        if proc.poll() is not None:
            pytest.fail(f"search ended early: {proc.stderr.read().decode()[-2000:]}")
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed = study_of(run).trials
    running = [t for t in killed if t.state == optuna.trial.TrialState.RUNNING]
    assert [t.number for t in running] == [2]
    assert running[0].params  # its parameters were written before the kill
    before = {t.number: t.values for t in killed if t.state == optuna.trial.TrialState.COMPLETE}
    assert sorted(before) == [0, 1]
    out = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stderr[-2000:]
    trials = study_of(run).trials
    done = {t.number: t.values for t in trials if t.state == optuna.trial.TrialState.COMPLETE}
    assert len(done) == 4
    for n, v in before.items():  # no completed trial lost or changed
        assert done[n] == v
    failed = [t for t in trials if t.state == optuna.trial.TrialState.FAIL]
    assert [t.number for t in failed] == [2]
    assert "killed" in trial_attrs(failed[0])["reason"]
    retries = [t for t in trials if t.system_attrs.get("failed_trial") == 2]
    assert len(retries) == 1  # retried exactly once, with the same configuration
    assert retries[0].params == running[0].params
    assert retries[0].state == optuna.trial.TrialState.COMPLETE
    assert "resuming" in out.stdout and "left running by a killed process" in out.stdout


@pytest.mark.heavy
def test_two_workers_share_a_study(tmp_path):
    spec = make_spec(
        tmp_path,
        objectives={"params": "minimize", "flops_per_token": "minimize"},
        constraints={},
        fidelity="cost",
        budget={"trials": 10},
    )
    run = tmp_path / "run"
    out = subprocess.run(
        _cli("search", str(spec), "--out", str(run), "--workers", "2"),
        env=_env(),
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    trials = study_of(run).trials
    done = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
    # the budget counts distinct models: a trial that reused an identical model's result
    # (duplicate_of) does not count; two workers may each start the last trial
    counted = [t for t in done if trial_attrs(t).get("duplicate_of") is None]
    assert 10 <= len(counted) <= 11
    by_number = {t.number: t for t in done}
    for t in done:
        dup = trial_attrs(t).get("duplicate_of")
        if dup is not None:  # reused a finished trial's result: same model, same values
            assert trial_attrs(by_number[dup])["spec_hash"] == trial_attrs(t)["spec_hash"]
            assert by_number[dup].values == t.values
            continue
        # not marked duplicate: no trial of the same model had finished when it started. A
        # trial's completion time is stamped before its record reaches the journal, so the
        # other worker sees it a few milliseconds later (CI once started trial 9 3.7 ms after
        # trial 8's stamp, before the record landed): allow the write that long
        visible = timedelta(milliseconds=50)
        for u in done:
            if u.number != t.number and trial_attrs(u)["spec_hash"] == trial_attrs(t)["spec_hash"]:
                assert u.datetime_complete + visible > t.datetime_start, (t.number, u.number)
    assert "[w0]" in out.stdout and "[w1]" in out.stdout
    for t in done:
        spec_file = run / trial_attrs(t)["spec"]
        assert load_spec(spec_file).is_concrete


def test_proxy_search_single_objective_with_bits_and_report(tmp_path):
    spec = make_spec(
        tmp_path,
        objectives={"val_bpb": "minimize"},
        constraints={"params": "<= 40000"},
        budget={"trials": 3},
        fidelity={"kind": "proxy", "steps": 2},
        sampler="random",
    )
    run = tmp_path / "run"
    res = run_search(spec, out=run, export=False, say=lambda s: None)
    assert res.best is not None and (run / "best" / "model.safetensors").is_file()
    for n in range(3):
        m = json.loads((run / "trials" / str(n) / "metrics.json").read_text())
        if m["status"] == "ok" and m.get("quantized"):
            assert "val_bpb_fp" in m["values"]
    out = subprocess.run(
        _cli("report", str(run)), env=_env(), capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0 and "Pareto front" in out.stdout and "spec.yaml" in out.stdout
    bad = subprocess.run(
        _cli("report", str(tmp_path)), env=_env(), capture_output=True, text=True, timeout=120
    )
    assert bad.returncode == 2 and "no pareto.json" in bad.stderr


def test_the_shipped_model_is_timed_on_onnxruntime_beside_the_searched_latency(tmp_path):
    """With a latency objective on the default torch screen, best/model.onnx (the file at
    its shipped precision) is timed on onnxruntime at the search's latency shape, and the
    search says both numbers."""
    pytest.importorskip("exporters")
    from searchers.latency import shipped_latency

    spec = make_spec(
        tmp_path,
        objectives={"val_bpb": "minimize", "latency_ms": "minimize"},
        constraints={},
        budget={"trials": 2},
        fidelity={"kind": "proxy", "steps": 2},
        latency={"repeats": 3, "warmup": 1, "seq_len": 16},
    )
    said: list[str] = []
    res = run_search(spec, out=tmp_path / "run", say=said.append)
    best = json.loads((tmp_path / "run" / "best" / "report.json").read_text())
    rec = best["shipped_latency"]
    assert rec["ms"] == res.best["shipped_latency"]["ms"]
    assert rec["runtime"] == "ort" and rec["clock"] == "cpu" and rec["predicted"] is False
    assert (rec["batch"], rec["seq"]) == (1, 16) and rec["ms"] > 0
    assert rec["file"].endswith("model.onnx") and rec["windows"] >= 3
    line = next(s for s in said if s.startswith("model.onnx runs in"))
    assert "on onnxruntime at its shipped precision" in line and "ranked by" in line
    assert f"{best['values']['latency_ms']:.3f} ms on torch" in line
    # a shape the model cannot take is refused by name, not by an onnxruntime error
    from archir.errors import ArchirError
    from archir.spec import load_spec as _load
    from archir.spec.sections import LatencySection

    bspec = _load(tmp_path / "run" / "best" / "spec.yaml")
    lat = LatencySection(seq_len=bspec.model.model.max_seq_len + 1)
    with pytest.raises(ArchirError, match="past max_seq_len"):
        shipped_latency(rec["file"], bspec, lat, 16)


def test_best_is_exported_with_parity(tmp_path, monkeypatch):
    """As the main job runs: the default, relative run folder (runs/<study>); weights of
    trials off the front are removed, the best's exported."""
    pytest.importorskip("exporters")
    spec = make_spec(
        tmp_path,
        objectives={"val_bpb": "minimize"},
        constraints={},
        budget={"trials": 3},
        fidelity={"kind": "proxy", "steps": 2},
    )
    monkeypatch.chdir(tmp_path)
    res = run_search(spec.name, say=lambda s: None)
    run = Path("runs") / "tiny"
    assert (run / "best" / "model.onnx").is_file(), res.best
    assert "error" not in res.best["export"]
    # the file ships at the searched bits: each swiglu block's MatMuls at its own precision
    from exporters.onnx_export import read_metadata

    meta = read_metadata(run / "best" / "model.onnx")
    assert meta["archir.precision"] == "auto"
    best_spec = yaml.safe_load((run / "best" / "spec.yaml").read_text())
    want = {16: "fp32", 8: "int8", 4: "int4"}
    plan = res.best["export"]["block_precision"]
    i = 0  # a layer repeated r times is r IR layers
    for layer in best_spec["model"]["layers"]:
        for _ in range(layer.get("repeat", 1)):
            assert plan[f"layers.{i}.blocks.1"] == want[layer["blocks"][1]["bits"]], plan
            i += 1
    # a language model also ships its decode step, parity-checked token by token
    assert (run / "best" / "decode.onnx").is_file(), res.best.get("decode_export")
    assert res.best["decode_export"]["parity"]["passed"]
    weights = sorted(p.parent.name for p in (run / "trials").glob("*/model.safetensors"))
    assert weights == [str(res.best["trial"])]


def test_searchers_have_no_import_cycles():
    """DESIGN.md §2: no import cycles, lazy (function-level) imports included."""
    import ast

    import networkx as nx

    g = nx.DiGraph()
    for p in (ROOT / "searchers").glob("*.py"):
        if p.stem == "__init__":
            continue
        name = f"searchers.{p.stem}"
        for n in ast.walk(ast.parse(p.read_text())):
            if isinstance(n, ast.ImportFrom) and (n.module or "").startswith("searchers."):
                g.add_edge(name, n.module)
    assert list(nx.simple_cycles(g)) == []
