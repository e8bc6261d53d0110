"""Where a study lives: Optuna storages with heartbeats, grouped journal writes, dead trials.

The default storage is a journal file (``runs/<name>/study.journal``) that ``fsync``s every
append, which is what makes a search safe to kill -9 and resume. An append costs a few
milliseconds, so :class:`HeartbeatJournalStorage` groups the writes of one trial step into
a single append (:meth:`~HeartbeatJournalStorage.grouped`): a trial's suggested parameters,
host/pid and spec attributes go in one append before any training starts, and its results
(attributes and constraint values) in the same append as its final state. A process killed
inside a group loses that group only; the trial it belongs to is then still RUNNING with its
last complete group, and is failed and retried (its parameters were appended before the
expensive part began). A trial therefore costs three appends (create, parameters, results +
state) instead of one per parameter and attribute.

Any other Optuna storage URL (``sqlite:///x.db``, ``postgresql://...``) is an
:class:`optuna.storages.RDBStorage` with Optuna's own heartbeats.
"""

from __future__ import annotations

import os
import socket
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import optuna
from optuna.storages import JournalStorage, RetryHeartbeatStaleTrialCallback
from optuna.storages._heartbeat import BaseHeartbeat
from optuna.storages.journal import JournalFileBackend, JournalFileOpenLock
from optuna.storages.journal._storage import JournalOperation
from optuna.trial import FrozenTrial, TrialState

from archir.errors import SearchError

HOST = socket.gethostname()
ATTR_HOST = "archir:host"
ATTR_PID = "archir:pid"
ATTR_BEAT = "archir:heartbeat"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def dead_here(t: FrozenTrial) -> bool:
    """A RUNNING trial whose process on this host is gone."""
    host, pid = t.system_attrs.get(ATTR_HOST), t.system_attrs.get(ATTR_PID)
    return host == HOST and isinstance(pid, int) and pid != os.getpid() and not _pid_alive(pid)


def _retry_callback() -> RetryHeartbeatStaleTrialCallback:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return RetryHeartbeatStaleTrialCallback(max_retry=1)


class HeartbeatJournalStorage(JournalStorage, BaseHeartbeat):
    """Optuna's journal-file storage plus heartbeats (which the journal backend lacks) and
    grouped appends.

    Heartbeats: a running trial writes an ``archir:heartbeat`` timestamp every
    ``heartbeat_interval`` seconds (the first beat is its start time, which is already
    stored); a RUNNING trial whose last beat is older than ``grace_period`` seconds — or
    whose process on this host no longer exists — is stale, and Optuna marks it FAIL and
    calls ``callback`` (a :class:`RetryHeartbeatStaleTrialCallback` re-enqueues its
    parameters).

    Grouped appends: inside ``with storage.grouped():`` the writes made by the calling thread
    are held and appended (one ``fsync``) when the block exits (or with the next trial state
    change, see :meth:`grouped`) — or earlier, together with any write another thread makes
    meanwhile. Reads inside the block do not see the held
    writes (an :class:`optuna.Trial` keeps its own copy of its parameters and attributes, so
    the objective is not affected).
    """

    def __init__(
        self,
        path: str,
        heartbeat_interval: int,
        grace_period: int,
        callback: Callable[[optuna.Study, FrozenTrial], None] | None,
    ) -> None:
        self._held: list[dict[str, Any]] = []
        self._holder: int | None = None
        self._until_state: int | None = None
        super().__init__(JournalFileBackend(path, lock_obj=JournalFileOpenLock(path, 10)))
        self._hb_interval = heartbeat_interval
        self._grace = grace_period
        self._stale_cb = callback
        self._beaten: set[int] = set()
        self.appends = 0  # backend appends made by this process (benchmarks read it)

    # -- grouped appends ---------------------------------------------------------------
    def _write_log(self, op_code: int, extra_fields: dict[str, Any]) -> None:
        log = {"op_code": op_code, "worker_id": self._replay_result.worker_id, **extra_fields}
        me = threading.get_ident()
        if self._holder == me or (
            self._until_state == me and op_code != JournalOperation.SET_TRIAL_STATE_VALUES
        ):
            self._held.append(log)
            return
        if self._until_state == me:
            self._until_state = None
        logs, self._held = [*self._held, log], []
        self._backend.append_logs(logs)
        self.appends += 1

    def flush(self) -> None:
        """Append the held writes now (one append)."""
        with self._thread_lock:
            self._until_state = None
            if self._held:
                logs, self._held = self._held, []
                self._backend.append_logs(logs)
                self.appends += 1
            self._sync_with_backend()

    @contextmanager
    def grouped(self, until_state: bool = False) -> Iterator[None]:
        """Hold this thread's writes and append them at once when the block exits — or,
        with ``until_state``, together with this thread's next trial state change (Optuna's
        ``tell`` right after the objective returns: a trial's results and its COMPLETE state
        land in one append, and a kill between the two leaves the trial RUNNING, to be
        retried). Nothing may read the held writes back before then."""
        if self._holder is not None:  # nested or another thread's group: no grouping
            yield
            return
        self._holder = threading.get_ident()
        ok = False
        try:
            yield
            ok = True
        finally:
            self._holder = None
            if until_state and ok:
                self._until_state = threading.get_ident()
            else:
                self.flush()

    def __getstate__(self) -> dict[Any, Any]:
        state = super().__getstate__()
        state["_held"], state["_holder"], state["_until_state"] = [], None, None
        return state

    # -- heartbeats --------------------------------------------------------------------
    def record_heartbeat(self, trial_id: int) -> None:
        if trial_id not in self._beaten:  # first beat: the stored start time stands for it
            self._beaten.add(trial_id)
            return
        self.set_trial_system_attr(trial_id, ATTR_BEAT, time.time())

    def _get_stale_trial_ids(self, study_id: int) -> list[int]:
        now = time.time()
        out = []
        for t in self.get_all_trials(study_id, deepcopy=False, states=(TrialState.RUNNING,)):
            beat = t.system_attrs.get(ATTR_BEAT)
            if beat is None and t.datetime_start is not None:
                beat = t.datetime_start.timestamp()
            if dead_here(t) or (beat is not None and now - float(beat) > self._grace):
                out.append(t._trial_id)
        return out

    def get_heartbeat_interval(self) -> int | None:
        return self._hb_interval

    def get_heartbeat_stale_trial_callback(
        self,
    ) -> Callable[[optuna.Study, FrozenTrial], None] | None:
        return self._stale_cb


@contextmanager
def grouped(storage: optuna.storages.BaseStorage, until_state: bool = False) -> Iterator[None]:
    """``storage.grouped(until_state)`` where the storage supports it, else nothing."""
    if isinstance(storage, HeartbeatJournalStorage):
        with storage.grouped(until_state):
            yield
    else:
        yield


def open_storage(
    url: str | None, journal: Path, heartbeat_interval: int = 5, grace_period: int = 30
) -> optuna.storages.BaseStorage:
    """The study's storage: a journal file (default) or any Optuna storage URL.

    Raises:
        SearchError: the URL cannot be opened or reached.
    """
    retry = _retry_callback()
    if url is None:
        return HeartbeatJournalStorage(str(journal), heartbeat_interval, grace_period, retry)
    try:
        if url.endswith((".journal", ".log")) and "://" not in url:
            return HeartbeatJournalStorage(url, heartbeat_interval, grace_period, retry)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            storage = optuna.storages.RDBStorage(
                url,
                heartbeat_interval=heartbeat_interval,
                grace_period=grace_period,
                heartbeat_stale_trial_callback=retry,
            )
        storage.get_all_studies()
        return storage
    except Exception as exc:  # noqa: BLE001 - any driver/connection failure is a user error
        raise SearchError(
            f"cannot open storage {url!r}: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}",
            hint="check the URL, the server and the database driver "
            "(e.g. sqlite:///runs/x.db, postgresql://user@host/db)",
        ) from None


def fail_dead_trials(study: optuna.Study) -> list[int]:
    """Mark FAIL (and retry once) RUNNING trials whose process on this host is gone.

    Returns the numbers of the trials failed.
    """
    retry = _retry_callback()
    done = []
    storage = study._storage
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if not dead_here(t):
            continue
        try:
            with grouped(storage):
                storage.set_trial_user_attr(t._trial_id, "status", "failed")
                storage.set_trial_user_attr(
                    t._trial_id, "reason", "its process died (killed); configuration retried once"
                )
            if storage.set_trial_state_values(t._trial_id, state=TrialState.FAIL):
                retry(study, storage.get_trial(t._trial_id))
                done.append(t.number)
        except optuna.exceptions.UpdateFinishedTrialError:
            pass
    return done
