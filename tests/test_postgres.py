"""Many machines on a real PostgreSQL server (started here, on 127.0.0.1, by tests/pg.py).

Skipped, with the reason, when the server binaries are not installed (``.ci/run`` installs
Debian's ``postgresql`` package). The driver error needs no server.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
import yaml
from optuna.trial import TrialState

from archir.errors import SearchError
from searchers import storage as storage_mod
from searchers.objectives import trial_attrs
from searchers.storage import ATTR_PID, open_storage
from tests.pg import PgServer, find_binaries

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "specs" / "search" / "tiny.yaml"
pytestmark = pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning")


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


@pytest.fixture(scope="session")
def pg():
    # in CI (.ci/run installs the server) a missing server or driver is a failure, not a skip
    missing = pytest.fail if os.environ.get("CI") == "true" else pytest.skip
    bindir, why = find_binaries()
    if bindir is None:
        missing(why)
    try:
        import psycopg2  # noqa: F401
    except ImportError:
        missing("psycopg2 is not installed: pip install 'archir[postgres]'")
    srv = PgServer.start()
    try:
        yield srv
    finally:
        srv.stop()


# -- (a) the driver ---------------------------------------------------------------------------
def test_missing_driver_names_the_package(tmp_path, monkeypatch):
    real = storage_mod.importlib.util.find_spec
    monkeypatch.setattr(
        storage_mod.importlib.util,
        "find_spec",
        lambda name, *a: None if name in ("psycopg2", "psycopg", "pg8000") else real(name, *a),
    )
    with pytest.raises(SearchError) as err:
        open_storage("postgresql://me:s3cret@db.example:5432/nas", tmp_path / "j")
    msg = str(err.value)
    assert "no PostgreSQL driver is installed" in msg
    assert "pip install 'archir[postgres]'" in msg and "psycopg2-binary" in msg
    assert "s3cret" not in msg and "\n" not in msg


def test_unknown_driver_names_the_package(tmp_path):
    with pytest.raises(SearchError) as err:
        open_storage("postgresql+nosuchdriver://me@127.0.0.1:1/nas", tmp_path / "j")
    msg = str(err.value)
    assert "'nosuchdriver'" in msg and "archir[postgres]" in msg and "psycopg2-binary" in msg


def test_missing_driver_from_the_cli_is_one_line(tmp_path):
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "archir.cli",
            "search",
            str(TINY),
            "--storage",
            "postgresql+nosuchdriver://me@127.0.0.1:1/nas",
            "--out",
            str(tmp_path / "run"),
        ],
        env=_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 2, out.stderr[-2000:]
    assert "archir[postgres]" in out.stderr and "Traceback" not in out.stderr
    assert not (tmp_path / "run").exists()


def test_bare_url_picks_an_installed_driver_and_commits_asynchronously(pg, tmp_path):
    st = open_storage(pg.create_db(), tmp_path / "j")
    assert isinstance(st, optuna.storages.RDBStorage)
    assert st.engine.dialect.driver in ("psycopg2", "psycopg", "pg8000")
    with st.engine.connect() as conn:
        assert conn.exec_driver_sql("SHOW synchronous_commit").scalar() == "off"
    # a URL with its own session options keeps them
    own = pg.create_db() + "?options=-c%20synchronous_commit%3Don"
    st2 = open_storage(own, tmp_path / "j")
    with st2.engine.connect() as conn:
        assert conn.exec_driver_sql("SHOW synchronous_commit").scalar() == "on"
    st.engine.dispose()
    st2.engine.dispose()


# -- (b) processes starting at once on a fresh database -----------------------------------
def _open_at_once(url: str, barrier, q) -> None:  # in a forked process
    try:
        barrier.wait(60)
        st = open_storage(url, Path("unused.journal"))
        optuna.create_study(storage=st, study_name="race", load_if_exists=True)
        q.put("opened")
    except BaseException as exc:  # noqa: BLE001 - reported to the test
        q.put(f"{type(exc).__name__}: {exc}")


def test_processes_starting_at_once_on_a_fresh_database(pg, tmp_path):
    """Processes (forked: they start in milliseconds) open one fresh database at the same
    instant; each must open it and find the study, four times over."""
    import multiprocessing as mp

    ctx = mp.get_context("fork")
    n_procs = 3
    for rep in range(4):
        url = pg.create_db()
        barrier, q = ctx.Barrier(n_procs), ctx.Queue()
        procs = [ctx.Process(target=_open_at_once, args=(url, barrier, q)) for _ in range(n_procs)]
        for p in procs:
            p.start()
        got = [q.get(timeout=120) for _ in procs]
        for p in procs:
            p.join(30)
        assert got == ["opened"] * n_procs, f"try {rep}: {got}"
        assert [p.exitcode for p in procs] == [0] * n_procs
        st = open_storage(url, tmp_path / "j")
        assert [s.study_name for s in st.get_all_studies()] == ["race"]
        st.engine.dispose()


# -- (c) two machines, one killed with kill -9 and restarted ---------------------------------
def _spec(tmp_path: Path) -> Path:
    data = yaml.safe_load(TINY.read_text())
    data["search"].update(objectives={"val_bpb": "minimize"}, pruner="none")
    p = tmp_path / "tiny.yaml"
    p.write_text(yaml.safe_dump(data, sort_keys=False))
    return p


def _search(spec: Path, url: str, out: Path, trials: int) -> list[str]:
    return [
        sys.executable,
        "-m",
        "archir.cli",
        "search",
        str(spec),
        "--storage",
        url,
        "--study",
        "shared",
        "--trials",
        str(trials),
        "--steps",
        "20",
        "--sampler",
        "random",
        "--out",
        str(out),
        "--no-export",
    ]


@pytest.mark.heavy
def test_two_machines_one_killed_and_restarted(pg, tmp_path):
    """Two ``archir search`` processes share one study, each with its own run folder (two
    machines); one is killed with kill -9 in the middle of a trial and started again. Both
    end with exit 0; every trial number appears once; the killed trial is FAIL and retried
    exactly once with its parameters; the budget is met."""
    url = pg.create_db()
    spec = _spec(tmp_path)
    trials = 8
    a_out, b_out = tmp_path / "machine-a", tmp_path / "machine-b"
    a = subprocess.Popen(
        _search(spec, url, a_out, trials),
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    b = subprocess.Popen(
        _search(spec, url, b_out, trials),
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    # trials/<n>/spec.yaml is written once trial n's parameters are in the storage, before
    # its training: kill A then, while no metrics.json says the trial ended
    victim = None
    deadline = time.time() + 180
    while victim is None and time.time() < deadline:
        if a.poll() is not None:
            pytest.fail(f"A ended before it was killed: {a.stderr.read().decode()[-3000:]}")
        for d in (a_out / "trials").glob("*") if (a_out / "trials").exists() else ():
            if (d / "spec.yaml").exists() and not (d / "metrics.json").exists():
                victim = int(d.name)
                break
        else:
            time.sleep(0.005)
    assert victim is not None, "A never started a trial"
    a.send_signal(signal.SIGKILL)
    a.wait()
    st = open_storage(url, tmp_path / "j")
    study = optuna.load_study(study_name="shared", storage=st)
    t = study.trials[victim]
    # left RUNNING by the kill — or already failed as killed by B, when B (on this same host)
    # reached its start-up check for dead processes after the kill: the designed recovery
    failed_by_b = t.state == TrialState.FAIL and "killed" in trial_attrs(t).get("reason", "")
    assert t.system_attrs.get(ATTR_PID) == a.pid and (
        t.state == TrialState.RUNNING or failed_by_b
    ), (
        f"the trial A was killed in had already ended: {t.state.name}, {t.user_attrs}, "
        f"{t.system_attrs}; A: {a.stdout.read().decode()[-1500:]} "
        f"{a.stderr.read().decode()[-1500:]}"
    )
    killed_params = t.params
    a2 = subprocess.Popen(
        _search(spec, url, a_out, trials),
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    outs = {}
    for name, p in (("A (restarted)", a2), ("B", b)):
        out, err = p.communicate(timeout=600)
        outs[name] = out.decode()
        assert p.returncode == 0, f"{name} exit {p.returncode}: {err.decode()[-3000:]}"
    study = optuna.load_study(study_name="shared", storage=st)
    got = study.trials
    numbers = [t.number for t in got]
    assert numbers == list(range(len(got))), numbers  # each trial number once
    assert not [t.number for t in got if t.state == TrialState.RUNNING]
    failed = [t for t in got if t.state == TrialState.FAIL]
    assert [t.number for t in failed] == [victim]
    assert "killed" in trial_attrs(failed[0]).get("reason", "")
    retries = [t for t in got if t.system_attrs.get("failed_trial") == victim]
    assert len(retries) == 1 and retries[0].params == killed_params
    assert retries[0].state == TrialState.COMPLETE
    complete = [t for t in got if t.state == TrialState.COMPLETE]
    assert len(complete) >= trials
    # both machines wrote the result of the whole study
    for out_dir in (a_out, b_out):
        best = json.loads((out_dir / "best" / "report.json").read_text())
        assert best, out_dir
    st.engine.dispose()


@pytest.mark.heavy
def test_a_ladder_with_two_workers_on_postgresql(pg, tmp_path):
    """The fidelity ladder (issue 12) on a PostgreSQL study with 2 workers: promotions are
    trials like any other, their learning curves are intermediate values in the database."""
    from searchers.ladder import ATTR_CONTINUE
    from searchers.run import OVER_BUDGET

    url = pg.create_db()
    data = yaml.safe_load(TINY.read_text())
    data["train"].update(steps=16, warmup_steps=1)
    data["search"].update(
        budget={"trials": 6},
        sampler="random",
        workers=2,
        fidelity={"kind": "ladder", "rungs": [4, 8, 16], "eta": 2},
    )
    spec = tmp_path / "tiny.yaml"
    spec.write_text(yaml.safe_dump(data, sort_keys=False))
    out = subprocess.run(
        [sys.executable, "-m", "archir.cli", "search", str(spec), "--storage", url]
        + ["--study", "lad", "--out", str(tmp_path / "run"), "--no-export"],
        env=_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    study = optuna.load_study(study_name="lad", storage=open_storage(url, tmp_path / "j"))
    trials = study.trials
    assert study.metric_names == ["val_bpb", "params"]
    # a worker that lost the race for the last model stops its trial unrun (PRUNED, status
    # OVER_BUDGET, never counted): every other trial completes
    odd = [
        (t.number, t.state.name, trial_attrs(t), t.system_attrs)
        for t in trials
        if t.state != TrialState.COMPLETE
        and not (t.state == TrialState.PRUNED and trial_attrs(t).get("status") == OVER_BUDGET)
    ]
    assert not odd, odd
    promoted = [t for t in trials if ATTR_CONTINUE in t.system_attrs]
    trained = [t for t in promoted if trial_attrs(t).get("duplicate_of") is None]
    assert trained
    for t in trained:
        assert sorted(t.intermediate_values) == [r["steps"] for r in trial_attrs(t)["rungs"]]
    # two workers may queue one promotion at once: the second copy trains nothing, records
    # itself as a duplicate of the model it would have continued, and reports no curve
    for t in promoted:
        if t not in trained:
            assert trial_attrs(t)["duplicate_of"] == t.system_attrs[ATTR_CONTINUE]
            assert t.intermediate_values == {}
    doc = json.loads((tmp_path / "run" / "pareto.json").read_text())
    # exactly the budget: a trial drawn in a race for the last model stopped unrun
    assert doc["fidelity"]["models_per_rung"][0] == 6
    assert all(row["steps"] == doc["fidelity"]["steps"] for row in doc["front"])
