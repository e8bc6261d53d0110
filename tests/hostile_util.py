"""Harness for the hostile-input suite (issue 11): run the ``archir`` command line on bad
input and check the outcome a user should get.

Two ways to run a case:

- :func:`run_cli` — in this process (fast: no interpreter start), through
  ``archir.cli.main``; returns exit code, stdout, stderr, wall time and the peak of Python
  allocations (``tracemalloc``) during the call.
- :func:`run_cli_subprocess` — a fresh ``python -m archir.cli`` with an address-space limit
  (``RLIMIT_AS``) and a wall-clock timeout, for inputs that could hang or eat memory; returns
  the same fields, with the child's own peak resident memory (``VmHWM``).

:func:`assert_refused` checks the contract: exit 2, one located line on stderr starting
``error:`` (or argparse's ``archir ...: error:``), no traceback, within time and memory.
"""

from __future__ import annotations

import contextlib
import gc
import io
import os
import subprocess
import sys
import tempfile
import time
import tracemalloc
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

#: bounds for a refused input (issue 11: "well under a second and under ~200 MB")
MAX_SECONDS = 1.0
MAX_MB = 200.0


@dataclass
class Outcome:
    rc: int
    out: str
    err: str
    seconds: float  # CPU seconds of the calling thread (in-process) or wall (subprocess)
    peak_mb: float  # Python allocations (in-process) or peak RSS (subprocess)

    @property
    def lines(self) -> list[str]:
        return [ln for ln in self.err.splitlines() if ln.strip()]


def run_cli(args: list[str], cwd: str | Path | None = None) -> Outcome:
    """``archir ARGS`` in this process; ``SystemExit`` from argparse becomes the exit code.

    ``seconds`` is the CPU time of this thread, the work the command did: wall time swings
    with whatever else the machine runs (other test workers, their searches' processes),
    and a refusal's bound is about the work, not the machine's load."""
    from archir.cli import main

    out, err = io.StringIO(), io.StringIO()
    old = os.getcwd()
    if cwd is not None:
        os.chdir(cwd)
    # the objects earlier tests left in this process are not the command's: frozen, a
    # collection the command triggers does not walk them (nor count them in its time)
    gc.collect()
    gc.freeze()
    tracemalloc.start()
    t0 = time.thread_time()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                rc = int(main([str(a) for a in args]) or 0)
            except SystemExit as exc:
                rc = int(exc.code) if isinstance(exc.code, int) else (0 if exc.code is None else 2)
    finally:
        seconds = time.thread_time() - t0
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        gc.unfreeze()
        os.chdir(old)
    return Outcome(rc, out.getvalue(), err.getvalue(), seconds, peak / 2**20)


def run_cli_subprocess(
    args: list[str],
    cwd: str | Path | None = None,
    timeout: float = 60.0,
    mem_limit_mb: int = 4096,
    stdin: int | None = subprocess.DEVNULL,
) -> Outcome:
    """``python -m archir.cli ARGS`` in a child limited to ``mem_limit_mb`` of address space.

    Raises:
        subprocess.TimeoutExpired: the child ran past ``timeout`` (a hang: a failure).
    """

    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "OMP_NUM_THREADS": "1",
        "ARCHIR_TEST_MEM_LIMIT": str(mem_limit_mb * 2**20),
    }
    with (
        tempfile.TemporaryFile("w+") as fout,
        tempfile.TemporaryFile("w+") as ferr,
        tempfile.NamedTemporaryFile("r", suffix=".hwm") as fhwm,
    ):
        env["ARCHIR_TEST_HWM"] = fhwm.name
        t0 = time.perf_counter()
        p = subprocess.Popen(
            [sys.executable, "-c", _LAUNCHER, *[str(a) for a in args]],
            cwd=cwd,
            env=env,
            stdin=stdin,
            stdout=fout,
            stderr=ferr,
            text=True,
        )
        try:
            p.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
            raise
        seconds = time.perf_counter() - t0
        fout.seek(0)
        ferr.seek(0)
        out, err = fout.read(), ferr.read()
        hwm = fhwm.read().strip()
    # the child's own high-water mark (VmHWM, written at exit); ru_maxrss would include the
    # memory of the pytest process it was forked from
    peak_mb = int(hwm) / 1024.0 if hwm.isdigit() else float("nan")
    return Outcome(p.returncode, out, err, seconds, peak_mb)


#: runs ``archir.cli.main`` under an address-space limit and writes its peak resident memory
#: (``VmHWM``, kB) to the file named by ``ARCHIR_TEST_HWM`` when it exits
_LAUNCHER = """
import atexit, os, resource, sys
lim = int(os.environ["ARCHIR_TEST_MEM_LIMIT"])
resource.setrlimit(resource.RLIMIT_AS, (lim, lim))
def _hwm():
    with open("/proc/self/status") as f:
        kb = next((ln.split()[1] for ln in f if ln.startswith("VmHWM:")), "")
    with open(os.environ["ARCHIR_TEST_HWM"], "w") as out:
        out.write(kb)
atexit.register(_hwm)
from archir.cli import main
sys.exit(main(sys.argv[1:]))
"""


def assert_refused(
    o: Outcome,
    *,
    contains: str | None = None,
    max_seconds: float = MAX_SECONDS,
    max_mb: float = MAX_MB,
    max_lines: int = 2,
) -> None:
    """Exit 2, ``error`` in a short message (``max_lines`` lines), no traceback, bounds met."""
    assert o.rc == 2, f"exit {o.rc}, stderr: {o.err[-2000:]!r}"
    assert "Traceback" not in o.err, o.err[-3000:]
    assert 1 <= len(o.lines) <= max_lines, o.err[-2000:]
    assert "error" in o.lines[0], o.err
    if contains is not None:
        assert contains in o.err, f"{contains!r} not in {o.err!r}"
    assert o.seconds < max_seconds, f"took {o.seconds:.2f} s"
    assert o.peak_mb < max_mb, f"peak {o.peak_mb:.0f} MB"
