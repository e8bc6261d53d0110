"""Latency you can trust: a measurement harness and a calibrated predictor.

``latency_ms(spec)`` is what searchers call::

    from exporters.latency import latency_ms
    latency_ms(spec, runtime="ort")          # predicted if a calibration matches, else measured
    latency_ms(spec, predict=False)          # always measured
    latency_ms(spec, predict=True)           # predicted, or CalibrationMissingError

Modules: :mod:`.harness` (measurement), :mod:`.predictor` (per-node model + learned
correction), :mod:`.calibrate` (designed calibration set, versioned files keyed by machine).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from exporters.latency.calibrate import (
    CalibrationError,
    CalibrationFormatError,
    CalibrationMismatchError,
    CalibrationMissingError,
    calibrate,
    default_path,
    find_calibration,
    load_calibration,
    machine_key,
    predictor_from,
)
from exporters.latency.harness import (
    DEFAULT_THREADS,
    LatencyError,
    Measurement,
    RuntimeUnavailableError,
    clock,
    clock_name,
    default_seq,
    measure,
    measure_interleaved,
    measure_spec,
)
from exporters.latency.predictor import LatencyPredictor, Prediction, graph_features


def predict_spec(
    spec: Any,
    runtime: str = "ort",
    *,
    batch: int = 1,
    seq: int | None = None,
    threads: int = DEFAULT_THREADS,
    calibration: str | Path | None = None,
) -> Prediction:
    """Predicted latency of a concrete spec from the matching calibration.

    Raises:
        CalibrationMissingError: no calibration file for this machine/runtime/threads.
        CalibrationMismatchError / CalibrationFormatError: the file does not fit.
    """
    path = Path(calibration) if calibration else find_calibration(runtime, threads)
    if path is None:
        raise CalibrationMissingError(
            f"no latency calibration for runtime '{runtime}' with {threads} thread(s) on this "
            f"machine (looked for {default_path(runtime, threads)})",
            hint=f"run `archir latency calibrate --runtime {runtime} --threads {threads}`",
        )
    data = load_calibration(path, runtime=runtime, threads=threads)
    s = default_seq(spec.model, seq)
    return predictor_from(data).predict(graph_features(spec, batch, s))


def latency_ms(
    spec: Any,
    runtime: str = "ort",
    predict: bool | None = None,
    batch: int = 1,
    seq: int | None = None,
    threads: int = DEFAULT_THREADS,
    *,
    calibration: str | Path | None = None,
    **measure_kw: Any,
) -> dict[str, Any]:
    """Latency of one forward pass of ``spec`` at ``[batch, seq]`` in milliseconds.

    Args:
        spec: a concrete :class:`archir.Spec`.
        runtime: ``"ort"`` (onnxruntime on the exported model) or ``"torch"`` (eager).
        predict: ``None`` — predicted when a matching calibration exists, else measured;
            ``True`` — predicted (raises when no calibration matches); ``False`` — measured.
        batch, seq: input shape (seq defaults to ``train.seq_len`` capped at max_seq_len).
        threads: intra-op threads (calibrations are per thread count).
        calibration: a calibration file instead of the default one for this machine.
        measure_kw: :func:`~.harness.measure` options when measuring (``budget_s`` ...).

    Returns:
        ``{"ms", "min_ms", "best_ms", "median_ms", "trimmed_mean_ms", "cv", "runs", "noisy",
        "clock", "predicted", "band_ms"}``. ``ms`` is the value to optimise or constrain: for a
        prediction the predicted latency (and min = best = median = trimmed mean = it, ``cv``
        0, ``runs`` 0, ``band_ms`` the 90 % band); for a measurement the fastest call
        (:mod:`.harness`: the machine's speed without other load — what the predictor is
        fitted on), with ``band_ms`` the (10th, 90th) percentile of the run times.
        ``clock``: what timed it (:func:`~.harness.clock`: ``"cpu"``, the calling
        thread's CPU time, with one thread; ``"wall"`` with more); a prediction says the
        clock of its calibration.

    Raises:
        LatencyError subclasses: unknown runtime, export failure, missing or mismatched
        calibration when ``predict=True``.
    """
    if predict is not False:
        try:
            p = predict_spec(
                spec, runtime, batch=batch, seq=seq, threads=threads, calibration=calibration
            )
        except CalibrationError:
            if predict:
                raise
        else:
            return {
                "ms": p.ms,
                "min_ms": p.ms,
                "best_ms": p.ms,
                "median_ms": p.ms,
                "trimmed_mean_ms": p.ms,
                "cv": 0.0,
                "runs": 0,
                "noisy": False,
                "clock": clock_name(clock(threads)),
                "predicted": True,
                "band_ms": p.band_ms,
                "extrapolated": p.extrapolated,
            }
    m = measure_spec(spec, runtime, batch=batch, seq=seq, threads=threads, **measure_kw)
    return measurement_record(m)


def measurement_record(m: Measurement) -> dict[str, Any]:
    """A :class:`Measurement` as :func:`latency_ms`'s record (``ms`` = ``min_ms``, the
    fastest call)."""
    ts = sorted(m.times_ms)
    lo = ts[int(0.1 * (len(ts) - 1))]
    hi = ts[int(round(0.9 * (len(ts) - 1)))]
    return {
        "ms": m.min_ms,
        "min_ms": m.min_ms,
        "best_ms": m.best_ms,
        "median_ms": m.median_ms,
        "trimmed_mean_ms": m.trimmed_mean_ms,
        "cv": m.cv,
        "runs": m.runs,
        "windows": m.windows,
        "noisy": m.noisy,
        "clock": m.clock,
        "predicted": False,
        "band_ms": (lo, hi),
    }


__all__ = [
    "CalibrationError",
    "CalibrationFormatError",
    "CalibrationMismatchError",
    "CalibrationMissingError",
    "LatencyError",
    "LatencyPredictor",
    "Measurement",
    "Prediction",
    "RuntimeUnavailableError",
    "calibrate",
    "graph_features",
    "latency_ms",
    "load_calibration",
    "machine_key",
    "measure",
    "measure_interleaved",
    "measure_spec",
    "measurement_record",
    "predict_spec",
]
