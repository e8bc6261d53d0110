"""Hostile and careless input to ``archir search`` / ``archir report`` (issue 11, parts 1, 6, 7).

A search never touches what it did not create (names, ``--out``, clean-up, links), gives honest
outcomes (interrupted trials retried and not counted, a resumed study keeps its training
budget, duplicates do not consume the budget) and finishes from the storage when another
machine holds the best trial's weights. Refusals go through ``tests/hostile_util.py``: exit
2, one located line, no traceback.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
import yaml

from searchers.objectives import trial_attrs
from tests.hostile_util import ROOT, assert_refused, run_cli

TINY = ROOT / "specs" / "search" / "tiny.yaml"
# the refusals below are checked for time after the heavy imports (torch, optuna) are done
SEARCH_S = 20.0


@pytest.fixture(scope="module", autouse=True)
def _imported():
    """What a search imports lazily (torch, the blocks, matplotlib), imported up front so the
    time bounds of the refusals measure the refusal."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot  # noqa: F401

    import archir.blocks  # noqa: F401
    import archir.cost  # noqa: F401
    import searchers.cli_report  # noqa: F401
    import searchers.oneshot  # noqa: F401
    import searchers.run  # noqa: F401


def write_spec(where: Path, name: str = "tiny", fname: str | None = None, **search) -> Path:
    """tiny.yaml with another ``name`` and ``search:`` keys replaced."""
    data = yaml.safe_load(TINY.read_text())
    data["name"] = name
    data["search"].update(search)
    p = where / (fname or "spec.yaml")
    p.write_text(yaml.safe_dump(data, sort_keys=False))
    return p


def snapshot(d: Path, skip: str | None = None) -> dict[str, str]:
    """Every file under ``d`` (relative path -> sha256 and mode), ``skip`` subtree left out."""
    out = {}
    for p in sorted(d.rglob("*")):
        rel = p.relative_to(d).as_posix()
        if skip is not None and (rel == skip or rel.startswith(skip + "/")):
            continue
        if p.is_file() and not p.is_symlink():
            out[rel] = hashlib.sha256(p.read_bytes()).hexdigest() + oct(p.stat().st_mode)
        else:
            out[rel] = "dir" if p.is_dir() else "other"
    return out


IMPOSSIBLE = {
    "constraints": {"params": "<= 10"},
    "objectives": {"params": "minimize"},
    "fidelity": "cost",
}
COST = {"objectives": {"params": "minimize"}, "constraints": {}, "fidelity": "cost"}


# -- 1. never touch what the run did not create --------------------------------------------
@pytest.mark.parametrize("name", ["..", ".", "a/b", "../x", "", "x" * 65, "a b"])
def test_spec_name_that_is_not_a_name_leaves_the_cwd_alone(tmp_path, name):
    """A spec named ``..`` plus a failing preflight once ended in rmtree('runs/..')."""
    cwd = tmp_path / "work"
    cwd.mkdir()
    (cwd / "precious.txt").write_text("keep me")
    (cwd / "sub").mkdir()
    (cwd / "sub" / "data.bin").write_bytes(b"\0" * 10)
    spec = write_spec(tmp_path, name=name, **IMPOSSIBLE)
    before = snapshot(cwd)
    o = run_cli(["search", spec], cwd=cwd)
    assert_refused(o, max_seconds=SEARCH_S, max_mb=1000)
    assert "name" in o.err
    assert cwd.is_dir() and snapshot(cwd) == before  # nothing removed, nothing written
    assert not (cwd / "runs").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["spec.yaml", "work"]


@pytest.mark.parametrize("study", ["../x", "..", ".", "a/b", "/tmp/x", "-x", "x" * 65])
def test_study_that_is_not_a_name_is_refused(tmp_path, study):
    spec = write_spec(tmp_path, **COST)
    o = run_cli(["search", spec, f"--study={study}"], cwd=tmp_path)
    assert_refused(o, contains="--study", max_seconds=SEARCH_S, max_mb=1000)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["spec.yaml"]


def test_study_names_the_default_run_folder(tmp_path):
    """``--study`` without ``--out``: runs/<study>, so two studies never share a folder."""
    spec = write_spec(tmp_path, budget={"trials": 1}, **COST)
    for study in ("first", "second"):
        o = run_cli(["search", spec, "--study", study], cwd=tmp_path)
        assert o.rc == 0, o.err
    for study in ("first", "second"):
        doc = json.loads((tmp_path / "runs" / study / "run.json").read_text())
        assert doc["study"] == study
        assert json.loads((tmp_path / "runs" / study / "pareto.json").read_text())["study"] == study
    assert not (tmp_path / "runs" / "tiny").exists()


def test_out_at_a_file_is_refused_and_the_file_kept(tmp_path):
    spec = write_spec(tmp_path, **COST)
    f = tmp_path / "notes.txt"
    f.write_text("mine")
    for out in (f, f / "below"):
        o = run_cli(["search", spec, "--out", out], cwd=tmp_path)
        assert_refused(o, contains="--out", max_seconds=SEARCH_S, max_mb=1000)
    assert f.read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt", "spec.yaml"]


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes anywhere")
def test_out_unwritable_is_refused_before_any_work(tmp_path):
    spec = write_spec(tmp_path, **COST)
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        o = run_cli(["search", spec, "--out", locked / "run"], cwd=tmp_path)
        assert_refused(o, contains="permission denied", max_seconds=SEARCH_S, max_mb=1000)
        assert list(locked.iterdir()) == []
    finally:
        locked.chmod(0o700)


def test_out_holding_someone_elses_files_is_refused(tmp_path):
    spec = write_spec(tmp_path, **COST)
    mine = tmp_path / "project"
    mine.mkdir()
    (mine / "spec.yaml").write_text("my own spec, not archir's")
    (mine / "pareto.png").write_bytes(b"my picture")
    before = snapshot(mine)
    o = run_cli(["search", spec, "--out", mine], cwd=tmp_path)
    assert_refused(o, contains="not an archir run folder", max_seconds=SEARCH_S, max_mb=1000)
    assert snapshot(mine) == before


@pytest.mark.parametrize(
    "content", ["{not json", "[1, 2]", "\xff\xfe garbage", '{"study": "other"}']
)
def test_out_with_a_bad_or_foreign_run_json_is_refused(tmp_path, content):
    spec = write_spec(tmp_path, **COST)
    run = tmp_path / "run"
    run.mkdir()
    (run / "run.json").write_text(content, encoding="latin-1")
    before = snapshot(run)
    o = run_cli(["search", spec, "--out", run], cwd=tmp_path)
    want = "holds study 'other'" if "other" in content else "run.json"
    assert_refused(o, contains=want, max_seconds=SEARCH_S, max_mb=1000)
    assert snapshot(run) == before


@pytest.fixture(scope="module")
def _one_run(tmp_path_factory) -> Path:
    where = tmp_path_factory.mktemp("finished")
    spec = write_spec(where, budget={"trials": 2}, **COST)
    o = run_cli(["search", spec, "--out", where / "run"], cwd=where)
    assert o.rc == 0, o.err
    return where


@pytest.fixture
def finished_run(_one_run, tmp_path) -> tuple[Path, Path]:
    """A finished cost-fidelity search (2 trials), copied here: its spec and run folder."""
    import shutil

    shutil.copy(_one_run / "spec.yaml", tmp_path / "spec.yaml")
    shutil.copytree(_one_run / "run", tmp_path / "run", symlinks=True)
    return tmp_path / "spec.yaml", tmp_path / "run"


def test_failing_preflight_leaves_a_previous_run_folder_alone(tmp_path, finished_run):
    _, run = finished_run
    before = snapshot(run)
    bad = write_spec(tmp_path, fname="bad.yaml", **IMPOSSIBLE)
    o = run_cli(["search", bad, "--out", run], cwd=tmp_path)
    assert_refused(o, contains="no candidate meets", max_seconds=SEARCH_S, max_mb=1000)
    assert snapshot(run) == before


@pytest.mark.parametrize("what", ["trials", "best", "study.journal"])
def test_links_out_of_the_run_folder_are_refused(tmp_path, finished_run, what):
    spec, run = finished_run
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "victim.txt").write_text("not archir's")
    target = run / what
    if target.is_dir():
        import shutil

        shutil.rmtree(target)
    else:
        target.unlink()
    target.symlink_to(outside, target_is_directory=True)
    o = run_cli(["search", spec, "--out", run, "--trials", "3"], cwd=tmp_path)
    assert_refused(o, contains="outside the output folder", max_seconds=SEARCH_S, max_mb=1000)
    assert sorted(os.listdir(outside)) == ["victim.txt"]
    assert (outside / "victim.txt").read_text() == "not archir's"


def test_written_files_have_normal_permissions(tmp_path):
    spec = write_spec(
        tmp_path,
        objectives={"val_bpb": "minimize"},
        constraints={},
        budget={"trials": 1},
        fidelity={"kind": "proxy", "steps": 2},
    )
    run = tmp_path / "run"
    old = os.umask(0o022)
    try:
        o = run_cli(["search", spec, "--out", run, "--no-export"], cwd=tmp_path)
    finally:
        os.umask(old)
    assert o.rc == 0, o.err
    for rel in (
        "run.json",
        "spec.yaml",
        "pareto.json",
        "pareto.png",
        "trials/0/spec.yaml",
        "trials/0/metrics.json",
        "trials/0/log",
        "best/spec.yaml",
        "best/report.json",
        "best/model.safetensors",
        "study.journal",
    ):
        assert stat.S_IMODE((run / rel).stat().st_mode) == 0o644, rel


# -- 4. flags ---------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("args", "want"),
    [
        (["--searcher", "darts", "--supernet-steps", "-1"], "--supernet-steps"),
        (["--searcher", "spos", "--supernet-steps", "0"], "--supernet-steps"),
        (["--seed", "-1"], "--seed"),
        (["--seed", str(2**40)], "--seed"),
        (["--workers", "100000"], "--workers"),
        (["--trials", str(10**9)], "--trials"),
        (["--steps", str(10**10)], "--steps"),
        (["--timeout", "inf"], "--timeout"),
        (["--timeout", "nan"], "--timeout"),
        (["--trials", "three"], "--trials"),
        (["--fidelity", "max"], "--fidelity"),
        (["--sampler", "cmaes"], "--sampler"),
        (["--searcher", "bogus"], "--searcher"),
        (["--searcher", "darts", "--relax", "hard"], "--relax"),
    ],
)
def test_bad_flag_values_are_refused(tmp_path, args, want):
    spec = write_spec(tmp_path, **COST)
    o = run_cli(["search", spec, "--out", tmp_path / "run", *args], cwd=tmp_path)
    assert_refused(o, contains=want, max_seconds=SEARCH_S, max_mb=1000)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("name", ["..", "a/b"])
def test_oneshot_refuses_a_bad_name_too(tmp_path, name):
    cwd = tmp_path / "work"
    cwd.mkdir()
    (cwd / "keep.txt").write_text("x")
    spec = write_spec(tmp_path, name=name)
    o = run_cli(["search", spec, "--searcher", "darts", "--supernet-steps", "2"], cwd=cwd)
    assert_refused(o, contains="name", max_seconds=SEARCH_S, max_mb=1000)
    assert sorted(os.listdir(cwd)) == ["keep.txt"]


def test_oneshot_failure_removes_only_what_it_created(tmp_path, monkeypatch):
    """A failure after the run folder was made removes it (and only it)."""
    import searchers.oneshot as d
    from archir.errors import SearchError

    def boom(*a, **k):
        raise SearchError("supernet failed on purpose")

    monkeypatch.setattr(d, "train_supernet", boom)
    spec = write_spec(tmp_path)
    keep = tmp_path / "runs" / "other"
    keep.mkdir(parents=True)
    (keep / "f").write_text("x")
    o = run_cli(["search", spec, "--searcher", "darts", "--supernet-steps", "2"], cwd=tmp_path)
    assert_refused(o, contains="on purpose", max_seconds=SEARCH_S, max_mb=1000)
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["other"]
    assert (keep / "f").read_text() == "x"


# -- report on bad folders --------------------------------------------------------------------
@pytest.mark.parametrize(
    ("setup", "want"),
    [
        ("missing", "no such run folder"),
        ("file", "is not a folder"),
        ("empty", "no pareto.json"),
        ("garbage", "cannot be read"),
        ("list", "not a search result"),
        ("rows", "not a search result"),
        ("dir", "not a regular file"),
        ("binary", "cannot be read"),
    ],
)
def test_report_on_a_bad_folder_is_a_clean_error(tmp_path, setup, want):
    run = tmp_path / "runs" / "x"
    if setup == "file":
        run.parent.mkdir(parents=True)
        run.write_text("x")
    elif setup != "missing":
        run.mkdir(parents=True)
    p = run / "pareto.json"
    if setup == "garbage":
        p.write_text('{"study": ')
    elif setup == "list":
        p.write_text("[]")
    elif setup == "rows":
        doc = {"study": "x", "objectives": {"params": "minimize"}, "constraints": {}}
        doc.update(front=[{"trial": "zero"}], trials=[], states={}, n_trials=1, best=None)
        p.write_text(json.dumps(doc))
    elif setup == "dir":
        p.mkdir()
    elif setup == "binary":
        p.write_bytes(b"\xff\xfe\x00\x01")
    for extra in ([], ["--json"], ["--all"]):
        assert_refused(run_cli(["report", run, *extra], cwd=tmp_path), contains=want)


# -- 6. honest outcomes -----------------------------------------------------------------------
def test_resume_with_another_training_budget_is_refused(tmp_path):
    """Trials that do not train still carry the proxy budget: cheap to set up."""
    spec = write_spec(
        tmp_path,
        objectives={"params": "minimize"},
        constraints={},
        budget={"trials": 1},
        fidelity={"kind": "proxy", "steps": 4},
    )
    run = tmp_path / "run"
    assert run_cli(["search", spec, "--out", run], cwd=tmp_path).rc == 0
    before = snapshot(run)
    o = run_cli(["search", spec, "--out", run, "--steps", "8"], cwd=tmp_path)
    assert_refused(o, contains="train.steps 4 -> 8", max_seconds=SEARCH_S, max_mb=1000)
    assert "--study" in o.err
    o = run_cli(["search", spec, "--out", run, "--fidelity", "cost"], cwd=tmp_path)
    assert_refused(o, contains="fidelity 'proxy' -> 'cost'", max_seconds=SEARCH_S, max_mb=1000)
    data = yaml.safe_load(spec.read_text())
    data["train"]["lr"] = 0.01
    spec.write_text(yaml.safe_dump(data, sort_keys=False))
    o = run_cli(["search", spec, "--out", run], cwd=tmp_path)
    assert_refused(o, contains="train.lr", max_seconds=SEARCH_S, max_mb=1000)
    assert snapshot(run) == before
    # the same budget resumes; a new study in another folder is fine
    o = run_cli(["search", spec, "--study", "lr-0-01", "--trials", "1"], cwd=tmp_path)
    assert o.rc == 0, o.err


def _study_trials(run: Path, name: str = "tiny") -> list[optuna.trial.FrozenTrial]:
    from searchers.storage import open_storage

    return optuna.load_study(
        study_name=name, storage=open_storage(None, run / "study.journal")
    ).trials


def _counted(run: Path, name: str = "tiny") -> list[optuna.trial.FrozenTrial]:
    """The trials of the run's study that count against --trials."""
    from searchers.run import _retried, consumes_budget

    trials = _study_trials(run, name)
    retried = _retried(trials)
    return [t for t in trials if consumes_budget(t, retried)]


@pytest.mark.heavy
def test_interrupted_trials_are_retried_and_not_counted(tmp_path):
    """Ctrl-C stops trial 0; the resumed search starts with its configuration (trial 1) and
    SIGTERM stops that one too; the third run retries it again (trial 2) and finishes with
    exactly --trials counted trials, none of the interrupted ones among them."""
    spec = write_spec(
        tmp_path,
        objectives={"val_bpb": "minimize"},
        constraints={},
        budget={"trials": 2},
        fidelity={"kind": "proxy", "steps": 60},
        pruner="none",
        sampler="random",
    )
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "archir.cli", "search", str(spec), "--out", str(run)]
    cmd.append("--no-export")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}

    def default_sigint() -> None:  # a test runner may have SIGINT ignored: children inherit it
        signal.signal(signal.SIGINT, signal.SIG_DFL)

    def interrupt(sig: int, number: int) -> str:
        proc = subprocess.Popen(
            cmd,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            preexec_fn=default_sigint,
        )
        target = run / "trials" / str(number) / "spec.yaml"  # written just before training
        deadline = time.time() + 120
        while time.time() < deadline and not target.exists():
            if proc.poll() is not None:
                pytest.fail(f"search ended early: {proc.stderr.read()[-2000:]}")
            time.sleep(0.01)
        proc.send_signal(sig)
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 130, err[-2000:]
        assert "Traceback" not in err, err[-3000:]
        assert f"trial {number} interrupted: its configuration is retried on resume" in out
        return out

    interrupt(signal.SIGINT, 0)
    trials = _study_trials(run)
    first = trials[0]
    assert first.state == optuna.trial.TrialState.FAIL
    assert trial_attrs(first)["status"] == "interrupted"
    assert "Ctrl-C or SIGTERM" in trial_attrs(first)["reason"]
    (queued,) = [t for t in trials if t.system_attrs.get("failed_trial") == 0]
    assert queued.state == optuna.trial.TrialState.WAITING and queued.params == first.params
    assert _counted(run) == []

    out = interrupt(signal.SIGTERM, queued.number)  # the queued configuration runs first
    assert "resuming" not in out  # nothing was counted
    trials = _study_trials(run)
    assert trial_attrs(trials[queued.number])["status"] == "interrupted"
    assert _counted(run) == []

    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-2000:]
    trials = _study_trials(run)
    (retry,) = [t for t in trials if t.system_attrs.get("failed_trial") == queued.number]
    assert retry.state == optuna.trial.TrialState.COMPLETE and retry.params == first.params
    assert not trial_attrs(retry).get("reason")  # the interrupted original's reason is gone
    assert len(_counted(run)) == 2


def test_duplicates_do_not_consume_the_budget_and_exhaustion_stops(tmp_path):
    """A space of two models with --trials 5: both are trained once, repeats reuse them
    without counting, and the search stops (exit 0) once proposals are only repeats."""
    from searchers.run import MAX_CONSECUTIVE_DUPLICATES

    data = yaml.safe_load(TINY.read_text())
    data["model"]["layers"] = [
        {"blocks": [{"kind": "attention", "n_heads": 2}, {"kind": "swiglu", "expansion": 2}]}
    ]
    data["search"].update(COST, budget={"trials": 5}, sampler="random")
    spec = tmp_path / "two.yaml"
    spec.write_text(yaml.safe_dump(data, sort_keys=False))
    run = tmp_path / "run"
    o = run_cli(["search", spec, "--out", run], cwd=tmp_path)
    assert o.rc == 0, o.err
    assert "search space exhausted: 2 distinct models seen" in o.out
    counted = _counted(run)
    assert len(counted) == 2
    assert len({trial_attrs(t)["spec_hash"] for t in counted}) == 2
    trials = _study_trials(run)
    dups = [t for t in trials if trial_attrs(t).get("duplicate_of") is not None]
    assert len(dups) >= MAX_CONSECUTIVE_DUPLICATES
    originals = {t.number for t in counted}
    assert all(trial_attrs(t)["duplicate_of"] in originals for t in dups)
    doc = json.loads((run / "pareto.json").read_text())
    assert len(doc["front"]) == 1  # one member per distinct model


def test_stale_heartbeat_trial_gets_a_reason(tmp_path):
    from searchers.storage import ATTR_HOST, ATTR_PID, open_storage
    from searchers.storage import fail_stale_trials as fail_stale_with_reason

    st = open_storage(None, tmp_path / "s.journal", heartbeat_interval=1, grace_period=1)
    study = optuna.create_study(storage=st, study_name="s")
    trial = study.ask()
    trial.suggest_int("x", 0, 9)
    st.set_trial_system_attr(trial._trial_id, ATTR_HOST, "machine-b")
    st.set_trial_system_attr(trial._trial_id, ATTR_PID, 4242)
    time.sleep(1.5)
    assert fail_stale_with_reason(study) == [0]
    t = study.trials[0]
    assert t.state == optuna.trial.TrialState.FAIL and trial_attrs(t)["status"] == "failed"
    assert "heartbeat stopped" in trial_attrs(t)["reason"]
    assert "process 4242 on host machine-b" in trial_attrs(t)["reason"]
    retry = [u for u in study.trials if u.system_attrs.get("failed_trial") == 0]
    assert len(retry) == 1 and retry[0].params == t.params


# -- 7. many machines: finish from the storage ------------------------------------------------
def test_a_process_without_the_best_weights_finishes_from_the_storage(tmp_path, monkeypatch):
    """Machine B joins a finished study on a shared storage: its folder has no trials, the
    best trial's spec comes from the storage, and it says which host has the weights."""
    import searchers.pareto as pareto
    from searchers.run import run_search
    from searchers.storage import HOST

    spec = write_spec(
        tmp_path,
        objectives={"val_bpb": "minimize"},
        constraints={},
        budget={"trials": 2},
        fidelity={"kind": "proxy", "steps": 2},
        sampler="random",
    )
    db = f"sqlite:///{tmp_path / 'shared.db'}"
    a = run_search(spec, out=tmp_path / "a", storage=db, say=lambda s: None, export=False)
    assert (tmp_path / "a" / "best" / "model.safetensors").is_file()
    monkeypatch.setattr(pareto, "HOST", "machine-b")
    said: list[str] = []
    b = run_search(spec, out=tmp_path / "b", storage=db, say=said.append)
    assert b.best is not None and b.best["trial"] == a.best["trial"]
    best = tmp_path / "b" / "best"
    assert (best / "spec.yaml").read_text() == (tmp_path / "a" / "best" / "spec.yaml").read_text()
    assert not (best / "model.safetensors").exists()
    report = json.loads((best / "report.json").read_text())
    assert f"on host {HOST}" in report["export"]["skipped"]
    assert report["weights"] == {"trial": a.best["trial"], "host": HOST, "here": False}
    assert any(f"on host {HOST}" in s and "export skipped" in s for s in said)
    assert not list((tmp_path / "b" / "trials").iterdir())


def test_inside_takes_paths_relative_to_the_current_folder(tmp_path, monkeypatch):
    """Run folders are usually relative (runs/NAME): a path under one is inside it, and one
    that leaves it (.., a link out) is refused."""
    from archir.paths import PathError, inside

    monkeypatch.chdir(tmp_path)
    run = Path("runs") / "x"
    (run / "trials" / "0").mkdir(parents=True)
    w = run / "trials" / "0" / "model.safetensors"
    w.write_text("w")
    assert inside(run, w) == (tmp_path / w).resolve()
    with pytest.raises(PathError):
        inside(run, run / ".." / "y")
    (run / "out").symlink_to(tmp_path)
    with pytest.raises(PathError):
        inside(run, run / "out" / "z")


def test_a_ctrl_c_lost_in_a_weakref_callback_still_stops_the_search() -> None:
    """Python ignores an exception raised inside a weakref callback (``Exception ignored
    in: <function _get_module_lock.<locals>.cb>``): a Ctrl-C that lands in an import's
    module-lock callback was lost, and the search ran on to exit 0 (a heavy test caught it).
    Inside ``sigterm_interrupts`` the signal is remembered, and ``raise_if_interrupted``
    (called by the training callback and after each trial's training) raises it again."""
    import weakref

    from searchers.run import raise_if_interrupted, sigterm_interrupts

    class Obj:
        pass

    def lost_interrupt() -> None:
        obj = Obj()
        # the callback runs when obj dies; the KeyboardInterrupt raised in it is ignored
        ref = weakref.ref(obj, lambda _: (os.kill(os.getpid(), signal.SIGINT), time.sleep(0.5)))
        del obj
        assert ref() is None

    before = signal.signal(signal.SIGINT, signal.default_int_handler)  # xdist may ignore it
    try:
        raise_if_interrupted()  # nothing pending
        with sigterm_interrupts():
            lost_interrupt()  # returns normally: the interrupt was swallowed
            with pytest.raises(KeyboardInterrupt):
                raise_if_interrupted()
        raise_if_interrupted()  # forgotten once the search is over
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    finally:
        signal.signal(signal.SIGINT, before)
