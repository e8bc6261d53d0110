"""The journal survives torn writes: a torn tail is moved aside, damage in the middle is a
clear error, nothing is ever appended after garbage; grouped appends and heartbeats keep
working through Optuna's public journal API (searchers/storage.py)."""

from __future__ import annotations

import json
import os
import pickle
import threading
import time
from pathlib import Path

import optuna
import pytest
from optuna.storages import JournalStorage
from optuna.storages.journal import JournalFileBackend, JournalFileOpenLock
from optuna.trial import TrialState

from archir.errors import SearchError
from searchers.storage import (
    HeartbeatJournalStorage,
    check_journal,
    check_optuna,
    grouped,
    open_storage,
)

optuna.logging.set_verbosity(optuna.logging.WARNING)
pytestmark = [
    pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning"),
    pytest.mark.filterwarnings("ignore:Heartbeat of storage:UserWarning"),
]


def _objective(trial: optuna.Trial) -> float:
    """archir's write pattern: parameters + attributes in one group, results with the state."""
    st = trial.study._storage
    with grouped(st):
        x = trial.suggest_float("x", -1.0, 1.0)
        n = trial.suggest_int("n", 1, 4)
        trial.set_user_attr("spec_hash", f"h{n}")
    with grouped(st, until_state=True):
        trial.set_user_attr("values", {"x": x, "n": n})
        trial.set_user_attr("status", "ok")
    return x * n


def _plain(path: Path, name: str = "s") -> optuna.Study:
    """The study as plain Optuna reads it (a fresh backend: another process)."""
    return optuna.load_study(study_name=name, storage=JournalStorage(JournalFileBackend(str(path))))


def _snapshot(study: optuna.Study) -> list[tuple]:
    return [
        (t.number, t.state, t.params, t.values, t.user_attrs, t.system_attrs)
        for t in study.get_trials(deepcopy=False)
    ]


def _lines(data: bytes) -> list[tuple[int, int]]:
    """(start, end) byte offsets of each line, end after the newline."""
    out, pos = [], 0
    for line in data.splitlines(keepends=True):
        out.append((pos, pos + len(line)))
        pos += len(line)
    return out


@pytest.fixture(scope="module")
def journal_bytes(tmp_path_factory) -> bytes:
    """A real study journal: three trials written the way archir writes them."""
    path = tmp_path_factory.mktemp("j") / "study.journal"
    st = open_storage(None, path)
    study = optuna.create_study(
        storage=st, study_name="s", sampler=optuna.samplers.RandomSampler(seed=0)
    )
    study.optimize(_objective, n_trials=3)
    return path.read_bytes()


def test_optuna_internals_archir_relies_on_are_unchanged():
    check_optuna()  # raises SearchError naming what changed
    from optuna.storages._heartbeat import BaseHeartbeat

    assert issubclass(HeartbeatJournalStorage, BaseHeartbeat)


def test_a_trial_is_three_appends_and_replays(tmp_path):
    st = open_storage(None, tmp_path / "study.journal")
    assert isinstance(st, HeartbeatJournalStorage)
    study = optuna.create_study(storage=st, study_name="s")
    study.optimize(_objective, n_trials=1)
    before = st.appends
    study.optimize(_objective, n_trials=4)
    assert st.appends - before == 12  # create, parameters + attributes, results + state
    got = _plain(tmp_path / "study.journal").trials
    assert [t.state for t in got] == [TrialState.COMPLETE] * 5
    assert all(t.user_attrs["status"] == "ok" and len(t.params) == 2 for t in got)
    # a storage survives pickling (spawned workers) with nothing held
    clone = pickle.loads(pickle.dumps(st))
    assert len(optuna.load_study(study_name="s", storage=clone).trials) == 5


def test_held_writes_go_out_with_another_threads_write(tmp_path):
    st = open_storage(None, tmp_path / "study.journal")
    study = optuna.create_study(storage=st, study_name="s")
    trial = study.ask()
    with st.grouped():
        trial.set_user_attr("a", 1)
        t = threading.Thread(target=lambda: st.set_trial_system_attr(trial._trial_id, "b", 2))
        t.start()
        t.join()
        assert _plain(tmp_path / "study.journal").trials[0].user_attrs == {"a": 1}
    study.tell(trial, 1.0)
    assert _plain(tmp_path / "study.journal").trials[0].system_attrs["b"] == 2


def test_cut_at_every_byte_of_the_last_append(journal_bytes, tmp_path, monkeypatch):
    """Cut the journal's last append (a trial's results and its COMPLETE state) at every byte
    offset: it is repaired, plain Optuna loads it with every earlier record intact, archir
    continues the study, and plain Optuna loads the continued study. (Cuts inside the
    append's earlier records leave the same repaired file for every offset of a line: the
    study is continued once per such file; inside the last record, at every offset.)"""
    monkeypatch.setattr(os, "fsync", lambda fd: None)  # thousands of appends: keep it fast
    lines = _lines(journal_bytes)
    assert all(journal_bytes[e - 1 : e] == b"\n" for _, e in lines)
    # the last append: the records after the last trial's parameters and attributes
    group = max(i for i, (s, e) in enumerate(lines) if b'"values":{"x"' in journal_bytes[s:e])
    start = lines[group][0]
    whole = _snapshot(_plain_from(journal_bytes, tmp_path / "ref.journal"))
    path = tmp_path / "study.journal"
    prefixes: dict[int, list[tuple]] = {}
    continued: set[int] = set()
    n_torn = 0
    for cut in range(start, len(journal_bytes) + 1):
        for f in tmp_path.glob("study.journal*"):
            f.unlink()
        path.write_bytes(journal_bytes[:cut])
        kept = max((e for _, e in lines if e <= cut), default=0)  # end of the last whole line
        note = check_journal(path)
        torn = sorted(tmp_path.glob("study.journal.torn-*"))
        if kept == cut:
            assert note is None and not torn, cut
        else:
            n_torn += 1
            assert note is not None and "moved to study.journal.torn-" in note, cut
            assert len(torn) == 1 and torn[0].read_bytes() == journal_bytes[kept:cut], cut
        assert path.read_bytes() == journal_bytes[:kept], cut
        # plain Optuna: the trials before the torn record are intact
        if kept not in prefixes:
            prefixes[kept] = _snapshot(_plain_from(journal_bytes[:kept], tmp_path / "p.journal"))
        study = _plain(path)
        got = _snapshot(study)
        assert got == prefixes[kept], cut
        assert got[:2] == whole[:2], cut  # the two earlier trials, untouched
        last = study.trials[2]
        assert last.state == (
            TrialState.COMPLETE if cut == len(journal_bytes) else TrialState.RUNNING
        )
        if cut < lines[-1][0] and kept in continued:
            continue
        continued.add(kept)
        # archir continues the study: one more trial appended after the repair
        st = open_storage(None, path)
        _add_trial(optuna.load_study(study_name="s", storage=st), cut)
        again = _plain(path)  # a fresh JournalFileBackend: another process
        assert len(again.trials) == 4, cut
        assert _snapshot(again)[:3] == got, cut
        assert again.trials[3].state == TrialState.COMPLETE, cut
    assert n_torn > 300  # most offsets tear a record (the rest end on a line boundary)


def _add_trial(study: optuna.Study, seed: int) -> None:
    """One trial by ask and tell, archir's groups, no heartbeat thread (fast)."""
    trial = study.ask()
    with grouped(study._storage):
        trial.suggest_float("x", -1.0, 1.0)
        n = trial.suggest_int("n", 1, 4)
        trial.set_user_attr("spec_hash", f"h{n}")
    with grouped(study._storage, until_state=True):
        trial.set_user_attr("status", "ok")
    study.tell(trial, float(seed))


def _plain_from(data: bytes, path: Path) -> optuna.Study:
    path.unlink(missing_ok=True)
    path.write_bytes(data)
    return _plain(path)


def test_open_storage_says_what_it_moved_aside(journal_bytes, tmp_path):
    path = tmp_path / "study.journal"
    path.write_bytes(journal_bytes[:-40])
    said: list[str] = []
    st = open_storage(None, path, say=said.append)
    assert len(said) == 1 and "\n" not in said[0]
    assert "cut short" in said[0] and "study.journal.torn-" in said[0]
    assert st.notes == said
    assert open_storage(None, path, say=said.append).notes == []  # repaired once


def test_unparsable_lines_at_the_end_are_moved_aside(journal_bytes, tmp_path):
    path = tmp_path / "study.journal"
    tail = b"\x00\x00\x00\x00\nnot json\n[1, 2]\n"  # e.g. zero-filled blocks after a power cut
    path.write_bytes(journal_bytes + tail)
    note = check_journal(path)
    assert note is not None and "line 23" in note
    assert path.read_bytes() == journal_bytes
    (torn,) = tmp_path.glob("study.journal.torn-*")
    assert torn.read_bytes() == tail


def test_damage_in_the_middle_is_a_located_error_and_nothing_is_written(journal_bytes, tmp_path):
    lines = _lines(journal_bytes)
    s, e = lines[5]
    bad = journal_bytes[:s] + b'{"op_code":8,"trial_id":0,"user_a\n' + journal_bytes[e:]
    path = tmp_path / "study.journal"
    path.write_bytes(bad)
    with pytest.raises(SearchError) as err:
        open_storage(None, path)
    msg = str(err.value)
    assert str(path) in msg and ":6:" in msg and f"byte offset {s}" in msg
    assert "\n" not in msg and "head -c" in msg
    assert path.read_bytes() == bad  # nothing appended, nothing moved
    assert not list(tmp_path.glob("study.journal.torn-*"))
    assert not (tmp_path / "study.journal.lock").exists()


def test_a_journal_bricked_by_appending_after_a_torn_record_is_refused(journal_bytes, tmp_path):
    """What archir did before: a torn record, then new records appended after it."""
    path = tmp_path / "study.journal"
    torn = journal_bytes[:-50]
    # the first record appended merges with the torn line; the next ones are whole lines
    more = b'{"op_code":4,"worker_id":"w","study_id":0,"datetime_start":null}\n' * 3
    path.write_bytes(torn + more)
    with pytest.raises(SearchError, match=r"line 22 \(byte offset \d+\)"):
        check_journal(path)
    assert path.read_bytes() == torn + more


def test_a_writer_that_died_mid_append_is_cut_off_before_the_next_append(journal_bytes, tmp_path):
    """Another process dies mid-append while this one has the journal open: this one's next
    append moves the torn bytes aside first, so it never writes after garbage."""
    path = tmp_path / "study.journal"
    path.write_bytes(journal_bytes)
    said: list[str] = []
    st = open_storage(None, path, say=said.append)
    study = optuna.load_study(study_name="s", storage=st)
    with open(path, "ab") as f:  # the dead writer's half record
        f.write(b'{"op_code":8,"worker_id":"dead","trial_id":1,"user_a')
    study.optimize(_objective, n_trials=1)
    assert len(said) == 1 and "cut short" in said[0]
    got = _plain(path)
    assert len(got.trials) == 4 and got.trials[3].state == TrialState.COMPLETE
    (torn,) = tmp_path.glob("study.journal.torn-*")
    assert torn.read_bytes().startswith(b'{"op_code":8,"worker_id":"dead"')


def test_repair_waits_for_the_journal_lock(journal_bytes, tmp_path):
    """A process appending holds Optuna's lock file; the repair waits for it."""
    path = tmp_path / "study.journal"
    path.write_bytes(journal_bytes[:-10])
    lock = JournalFileOpenLock(str(path))
    lock.acquire()
    notes: list[str | None] = []
    t = threading.Thread(target=lambda: notes.append(check_journal(path)))
    try:
        t.start()
        time.sleep(0.3)
        assert t.is_alive() and path.read_bytes() == journal_bytes[:-10]
        with open(path, "ab") as f:  # the lock holder finishes its append meanwhile
            f.write(journal_bytes[-10:])
    finally:
        lock.release()
    t.join(10)
    assert notes == [None]  # rescanned under the lock: whole again, nothing moved
    assert path.read_bytes() == journal_bytes
    assert not list(tmp_path.glob("study.journal.torn-*"))


def test_stale_heartbeat_fails_and_retries_through_optuna(tmp_path):
    """Optuna's study loop runs archir's journal heartbeats (BaseHeartbeat): a RUNNING trial
    whose heartbeat stopped is failed and its configuration retried."""
    path = tmp_path / "study.journal"
    st = open_storage(None, path, heartbeat_interval=1, grace_period=1)
    study = optuna.create_study(storage=st, study_name="s")
    study.enqueue_trial({"x": 0.25, "n": 2})
    orphan = study.ask()  # a worker on another machine that stopped beating
    assert orphan.params == {}
    orphan.suggest_float("x", -1.0, 1.0)
    orphan.suggest_int("n", 1, 4)
    time.sleep(1.2)
    study.optimize(_objective, n_trials=1)
    trials = _plain(path).trials
    assert trials[0].state == TrialState.FAIL
    retry = [t for t in trials if t.system_attrs.get("failed_trial") == 0]
    assert len(retry) == 1 and retry[0].params == trials[0].params


def test_journal_records_are_optunas_format(tmp_path):
    st = open_storage(None, tmp_path / "study.journal")
    optuna.create_study(storage=st, study_name="s").optimize(_objective, n_trials=1)
    for line in (tmp_path / "study.journal").read_bytes().splitlines(keepends=True):
        rec = json.loads(line)
        assert line.endswith(b"\n") and isinstance(rec["op_code"], int) and "worker_id" in rec


def test_search_resumes_after_a_torn_write(tmp_path, caplog):
    """The issue's case: a search's journal ends in a torn record; the same search again
    moves it aside, says so, finishes, and plain Optuna still loads the study."""
    import yaml

    from searchers.run import run_search

    data = yaml.safe_load(
        (Path(__file__).resolve().parents[1] / "specs/search/tiny.yaml").read_text()
    )
    data["search"].update(objectives={"params": "minimize"}, fidelity="cost")
    spec = tmp_path / "tiny.yaml"
    spec.write_text(yaml.safe_dump(data, sort_keys=False))
    run = tmp_path / "run"
    run_search(spec, out=run, trials=3, export=False, say=lambda s: None)
    journal = run / "study.journal"
    whole = journal.read_bytes()
    journal.write_bytes(whole[:-25])  # the last record (trial 2's state) cut short
    said: list[str] = []
    with caplog.at_level("WARNING"):
        run_search(spec, out=run, trials=5, export=False, say=said.append)
    told = [m for m in said + [r.getMessage() for r in caplog.records] if "cut short" in m]
    assert len(told) == 1 and "study.journal.torn-" in told[0]
    (torn,) = run.glob("study.journal.torn-*")
    assert torn.read_bytes() == whole[whole.rindex(b"\n", 0, len(whole) - 1) + 1 : -25]
    study = _plain(journal, "tiny")
    done = [t for t in study.trials if t.state == TrialState.COMPLETE]
    assert len(done) >= 5


def test_stale_trials_are_failed_with_a_reason(tmp_path):
    from searchers.storage import ATTR_HOST, ATTR_PID, fail_stale_trials, started_system_attrs

    path = tmp_path / "study.journal"
    st = open_storage(None, path, heartbeat_interval=1, grace_period=1)
    study = optuna.create_study(storage=st, study_name="s")
    orphan = study.ask()
    orphan.suggest_int("n", 1, 4)
    st.set_trial_system_attr(orphan._trial_id, ATTR_HOST, "elsewhere")
    st.set_trial_system_attr(orphan._trial_id, ATTR_PID, 4242)
    assert fail_stale_trials(study) == []  # still beating (its start time)
    time.sleep(1.2)
    assert fail_stale_trials(study) == [0]
    t = _plain(path).trials[0]
    assert t.state == TrialState.FAIL and "process 4242 on host elsewhere" in t.user_attrs["reason"]
    retry = study.ask()  # the re-enqueued configuration
    assert started_system_attrs(retry).get("failed_trial") == 0
    assert retry.suggest_int("n", 1, 4) == t.params["n"]
