"""The latency measurement harness: fixed threads, warm-up, time-bounded runs, robust stats.

A measurement of one callable (one forward pass) goes:

1. ``warmup`` untimed calls (allocator, caches, lazy initialisation);
2. timed calls until ``budget_s`` of timed work has passed, at least ``min_runs`` and at most
   ``max_runs`` of them, split into ``windows`` consecutive **windows** of equal budget;
3. statistics over the run times in milliseconds: the **fastest call** ``min_ms`` — the
   latency of this machine when nothing else slows it, the value every record's ``ms``
   carries — and beside it the **median**, the **10 %/10 % trimmed mean** (drop the fastest
   and slowest tenth, average the rest), the **coefficient of variation** (standard deviation
   / mean of that trimmed sample, so one stray slow run from another process does not decide
   it) and the **best window median** ``best_ms`` (the median of the fastest window);
4. when the CV is above ``cv_threshold`` the machine is too noisy to trust: the whole
   measurement is repeated (up to ``max_attempts`` in all) and the attempt with the lowest CV
   is kept; if even that one is above the threshold the result says ``noisy=True``.

Why the fastest call. On a shared machine (a cloud VM, a laptop with a browser open) the
speed of the core changes all the time. On the 2-core VM this was built on, interference
comes and goes within seconds (a 0.8 ms probe met its fastest time, ±0.5 %, in every 5 s
window of 90 s while its median moved by 18 %), its density changes over minutes, and it
slows graphs differently (between the fast and the slow rounds of one measurement, 60
exported specs ran 0.94-1.72× slower: small, overhead-bound graphs the most). A call that
ran while nothing interfered is the graph's own cost, and interference only ever adds time
(with the CPU clock below, not even preemption counts), so the fastest of many calls
estimates it — the :mod:`timeit` rule. It repeats where window statistics do not: the 60
specs measured in two passes of 20 interleaved rounds each (2026-11-27) agreed within ±10 %
for 95 % of them by their fastest call, 87 % by their fastest window's median and 93 % by
their median window; with 10 rounds per pass, 60-93 % (mean 76 %), 35-87 % and 77-97 %
(four passes, every pair). Hence :func:`measure_interleaved` (round-robin windows, each
callable's windows seconds apart; what calibration, the predictor benchmark and a search's
re-measured front use) runs :data:`INTERLEAVED_ROUNDS` = 20 rounds: quiet moments are rare
in the slow phases, and a callable needs many chances to meet one. ``min_ms`` is the value
the predictor is fitted on and the one searches optimise (``latency_ms(...)["ms"]``); on a
loaded or shared machine the user's typical call is slower (the median, up to 1.4× on that
VM), and the median, trimmed mean and CV stay in every record.

**The clock.** With one intra-op thread (the default) onnxruntime and torch compute on the
calling thread, and every call is timed by that thread's CPU time (:func:`clock`,
``time.thread_time``): the time the core spent on the call, which neither another process
taking the core nor a hypervisor's steal adds to. Wall time counts both. On an idle machine
the two agree (within 0.4 % for 60 exported specs); with two other busy processes on the
2-core VM this was built on, a 0.8 ms call's 90th percentile was 5.2 ms by wall time and
1.4 ms by CPU time. What CPU time cannot remove — the core itself running slower for a
while, up to 40 % for whole rounds there — the fastest call and the speed probe handle.
With several threads the work runs on pool threads and the clock is wall time
(``Measurement.clock`` says which).

Runtimes (:func:`measure_spec`): ``"ort"`` — onnxruntime ``CPUExecutionProvider`` on the
graph ``archir export --precision auto`` ships (:func:`export_onnx_file`: the one export
path, dynamic axes, the precision the spec's ``bits`` select), ``"torch"`` — torch eager
under ``torch.no_grad``, ``"compile"`` — ``torch.compile`` (inductor; raises
:class:`RuntimeUnavailableError` where it does not work).
Threads are fixed for the duration: ``torch.set_num_threads`` / ORT ``intra_op_num_threads``
and one inter-op thread.

The approach (warm-up, many runs, robust central value, refuse a noisy machine) follows the
practice of nn-Meter (Zhang et al., 2021, "nn-Meter: towards accurate latency prediction of
deep-learning model inference on diverse edge devices") and of ``timeit``/``pyperf``.
"""

from __future__ import annotations

import math
import os
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from archir.errors import ArchirError

RUNTIMES: tuple[str, ...] = ("ort", "torch", "compile")
DEFAULT_THREADS = 1
DEFAULT_CV_THRESHOLD = 0.05
MIN_CPU_SHARE = 0.85  # one thread: below this share of a core, another process interfered
DEFAULT_WINDOWS = 5
INTERLEAVED_ROUNDS = 20  # calibration and the predictor benchmark agree (module docstring)
INTERLEAVED_WINDOW_S = 0.02
INTERLEAVED_MIN_RUNS = 2

K = TypeVar("K")


def clock(threads: int) -> Callable[[], float]:
    """The timer of one call in seconds (module docstring): the calling thread's CPU time
    (``time.thread_time``) with one intra-op thread, wall time (``time.perf_counter``)
    with more."""
    return time.thread_time if int(threads) <= 1 else time.perf_counter


def clock_name(timer: Callable[[], float]) -> str:
    """``"cpu"`` for the thread CPU clock, ``"wall"`` for anything else."""
    return "cpu" if timer is time.thread_time else "wall"


def timing_defaults(kw: dict[str, Any], threads: int) -> dict[str, Any]:
    """:func:`measure` keywords ``kw`` with the defaults for ``threads``: the
    :func:`clock`, and with one thread timed by wall time, the CPU-share check
    (:data:`MIN_CPU_SHARE`: an attempt another process shared the core with is re-measured;
    the CPU clock does not count that time at all)."""
    kw.setdefault("timer", clock(threads))
    if int(threads) <= 1 and clock_name(kw["timer"]) == "wall":
        kw.setdefault("min_cpu_share", MIN_CPU_SHARE)
    return kw


class LatencyError(ArchirError):
    """Base of the latency errors (bad runtime name, unusable calibration ...)."""


class RuntimeUnavailableError(LatencyError):
    """The requested runtime cannot run this model here (e.g. ``torch.compile`` without a
    working compiler, or an export that fails)."""


@dataclass
class Measurement:
    """The result of one measurement (all times in milliseconds).

    Attributes:
        median_ms: median run time.
        trimmed_mean_ms: mean after dropping the fastest and slowest 10 % of runs.
        cv: coefficient of variation of the trimmed runs (std / mean, unitless).
        runs: number of timed runs of the kept attempt.
        noisy: the CV stayed above the threshold after every attempt.
        attempts: how many measurements were taken (1 + re-measures).
        runtime, threads, batch, seq: what was measured (filled by :func:`measure_spec`).
        cpu_share: process CPU time / wall time of the kept attempt (1.0 when not checked);
            well under 1 with one thread means another process held the core.
        times_ms: the kept attempt's run times, in order.
        best_ms: the median of the fastest window; equal to ``median_ms`` with one window.
        window_ms: each window's median, in order.
        min_ms: the fastest call (the module docstring: the value a record's ``ms`` holds).
        window_min_ms: each window's fastest call, in order.
        clock: ``"cpu"`` (the calling thread's CPU time) or ``"wall"`` (:func:`clock`).
    """

    median_ms: float
    trimmed_mean_ms: float
    cv: float
    runs: int
    noisy: bool
    attempts: int = 1
    runtime: str = ""
    threads: int = DEFAULT_THREADS
    batch: int = 1
    seq: int = 0
    cpu_share: float = 1.0
    times_ms: list[float] = field(default_factory=list, repr=False)
    best_ms: float = 0.0
    window_ms: list[float] = field(default_factory=list)
    clock: str = "wall"
    min_ms: float = 0.0
    window_min_ms: list[float] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.best_ms:
            self.best_ms = self.median_ms

    @property
    def windows(self) -> int:
        """Number of timed windows (1 for a plain list of runs)."""
        return max(1, len(self.window_ms))

    def to_dict(self, times: bool = False) -> dict[str, Any]:
        d = asdict(self)
        if not times:
            d.pop("times_ms")
        return d


def trimmed_mean(xs: list[float], proportion: float = 0.1) -> float:
    """Mean of ``xs`` after removing ``floor(proportion·n)`` values from each end.

    Raises:
        ValueError: ``xs`` is empty.
    """
    return statistics.fmean(_trim(xs, proportion))


def _trim(xs: list[float], proportion: float = 0.1) -> list[float]:
    if not xs:
        raise ValueError("no samples")
    s = sorted(xs)
    k = int(math.floor(proportion * len(s)))
    return s[k : len(s) - k] if len(s) - 2 * k > 0 else s


def coefficient_of_variation(xs: list[float], proportion: float = 0.1) -> float:
    """Population std / mean of the trimmed sample (0 for fewer than two samples)."""
    t = _trim(xs, proportion)
    if len(t) < 2:
        return 0.0
    mean = statistics.fmean(t)
    return statistics.pstdev(t) / mean if mean > 0 else 0.0


def summarize(
    times_ms: list[float],
    cv_threshold: float = DEFAULT_CV_THRESHOLD,
    windows: list[list[float]] | None = None,
) -> Measurement:
    """Statistics of one list of run times (milliseconds); ``windows`` splits the same runs
    into timed windows (``best_ms`` = the smallest window median, ``window_min_ms`` each
    window's fastest call).

    Raises:
        ValueError: no run times.
    """
    cv = coefficient_of_variation(times_ms)
    wins = [float(statistics.median(w)) for w in (windows or []) if w]
    median = float(statistics.median(times_ms))
    return Measurement(
        median_ms=median,
        trimmed_mean_ms=trimmed_mean(times_ms),
        cv=cv,
        runs=len(times_ms),
        noisy=cv > cv_threshold,
        times_ms=list(times_ms),
        best_ms=min(wins) if wins else median,
        window_ms=wins,
        min_ms=min(times_ms),
        window_min_ms=[float(min(w)) for w in (windows or []) if w],
    )


def time_windows(
    fn: Callable[[], Any],
    *,
    warmup: int = 3,
    min_runs: int = 5,
    max_runs: int = 200,
    budget_s: float = 1.0,
    windows: int = 1,
    timer: Callable[[], float] = time.perf_counter,
) -> list[list[float]]:
    """Call ``fn`` ``warmup`` times, then time it until ``budget_s`` seconds of timed calls
    have passed (at least ``min_runs``, at most ``max_runs`` calls), split into ``windows``
    consecutive windows of ``budget_s / windows`` seconds each (each at least
    ``ceil(min_runs / windows)`` calls). ``budget_s`` and ``max_runs`` are shared, so the
    totals stay within them and slow calls get fewer windows. Returns each window's run
    times in milliseconds."""
    for _ in range(warmup):
        fn()
    windows = max(1, int(windows))
    per_min = max(1, math.ceil(min_runs / windows))
    per_budget = budget_s / windows
    out: list[list[float]] = []
    total = 0
    spent = 0.0
    for w in range(windows):
        if total >= min_runs and spent >= budget_s:
            break  # slow calls: fewer windows rather than more than the budget
        times: list[float] = []
        until = per_budget * (w + 1)  # windows share the budget: the total stays budget_s
        cap = max(total + 1, math.ceil(max_runs * (w + 1) / windows))  # shared max_runs
        while total < min(max_runs, cap) and (len(times) < per_min or spent < until):
            t0 = timer()
            fn()
            dt = timer() - t0
            spent += dt
            times.append(dt * 1e3)
            total += 1
        if times:
            out.append(times)
        if total >= max_runs:
            break
    return out


def measure(
    fn: Callable[[], Any],
    *,
    warmup: int = 3,
    min_runs: int = 5,
    max_runs: int = 200,
    budget_s: float = 1.0,
    cv_threshold: float = DEFAULT_CV_THRESHOLD,
    max_attempts: int = 3,
    timer: Callable[[], float] = time.perf_counter,
    min_cpu_share: float | None = None,
    windows: int = DEFAULT_WINDOWS,
) -> Measurement:
    """Measure ``fn`` (see the module docstring); re-measure while the CV is above
    ``cv_threshold`` (or the CPU share below ``min_cpu_share``), keep the best attempt
    (highest CPU share, then lowest CV), flag ``noisy`` if it stays bad.

    Args:
        fn: a no-argument callable doing one forward pass.
        warmup: untimed calls before every attempt.
        min_runs, max_runs: bounds on the timed calls of one attempt.
        budget_s: seconds of timed calls per attempt (the time bound).
        cv_threshold: CV above which an attempt is not trusted (0.05 = 5 %).
        max_attempts: total attempts including the first.
        timer: seconds clock (injectable for tests).
        min_cpu_share: with one intra-op thread, this process's CPU time over the wall
            time of an attempt: below it (e.g. 0.85) another process took the core for part
            of the attempt — a slowdown the CV does not show when it lasts the whole
            attempt — and the attempt counts as noisy. ``None``: not checked.
        windows: timed windows per attempt (``best_ms`` is the fastest window's median).
    """
    best: Measurement | None = None
    attempts = 0
    for _ in range(max(1, max_attempts)):
        attempts += 1
        c0, w0 = time.process_time(), time.perf_counter()
        wins = time_windows(
            fn,
            warmup=warmup,
            min_runs=min_runs,
            max_runs=max_runs,
            budget_s=budget_s,
            windows=windows,
            timer=timer,
        )
        wall = time.perf_counter() - w0
        m = summarize([t for w in wins for t in w], cv_threshold, wins)
        m.clock = clock_name(timer)
        if min_cpu_share is not None and wall > 0:
            m.cpu_share = (time.process_time() - c0) / wall
            m.noisy = m.noisy or m.cpu_share < min_cpu_share
        if best is None or (m.cpu_share, -m.cv) > (best.cpu_share, -best.cv):
            best = m
        if not m.noisy:
            break
    assert best is not None
    best.attempts = attempts
    best.noisy = best.cv > cv_threshold or (
        min_cpu_share is not None and best.cpu_share < min_cpu_share
    )
    return best


def measure_interleaved(
    fns: Mapping[K, Callable[[], Any]],
    *,
    rounds: int = INTERLEAVED_ROUNDS,
    window_s: float = INTERLEAVED_WINDOW_S,
    min_runs: int = INTERLEAVED_MIN_RUNS,
    warmup: int = 2,
    budget_s: float | None = None,
    min_rounds: int = 3,
    min_round_s: float = 0.0,
    cv_threshold: float = DEFAULT_CV_THRESHOLD,
    probe: Callable[[], Any] | None = None,
    probe_ref_ms: float | None = None,
    max_rounds: int | None = None,
    min_fast_rounds: int = 2,
    probe_stats: dict[str, Any] | None = None,
    timer: Callable[[], float] = time.perf_counter,
    progress: Callable[[int, float], None] | None = None,
) -> dict[K, Measurement]:
    """Measure many callables in round-robin **windows**: round after round, each callable
    gets one window (at least ``min_runs`` calls and ``window_s`` seconds), so the windows of
    one callable are a whole round — seconds — apart and a slow phase of the machine cannot
    cover all of them (module docstring). ``min_ms`` of each result is its fastest call,
    ``best_ms`` its fastest window's median, ``median_ms``/``trimmed_mean_ms``/``cv`` are
    over all its runs, ``window_ms`` / ``window_min_ms`` hold one median / fastest call per
    round. The fastest call depends on ``rounds`` (more rounds, more chances to meet a quiet
    moment: the module docstring), so everything compared with the predictor uses the
    defaults. ``noisy`` when no second window's fastest call comes within ``cv_threshold`` of
    the fastest (it is then unconfirmed).

    **Speed probe.** A slow phase can outlast a whole measurement (on the machine this was
    built on, one lasted over a minute: 50 specs measured 10 % slow in every window). With
    ``probe`` (a fixed reference model, :class:`SpeedProbe`) each round also times the probe;
    a round is *fast* when the probe's window is within ``cv_threshold`` of
    ``probe_ref_ms`` (e.g. the probe's time during calibration; default: its fastest window
    here). Rounds continue past ``rounds`` until ``min_fast_rounds`` of them were fast or
    ``max_rounds`` is reached; in the latter case every result is ``noisy``.

    Args:
        fns: key -> no-argument callable (one forward pass each).
        rounds: rounds wanted.
        window_s, min_runs: the size of one window.
        warmup: untimed calls per callable before the first round.
        budget_s: stop starting new rounds after this many seconds (but do at least
            ``min_rounds`` rounds); ``None``: no time limit.
        min_round_s: a round shorter than this is followed by a pause (idle, not timed),
            so that a few callables still get windows spread over seconds.
        probe, probe_ref_ms, max_rounds, min_fast_rounds: the speed probe (above);
            ``max_rounds`` defaults to ``3 * rounds``.
        probe_stats: if given, receives the probe's ``window_ms``, ``best_ms``,
            ``fast_rounds`` and ``rounds``.
        progress: called after each round with (rounds done, seconds so far).

    Raises:
        ValueError: ``fns`` is empty.
    """
    if not fns:
        raise ValueError("nothing to measure")
    t0 = time.perf_counter()
    for f in [*fns.values(), *([probe] if probe else [])]:
        for _ in range(warmup):
            f()
    wins: dict[K, list[list[float]]] = {k: [] for k in fns}
    pwins: list[float] = []
    limit = max(1, rounds) if probe is None else max(rounds, max_rounds or 3 * rounds)
    fast = 0

    def window(f: Callable[[], Any]) -> list[float]:
        return time_windows(f, warmup=0, min_runs=min_runs, budget_s=window_s, timer=timer)[0]

    last = time.perf_counter()
    for r in range(limit):
        if r >= min_rounds and budget_s is not None and time.perf_counter() - t0 > budget_s:
            break
        if r >= max(1, rounds) and (probe is None or fast >= min_fast_rounds):
            break
        tr = time.perf_counter()
        if r and min_round_s > 0:
            time.sleep(max(0.0, min_round_s - (tr - last)))
        last = time.perf_counter()
        if probe is not None:
            pwins.append(float(statistics.median(window(probe))))
        for k, f in fns.items():
            wins[k].append(window(f))
        if probe is not None:
            ref = probe_ref_ms or min(pwins)
            fast = sum(1 for p in pwins if p <= ref * (1 + cv_threshold))
        if progress:
            progress(r + 1, time.perf_counter() - t0)
    slow_machine = probe is not None and fast < min_fast_rounds
    if probe_stats is not None and pwins:
        probe_stats.update(window_ms=pwins, best_ms=min(pwins), fast_rounds=fast, rounds=len(pwins))
    out: dict[K, Measurement] = {}
    for k, ws in wins.items():
        m = summarize([t for w in ws for t in w], cv_threshold, ws)
        m.clock = clock_name(timer)
        # a spread across rounds is what the fastest call is for; untrusted is a fastest call
        # that no other window's fastest call confirms within the threshold
        best2 = sorted(m.window_min_ms)[:2]
        m.noisy = slow_machine or (len(best2) == 2 and best2[1] > best2[0] * (1 + cv_threshold))
        out[k] = m
    return out


def _close_tmp(self: Any) -> None:
    """Remove the object's temporary directory (``_tmp``) once."""
    if self._tmp is not None:
        self._tmp.cleanup()
        self._tmp = None


class SpeedProbe:
    """A fixed reference model — two MLP blocks (256 -> 512 -> 256, GELU) on a ``[1, 64,
    256]`` input, 2 MB of fp32 weights, ~1 ms on one core — timed alongside measurements to
    tell the machine's current speed (:func:`measure_interleaved`). Calibration files store
    its best time; a later measurement compares against it. Use as a context manager.

    Raises:
        RuntimeUnavailableError: the runtime cannot run it.
    """

    def __init__(self, runtime: str = "ort", threads: int = DEFAULT_THREADS) -> None:
        import torch
        from torch import nn

        gen = torch.Generator().manual_seed(0)
        blocks = []
        for _ in range(2):
            blocks += [nn.Linear(256, 512), nn.GELU(), nn.Linear(512, 256)]
        self.module = nn.Sequential(*blocks).eval()
        with torch.no_grad():
            for p in self.module.parameters():
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
        self.x = torch.randn(1, 64, 256, generator=gen)
        from exporters.latency.parts import module_callable

        self._tmp: tempfile.TemporaryDirectory[str] | None = tempfile.TemporaryDirectory(
            prefix="archir-probe-"
        )
        self._fn = module_callable(self.module, self.x, runtime, threads, self._tmp.name)

    def __call__(self) -> Any:
        return self._fn()

    close = _close_tmp

    def __enter__(self) -> SpeedProbe:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@contextmanager
def time_limit(seconds: float) -> Iterator[None]:
    """Raise :class:`TimeoutError` in the main thread after ``seconds`` (SIGALRM; a no-op
    off the main thread or without SIGALRM). Interrupts at the next Python bytecode, so a
    single long native kernel finishes first."""
    import signal
    import threading

    if seconds <= 0 or not hasattr(signal, "setitimer"):
        yield
        return
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: Any) -> None:
        raise TimeoutError(f"took longer than {seconds:.0f} s")

    old = signal.signal(signal.SIGALRM, handler)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


# --------------------------------------------------------------------------------------
# runtimes


@contextmanager
def torch_threads(threads: int) -> Iterator[None]:
    """Fix torch intra-op threads (and inter-op to 1 where still allowed) for a block."""
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(max(1, int(threads)))
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:
        pass  # can only be set before the first parallel work; intra-op is what matters
    try:
        yield
    finally:
        torch.set_num_threads(old)


def example_tokens(spec_model: Any, batch: int, seq: int) -> Any:
    """Deterministic model input: tokens ``[batch, seq]`` int64 or images
    ``[batch, C, H, W]`` float32."""
    import torch

    m = spec_model.model
    gen = torch.Generator().manual_seed(0)
    if m.task == "image_classification":
        return torch.randn(batch, m.channels, m.image_size, m.image_size, generator=gen)
    return torch.randint(0, max(1, m.vocab_size), (batch, seq), generator=gen)


def default_seq(spec_model: Any, seq: int | None) -> int:
    """``seq`` or the spec's ``train.seq_len``, capped at ``max_seq_len``."""
    m = spec_model.model
    s = int(seq or spec_model.train.seq_len)
    return max(1, min(s, m.max_seq_len))


def export_onnx_file(
    spec: Any, path: str | Path, model: Any = None, precision: str = "auto"
) -> str:
    """Write the ONNX graph that onnxruntime measurements of a whole spec run: the graph
    ``archir export --precision auto`` ships — the one export path
    (:func:`exporters.graph.model_graph`: torch.export, dynamic ``batch`` and ``seq``,
    constant weights folded), reduced to the precision the spec's per-block ``bits`` select
    (or ``precision``) — without the parity check and metadata. Returns the exporter used.

    Raises:
        RuntimeUnavailableError: the export or the quantizer fails.
    """
    import onnx

    import archir
    from exporters.graph import model_graph, ship_precision
    from exporters.onnx_export import _example_input, block_bits

    mod = model if model is not None else archir.compile(spec)
    was_training = mod.training
    mod.eval()
    try:
        ex = model_graph(spec.model, mod, _example_input(spec.model))
        proto, _ = ship_precision(ex.proto, block_bits(mod), precision)
    except ArchirError as exc:
        raise RuntimeUnavailableError(
            f"ONNX export of '{spec.name}' failed: {exc}", hint="measure with --runtime torch"
        ) from exc
    finally:
        mod.train(was_training)
    onnx.save(proto, str(path))
    return ex.exporter


def onnx_file_callable(
    path: str | Path, spec_model: Any, batch: int, seq: int, threads: int
) -> Callable[[], Any]:
    """A no-argument callable running an exported model file on onnxruntime
    (:func:`ort_session`) with :func:`example_tokens` ``[batch, seq]``; called once here,
    so a file that does not run fails now.

    Raises:
        whatever onnxruntime raises for a file it cannot load or run.
    """
    sess = ort_session(path, threads)
    feed = {sess.get_inputs()[0].name: example_tokens(spec_model, batch, seq).numpy()}

    def run() -> Any:
        return sess.run(None, feed)

    run()
    return run


def ort_session(path: str | Path, threads: int) -> Any:
    """An onnxruntime CPU session with fixed intra-op threads and one inter-op thread."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = max(1, int(threads))
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.log_severity_level = 3
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


class Runner:
    """A prepared model on one runtime, callable at several (batch, seq) shapes.

    Building it does the expensive part once (compile, export, session); :meth:`measure`
    then times one input shape. On onnxruntime the graph is the shipped one
    (:func:`export_onnx_file`: dynamic axes, so one session serves every shape, at the
    precision the spec's ``bits`` select unless ``precision`` says otherwise), or
    ``onnx_file`` when given: a graph :func:`export_onnx_file` wrote already (the
    calibration's export processes), which the runner reads and does not remove. Use as a
    context manager to remove the temporary ONNX file.
    """

    def __init__(
        self,
        spec: Any,
        runtime: str = "ort",
        *,
        threads: int = DEFAULT_THREADS,
        precision: str = "auto",
        model: Any = None,
        onnx_file: str | Path | None = None,
    ) -> None:
        import archir

        if runtime not in RUNTIMES:
            raise LatencyError(
                f"unknown runtime '{runtime}'", hint=f"use one of {', '.join(RUNTIMES)}"
            )
        self.spec = spec
        self.runtime = runtime
        self.threads = int(threads)
        self.exporter_used: str | None = None
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        self._sm = spec.model
        if onnx_file is not None and runtime == "ort":  # exported already (calibration)
            self.model = model
            self.session = ort_session(onnx_file, self.threads)
            return
        with torch_threads(self.threads):
            self.model = model if model is not None else archir.compile(spec)
            self.model.eval()
            if runtime == "ort":
                self._tmp = tempfile.TemporaryDirectory(prefix="archir-lat-")
                path = Path(self._tmp.name) / "model.onnx"
                try:
                    self.exporter_used = export_onnx_file(spec, path, self.model, precision)
                except BaseException:
                    self.close()
                    raise
                self.session = ort_session(path, self.threads)
            elif runtime == "compile":
                import torch

                try:
                    self.fn = torch.compile(self.model)
                except Exception as exc:  # pragma: no cover - depends on the toolchain
                    raise RuntimeUnavailableError(f"torch.compile failed: {exc}") from exc

    close = _close_tmp

    def __enter__(self) -> Runner:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def call_for(self, batch: int, seq: int) -> Callable[[], Any]:
        """A no-argument callable running one forward pass at ``[batch, seq]``."""
        import torch

        x = example_tokens(self._sm, batch, seq)
        if self._sm.model.task != "image_classification":
            from exporters.parity import check_seq_len

            check_seq_len(seq, self._sm.model.max_seq_len, "tokens", self.spec.name)
        if self.runtime == "ort":
            sess = self.session
            feed = {sess.get_inputs()[0].name: x.numpy()}
            return lambda: sess.run(None, feed)
        fn = self.fn if self.runtime == "compile" else self.model

        def run() -> Any:
            with torch.no_grad():
                return fn(x)

        return run

    def measure(self, batch: int = 1, seq: int | None = None, **kw: Any) -> Measurement:
        """Measure one input shape (keywords go to :func:`measure`).

        Raises:
            RuntimeUnavailableError: the runtime fails on this input (e.g. torch.compile).
        """
        s = default_seq(self._sm, seq)
        timing_defaults(kw, self.threads)
        with torch_threads(self.threads):
            fn = self.call_for(batch, s)
            try:
                m = measure(fn, **kw)
            except ArchirError:
                raise
            except Exception as exc:
                if self.runtime == "compile":
                    raise RuntimeUnavailableError(
                        f"torch.compile does not run this model here: {type(exc).__name__}",
                        hint="use --runtime torch",
                    ) from exc
                raise
        m.runtime, m.threads, m.batch, m.seq = self.runtime, self.threads, batch, s
        return m


def measure_spec(
    spec: Any,
    runtime: str = "ort",
    *,
    batch: int = 1,
    seq: int | None = None,
    threads: int = DEFAULT_THREADS,
    precision: str = "auto",
    **kw: Any,
) -> Measurement:
    """Measured latency of one forward pass of a concrete spec on ``runtime``.

    Args:
        spec: a concrete :class:`archir.Spec`.
        runtime: ``"ort"``, ``"torch"`` or ``"compile"``.
        batch, seq: input shape ``[batch, seq]`` (seq defaults to ``train.seq_len``, capped
            at ``max_seq_len``).
        threads: intra-op threads.
        precision: onnxruntime graph precision: ``auto`` (what the spec's per-block
            ``bits`` ship as, :mod:`exporters.quantize`) or ``fp32``/``fp16``/``int8``/
            ``int4``.
        kw: :func:`measure` options (``budget_s``, ``cv_threshold`` ...).

    Raises:
        LatencyError: unknown runtime; RuntimeUnavailableError: export/compile failure.
    """
    os.environ.setdefault("OMP_NUM_THREADS", str(threads))
    with Runner(spec, runtime, threads=threads, precision=precision) as r:
        return r.measure(batch, seq, **kw)
