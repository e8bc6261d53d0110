"""Where a study lives: Optuna storages with heartbeats, grouped journal writes, dead trials.

**Journal file** (the default, ``runs/<name>/study.journal``): Optuna's
:class:`~optuna.storages.JournalStorage` over :class:`JournalFile`, a public
:class:`~optuna.storages.journal.BaseJournalBackend` that reads through Optuna's
:class:`~optuna.storages.journal.JournalFileBackend` and writes the same format (one JSON
record per line) itself, under the same lock file Optuna uses
(:class:`~optuna.storages.journal.JournalFileOpenLock`), ``fsync``-ing every append: that is
what makes a search safe to kill -9 and resume. It adds three things:

- *Grouped appends.* An append costs a few milliseconds, so the writes of one trial step are
  held and appended at once (:meth:`JournalFile.grouped`): a trial's suggested parameters,
  host/pid and spec attributes go in one append before any training starts, and its results
  (attributes and constraint values) in the same append as its final state. A process killed
  inside a group loses that group only; the trial it belongs to is then still RUNNING with
  its last complete group, and is failed and retried (its parameters were appended before the
  expensive part began). A trial costs three appends (create, parameters, results + state)
  instead of one per parameter and attribute.
- *Torn writes.* A crash in the middle of an append can leave the last record cut short.
  Opening the journal (:func:`check_journal`) moves such a torn or unparsable tail aside
  into ``<journal>.torn-<time>`` (kept, never deleted), cuts the journal back to its last
  whole record and says so in one line; a damaged record *followed by* whole ones is a
  :class:`~archir.errors.SearchError` naming the line and byte offset. Every append checks,
  under the lock, that the file ends with a whole line (another process may have died
  mid-append), so nothing is ever appended after garbage.
- *Heartbeats*, which the journal lacks (:class:`HeartbeatJournalStorage`).

**Any other Optuna URL** (``sqlite:///x.db``, ``postgresql://...``) is an
:class:`optuna.storages.RDBStorage` with Optuna's own heartbeats (:func:`open_storage`): the
database driver is checked first (a missing one names the package to install), table
creation is serialized between processes that start at once (a PostgreSQL advisory lock,
and retries elsewhere), and PostgreSQL sessions commit asynchronously (see
:func:`open_storage`).

Optuna's private names archir relies on are confined to this module. Two are checked by
:func:`check_optuna` (run whenever a journal storage is opened, and by the tests): Optuna runs
its heartbeat thread and fails stale trials only for storages that inherit its private
``BaseHeartbeat`` (whose abstract ``_get_stale_trial_ids`` :func:`fail_stale_trials` also
calls), and a trial state change is recognised in the journal format by its operation code.
The others have no public equivalent and fall back or fail loudly: ``Study._storage`` and
``_study_id``, ``FrozenTrial._trial_id`` (the storage API's trial key) and a started trial's
cached copy (:func:`started_system_attrs`, which reads the storage when it is missing).
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import random
import socket
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
from optuna.storages import JournalStorage, RetryHeartbeatStaleTrialCallback
from optuna.storages._heartbeat import BaseHeartbeat  # see check_optuna
from optuna.storages.journal import BaseJournalBackend, JournalFileBackend, JournalFileOpenLock
from optuna.trial import FrozenTrial, TrialState

from archir.errors import Location, SearchError

HOST = socket.gethostname()
ATTR_HOST = "archir:host"
ATTR_PID = "archir:pid"
ATTR_BEAT = "archir:heartbeat"

_log = logging.getLogger(__name__)

# -- the private Optuna names archir relies on, checked in one place ------------------------
OPTUNA_CHECKED = "5.0.0"  # the Optuna version this module was written and tested against
# the abstract methods of optuna.storages._heartbeat.BaseHeartbeat that
# HeartbeatJournalStorage implements; Optuna's study loop calls them
_HEARTBEAT_METHODS = frozenset(
    {
        "record_heartbeat",
        "_get_stale_trial_ids",
        "get_heartbeat_interval",
        "get_heartbeat_stale_trial_callback",
    }
)
# a journal record's operation code for a trial state change (the journal file format;
# JournalOperation.SET_TRIAL_STATE_VALUES in optuna.storages.journal._storage)
_OP_SET_TRIAL_STATE = 6
_checked: list[str] = []


def check_optuna() -> None:
    """Check the private parts of Optuna that this module relies on.

    Raises:
        SearchError: the installed Optuna changed them (heartbeats or the group flush of the
            journal storage would silently stop working).
    """
    if _checked:
        return
    problems = []
    got = set(getattr(BaseHeartbeat, "__abstractmethods__", ()))
    if got != _HEARTBEAT_METHODS:
        problems.append(
            f"BaseHeartbeat's abstract methods are {sorted(got)}, "
            f"expected {sorted(_HEARTBEAT_METHODS)}"
        )
    try:
        from optuna.storages.journal._storage import JournalOperation

        if int(JournalOperation.SET_TRIAL_STATE_VALUES) != _OP_SET_TRIAL_STATE:
            problems.append("the journal's SET_TRIAL_STATE_VALUES operation code changed")
    except (ImportError, AttributeError) as exc:
        problems.append(f"the journal's operation codes moved ({exc})")
    if problems:
        raise SearchError(
            f"Optuna {optuna.__version__} changed what archir's journal storage relies on: "
            + "; ".join(problems),
            hint=f"install optuna=={OPTUNA_CHECKED} or update searchers/storage.py",
        )
    _checked.append(optuna.__version__)


# -- hosts and processes ----------------------------------------------------------------------
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


# -- the journal file: damage check and repair ------------------------------------------------
def _is_record(line: bytes) -> bool:
    """A whole journal record: a newline-terminated JSON object with an operation code."""
    if not line.endswith(b"\n"):
        return False
    try:
        obj = json.loads(line)
    except (ValueError, RecursionError):  # JSONDecodeError and bad UTF-8 are ValueErrors
        return False
    return isinstance(obj, dict) and isinstance(obj.get("op_code"), int)


@dataclass
class _Damage:
    offset: int  # byte offset of the first damaged line
    line: int  # its 1-based line number
    size: int  # the file's size when scanned
    next_whole: int | None  # line number of a whole record after it (None: a damaged tail)


def _scan(path: str) -> _Damage | None:
    """The first damaged line of a journal, or None when every line is a whole record."""
    offset = 0
    bad: _Damage | None = None
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        for n, line in enumerate(f, start=1):
            if offset + len(line) > size:  # appended while reading: not ours to judge
                break
            if not _is_record(line):
                if bad is None:
                    bad = _Damage(offset, n, size, None)
            elif bad is not None:
                bad.next_whole = n
                return bad
            offset += len(line)
    return bad


def _keep_aside(path: str, data: bytes) -> str:
    """Write ``data`` to a new ``<path>.torn-<time>`` file (synced); returns its name."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for i in range(1000):
        name = f"{path}.torn-{stamp}" + (f"-{i}" if i else "")
        try:
            fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            continue
        try:
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        return name
    raise SearchError(f"cannot find a free name for the torn tail of {path}")


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _cut_tail(path: str, offset: int, line: int) -> str:
    """Move the bytes from ``offset`` to the end aside, truncate there; the lock is held."""
    with open(path, "r+b") as f:
        f.seek(offset)
        tail = f.read()
        kept = _keep_aside(path, tail)
        f.truncate(offset)
        f.flush()
        os.fsync(f.fileno())
    _fsync_dir(path)
    name = os.path.basename(path)
    return (
        f"{name}: its last record was cut short (a crash while writing): {len(tail)} "
        f"byte(s) from line {line} (byte {offset}) moved to {os.path.basename(kept)}; "
        f"the study goes on from the last whole record"
    )


def _middle_error(path: str, d: _Damage) -> SearchError:
    return SearchError(
        f"line {d.line} (byte offset {d.offset}) is not a whole journal record, and whole "
        f"records follow it (line {d.next_whole}); archir does not write after a damaged "
        "record",
        location=Location(file=path, line=d.line),
        hint=f"restore the journal from a copy, or keep the records before the damage "
        f"(later trials are lost): head -c {d.offset} {path} > fixed.journal, then move "
        "fixed.journal in its place",
    )


def check_journal(path: str | Path, lock: JournalFileOpenLock | None = None) -> str | None:
    """Check a journal file; move a torn or unparsable tail aside.

    Scans every line; on damage, takes the journal's lock (the one Optuna uses, so no
    process appends meanwhile) and scans again. A damaged tail — the last line(s) cut short
    or not whole JSON records — is moved to a new ``<path>.torn-<time>`` file and the journal
    truncated to its last whole record.

    Returns:
        A one-line message when the tail was moved aside, else ``None``.

    Raises:
        SearchError: a damaged record followed by whole ones (line and byte offset named),
            or the file cannot be read.
    """
    path = str(path)
    try:
        if not os.path.exists(path) or _scan(path) is None:
            return None
        lock = lock or JournalFileOpenLock(path, 10)
        lock.acquire()
        try:
            d = _scan(path)  # again, now that no one appends
            if d is None:
                return None
            if d.next_whole is not None:
                raise _middle_error(path, d)
            return _cut_tail(path, d.offset, d.line)
        finally:
            lock.release()
    except OSError as exc:
        raise SearchError(
            f"cannot read or repair the journal {path}: {exc.strerror or exc}",
            hint="check the file's permissions and the disk",
        ) from None


class JournalFile(BaseJournalBackend):
    """A journal file with grouped, torn-tail-safe appends.

    Reads go through Optuna's :class:`~optuna.storages.journal.JournalFileBackend`; appends
    take the same :class:`~optuna.storages.journal.JournalFileOpenLock`, cut off a tail left
    torn by a process that died mid-append (kept aside, see :func:`check_journal`), write
    the records as JSON lines and ``fsync``.

    Inside ``with journal.grouped():`` the records written by the calling thread are held
    and appended (one ``fsync``) when the block exits (or with the next trial state change,
    see :meth:`grouped`) — or earlier, together with any record another thread writes
    meanwhile. Reads do not see held records before they are appended (an
    :class:`optuna.Trial` keeps its own copy of its parameters and attributes, so the
    objective is not affected).

    Attributes:
        notes: one-line messages about repairs made (also logged).
        appends: appends made by this process (each one ``fsync``; benchmarks read it).
    """

    def __init__(self, path: str, lock_grace_s: int = 10, say: Callable[[str], None] | None = None):
        self.path = path
        self._lock = JournalFileOpenLock(path, lock_grace_s)
        self._say = say
        self.notes: list[str] = []
        note = check_journal(path, self._lock)
        if note:
            self._note(note)
        self._reader = JournalFileBackend(path, lock_obj=self._lock)
        self._mutex = threading.RLock()
        self._held: list[dict[str, Any]] = []
        self._holder: int | None = None
        self._until_state: int | None = None
        self.appends = 0

    def _note(self, msg: str) -> None:
        self.notes.append(msg)
        if self._say is not None:
            self._say(msg)
        else:
            _log.warning(msg)

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state.update(_mutex=None, _held=[], _holder=None, _until_state=None, _say=None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._mutex = threading.RLock()

    # -- BaseJournalBackend ------------------------------------------------------------------
    def read_logs(self, log_number_from: int) -> Iterator[dict[str, Any]]:
        return iter(self._reader.read_logs(log_number_from))

    def append_logs(self, logs: list[dict[str, Any]]) -> None:
        me = threading.get_ident()
        with self._mutex:
            if self._holder == me:
                self._held.extend(logs)
                return
            if self._until_state == me:
                if not any(log.get("op_code") == _OP_SET_TRIAL_STATE for log in logs):
                    self._held.extend(logs)
                    return
                self._until_state = None
            batch, self._held = [*self._held, *logs], []
            self._write(batch)

    # -- grouping ----------------------------------------------------------------------------
    def flush(self) -> None:
        """Append the held records now (one append)."""
        with self._mutex:
            self._until_state = None
            if self._held:
                batch, self._held = self._held, []
                self._write(batch)

    @contextmanager
    def grouped(self, until_state: bool = False) -> Iterator[None]:
        """Hold this thread's records and append them at once when the block exits — or,
        with ``until_state``, together with this thread's next trial state change (Optuna's
        ``tell`` right after the objective returns: a trial's results and its COMPLETE state
        land in one append, and a kill between the two leaves the trial RUNNING, to be
        retried). Nothing may read the held records back before then."""
        me = threading.get_ident()
        with self._mutex:
            nested = self._holder is not None  # nested or another thread's group
            if not nested:
                self._holder = me
        if nested:
            yield
            return
        ok = False
        try:
            yield
            ok = True
        finally:
            with self._mutex:
                self._holder = None
                if until_state and ok:
                    self._until_state = me
                else:
                    self.flush()

    # -- the write ---------------------------------------------------------------------------
    def _write(self, logs: list[dict[str, Any]]) -> None:
        data = "".join(json.dumps(log, separators=(",", ":")) + "\n" for log in logs)
        raw = data.encode("utf-8")
        self._lock.acquire()
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                size = os.fstat(fd).st_size
                if size and os.pread(fd, 1, size - 1) != b"\n":
                    self._note(self._cut_torn(fd, size))
                view = memoryview(raw)
                while view:
                    view = view[os.write(fd, view) :]
                os.fsync(fd)
            finally:
                os.close(fd)
        finally:
            self._lock.release()
        self.appends += 1

    def _cut_torn(self, fd: int, size: int) -> str:
        """The file does not end with a newline: a writer died mid-append. Find the start of
        the torn line; the lock is held."""
        pos, chunk = size, 1 << 16
        start = 0
        while pos > 0:
            lo = max(0, pos - chunk)
            buf = os.pread(fd, pos - lo, lo)
            i = buf.rfind(b"\n")
            if i >= 0:
                start = lo + i + 1
                break
            pos = lo
        line = 1
        if start:
            line = 1 + sum(
                os.pread(fd, min(chunk, start - p), p).count(b"\n") for p in range(0, start, chunk)
            )
        return _cut_tail(self.path, start, line)


class HeartbeatJournalStorage(JournalStorage, BaseHeartbeat):
    """Optuna's journal storage over a :class:`JournalFile`, plus heartbeats (which the
    journal lacks).

    Heartbeats: a running trial writes an ``archir:heartbeat`` timestamp every
    ``heartbeat_interval`` seconds (the first beat is its start time, which is already
    stored); a RUNNING trial whose last beat is older than ``grace_period`` seconds — or
    whose process on this host no longer exists — is stale, and Optuna marks it FAIL and
    calls ``callback`` (a :class:`RetryHeartbeatStaleTrialCallback` re-enqueues its
    parameters).

    Grouped appends: :meth:`grouped` and :meth:`flush` are the :class:`JournalFile`'s.

    Attributes:
        journal: the :class:`JournalFile`.
        notes: one-line messages about repairs made when the journal was opened.
    """

    def __init__(
        self,
        path: str,
        heartbeat_interval: int,
        grace_period: int,
        callback: Callable[[optuna.Study, FrozenTrial], None] | None,
        say: Callable[[str], None] | None = None,
    ) -> None:
        check_optuna()
        self.journal = JournalFile(path, say=say)
        try:
            super().__init__(self.journal)
        except Exception as exc:  # noqa: BLE001 - Optuna could not replay the file
            d = _scan(path)
            if d is not None and d.next_whole is not None:
                raise _middle_error(path, d) from None
            raise SearchError(
                f"Optuna cannot read the journal {path}: {type(exc).__name__}: "
                f"{str(exc).splitlines()[0][:200] if str(exc) else ''}",
                hint="was it written by another program or a much newer Optuna?",
            ) from None
        self._hb_interval = heartbeat_interval
        self._grace = grace_period
        self._stale_cb = callback
        self._beaten: set[int] = set()

    @property
    def notes(self) -> list[str]:
        return self.journal.notes

    @property
    def appends(self) -> int:
        """Appends (``fsync``s) made by this process."""
        return self.journal.appends

    def flush(self) -> None:
        """Append the held writes now (one append)."""
        self.journal.flush()

    def grouped(self, until_state: bool = False) -> Any:
        """See :meth:`JournalFile.grouped`."""
        return self.journal.grouped(until_state)

    # -- heartbeats (Optuna's BaseHeartbeat, see check_optuna) -----------------------------
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


# -- databases --------------------------------------------------------------------------------
# drivers SQLAlchemy can use for PostgreSQL, in the order tried for a bare postgresql:// URL
_PG_DRIVERS = (("psycopg2", "psycopg2"), ("psycopg", "psycopg"), ("pg8000", "pg8000"))
_PG_INSTALL = "pip install 'archir[postgres]' (installs psycopg2-binary)"
_SCHEMA_LOCK_KEY = 0x61726368  # 'arch': serializes Optuna's table creation per database


def _shown(url: str) -> str:
    """The URL with its password hidden."""
    try:
        from sqlalchemy.engine import make_url

        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # noqa: BLE001 - unparsable: show it as given
        return url


def _resolve_driver(url: str) -> str:
    """The URL with a PostgreSQL driver that is installed.

    Raises:
        SearchError: a PostgreSQL URL and no driver for it (the package to install named).
    """
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError, NoSuchModuleError

    try:
        u = make_url(url)
    except ArgumentError as exc:
        raise SearchError(
            f"cannot open storage {url!r}: not a database URL ({exc})",
            hint="e.g. sqlite:///runs/x.db, postgresql://user:password@host:5432/db",
        ) from None
    scheme, sep, rest = url.partition("://")
    backend, _, driver = u.drivername.partition("+")
    if backend == "postgres":  # a common spelling SQLAlchemy does not accept
        backend = "postgresql"
        scheme = "postgresql" + (f"+{driver}" if driver else "")
    if backend != "postgresql":
        return url  # as given: Optuna fills its own templates
    if not driver:
        for name, module in _PG_DRIVERS:
            if importlib.util.find_spec(module) is not None:
                return f"postgresql+{name}{sep}{rest}"
        raise SearchError(
            f"cannot open storage {_shown(url)!r}: no PostgreSQL driver is installed",
            hint=_PG_INSTALL,
        )
    try:
        u.set(drivername=f"postgresql+{driver}").get_dialect().import_dbapi()
    except NoSuchModuleError:
        raise SearchError(
            f"cannot open storage {_shown(url)!r}: SQLAlchemy has no PostgreSQL driver {driver!r}",
            hint=f"use postgresql:// (or postgresql+psycopg2://) and {_PG_INSTALL}",
        ) from None
    except ImportError as exc:
        raise SearchError(
            f"cannot open storage {_shown(url)!r}: the PostgreSQL driver {driver!r} is not "
            f"installed ({exc})",
            hint=_PG_INSTALL,
        ) from None
    return f"{scheme}{sep}{rest}"


@contextmanager
def _schema_lock(url: str, engine_kwargs: dict[str, Any], wait_s: float = 60.0) -> Iterator[None]:
    """Hold a PostgreSQL advisory lock (per database) while Optuna creates or checks its
    tables, so that processes starting at once on a fresh database do not race on
    ``CREATE TABLE`` and the version rows. Other databases: nothing."""
    if not url.startswith("postgresql"):
        yield
        return
    import sqlalchemy
    from sqlalchemy.pool import NullPool

    engine = sqlalchemy.create_engine(url, poolclass=NullPool, **engine_kwargs)
    try:
        with engine.connect() as conn:
            conn = conn.execution_options(isolation_level="AUTOCOMMIT")
            got = False
            deadline = time.monotonic() + wait_s
            while time.monotonic() < deadline:
                got = bool(
                    conn.execute(
                        sqlalchemy.text("SELECT pg_try_advisory_lock(:k)"),
                        {"k": _SCHEMA_LOCK_KEY},
                    ).scalar()
                )
                if got:
                    break
                time.sleep(0.05 + random.random() * 0.1)
            try:
                yield  # without the lock after wait_s: the retries below still apply
            finally:
                if got:
                    conn.execute(
                        sqlalchemy.text("SELECT pg_advisory_unlock(:k)"), {"k": _SCHEMA_LOCK_KEY}
                    )
    finally:
        engine.dispose()


def _creation_race(exc: Exception) -> bool:
    """An error that two processes creating Optuna's tables at once can cause."""
    from sqlalchemy.exc import IntegrityError, OperationalError, ProgrammingError

    if isinstance(exc, IntegrityError | ProgrammingError):
        return True
    text = str(exc).lower()
    return isinstance(exc, OperationalError) and any(
        w in text for w in ("locked", "deadlock", "already exists", "could not serialize")
    )


def _open_rdb(
    url: str,
    heartbeat_interval: int,
    grace_period: int,
    callback: Callable[[optuna.Study, FrozenTrial], None],
    tries: int = 5,
) -> optuna.storages.RDBStorage:
    full = _resolve_driver(url)
    engine_kwargs: dict[str, Any] = {}
    if full.startswith("postgresql") and "options=" not in full:
        # commit without waiting for the WAL flush: see open_storage
        engine_kwargs["connect_args"] = {"options": "-c synchronous_commit=off"}
    for attempt in range(tries):
        try:
            with _schema_lock(full, engine_kwargs), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                return optuna.storages.RDBStorage(
                    full,
                    engine_kwargs=dict(engine_kwargs),
                    heartbeat_interval=heartbeat_interval,
                    grace_period=grace_period,
                    heartbeat_stale_trial_callback=callback,
                )
        except Exception as exc:  # noqa: BLE001 - sorted below
            if attempt + 1 >= tries or not _creation_race(exc):
                raise
            time.sleep(0.1 * 2**attempt + random.random() * 0.1)
    raise AssertionError("unreachable")


def open_storage(
    url: str | None,
    journal: Path,
    heartbeat_interval: int = 5,
    grace_period: int = 30,
    say: Callable[[str], None] | None = None,
) -> optuna.storages.BaseStorage:
    """The study's storage: a journal file (default) or any Optuna storage URL.

    A journal is checked first (:func:`check_journal`): a torn tail is moved aside and
    ``say`` (default: a logged warning) gets one line about it; the messages are also in
    the storage's ``notes``.

    A ``postgresql://`` URL without a driver uses whichever of psycopg2, psycopg or pg8000
    is installed. Its sessions commit asynchronously (``synchronous_commit=off``): a trial
    makes some 30 small commits, and waiting for each one's WAL flush doubles the trial's
    storage time. A crash of the database server (not of a worker) can then lose the last
    fraction of a second of records, never corrupt them; a trial whose result is lost is
    left RUNNING and retried. A URL with its own ``?options=...`` keeps the server's
    setting (e.g. ``?options=-c%20synchronous_commit%3Don``).

    Raises:
        SearchError: the URL cannot be opened or reached, its driver is missing, or the
            journal is damaged in the middle.
    """
    retry = _retry_callback()
    if url is None or (url.endswith((".journal", ".log")) and "://" not in url):
        path = str(journal if url is None else url)
        return HeartbeatJournalStorage(path, heartbeat_interval, grace_period, retry, say)
    try:
        return _open_rdb(url, heartbeat_interval, grace_period, retry)
    except SearchError:
        raise
    except Exception as exc:  # noqa: BLE001 - any driver/connection failure is a user error
        first = str(exc).splitlines()[0][:200] if str(exc) else ""
        raise SearchError(
            f"cannot open storage {_shown(url)!r}: {type(exc).__name__}: {first}",
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


def fail_stale_trials(study: optuna.Study) -> list[int]:
    """Fail (with a reason: host and pid) and retry once the RUNNING trials whose heartbeat
    stopped — on any host — before Optuna's own pass at the next trial start would fail them
    without a reason. Nothing for a storage without heartbeats.

    Returns the numbers of the trials failed.
    """
    check_optuna()
    storage = study._storage
    if not isinstance(storage, BaseHeartbeat) or storage.get_heartbeat_interval() is None:
        return []
    callback = storage.get_heartbeat_stale_trial_callback()
    done = []
    for tid in storage._get_stale_trial_ids(study._study_id):  # BaseHeartbeat: check_optuna
        t = storage.get_trial(tid)
        host = t.system_attrs.get(ATTR_HOST, "an unknown host")
        pid = t.system_attrs.get(ATTR_PID)
        who = f"process {pid} on host {host}" if pid is not None else f"its process on {host}"
        try:
            with grouped(storage):
                storage.set_trial_user_attr(tid, "status", "failed")
                storage.set_trial_user_attr(
                    tid,
                    "reason",
                    f"its heartbeat stopped ({who} died or hung); configuration retried once",
                )
            if storage.set_trial_state_values(tid, state=TrialState.FAIL):
                if callback is not None:
                    callback(study, storage.get_trial(tid))
                done.append(t.number)
        except optuna.exceptions.UpdateFinishedTrialError:
            pass  # another process failed it first
    return done


def started_system_attrs(trial: optuna.Trial) -> dict[str, Any]:
    """A running trial's system attributes as they were when it started (e.g. ``failed_trial``
    of a retry), without a storage read where Optuna keeps that copy on the trial."""
    cached = getattr(trial, "_cached_frozen_trial", None)  # Optuna's private copy, if any
    if isinstance(cached, FrozenTrial):
        return dict(cached.system_attrs)
    return dict(trial.study._storage.get_trial_system_attrs(trial._trial_id))


__all__ = [
    "fail_stale_trials",
    "started_system_attrs",
    "ATTR_HOST",
    "ATTR_PID",
    "HOST",
    "HeartbeatJournalStorage",
    "JournalFile",
    "check_journal",
    "check_optuna",
    "dead_here",
    "fail_dead_trials",
    "grouped",
    "open_storage",
]
