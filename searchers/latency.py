"""The ``latency_ms`` objective of a search, from :mod:`exporters.latency`.

Measurement and prediction live in the exporters package (warm-up, time-bounded runs,
median / trimmed mean / CV, noisy-machine retries, the calibrated predictor); this module only
decides how a search asks for them, from the spec's ``search.latency`` section:

* **during the search** (every trial, :func:`trial_latency`): predicted when
  ``latency.predict`` allows it and a calibration for this machine, runtime and thread count
  exists (``predict: null``, the default) or is required (``predict: true``); otherwise
  measured on ``latency.runtime`` (``torch`` eager by default: no export per trial) with
  ``warmup`` untimed runs and exactly ``repeats`` timed runs, one attempt — a quick screen;
* **before the front is reported** (:func:`remeasure_all`): every Pareto member is measured
  again, never predicted, all of them together in round-robin windows
  (:func:`exporters.latency.harness.measure_interleaved`, its default
  ``INTERLEAVED_ROUNDS`` rounds, at least ``REMEASURE_MIN_ROUND_S`` apart) so a slow phase
  of the machine cannot favour one member over another, DESIGN.md §7, and with the speed
  probe (more rounds until two ran at the calibrated speed, :func:`_measure_together`);
* **after the best model is exported** (:func:`shipped_latency`): ``best/model.onnx``, at
  the precision its bits select, timed on onnxruntime at the same shape and threads
  (``best/report.json`` ``shipped_latency``) — with the default ``runtime: torch`` the
  numbers above are eager fp32, and this one is what the user gets.

The value used is the record's ``ms`` in milliseconds: the predicted value, or for a
measurement the fastest call (the machine's speed without other load, what the predictor is
fitted on: :mod:`exporters.latency.harness`); the whole record (``median_ms``,
``trimmed_mean_ms``, ``cv``, ``runs``, ``noisy``, ``predicted``, ``band_ms``) is kept in the
trial's metrics.
"""

from __future__ import annotations

from contextlib import ExitStack
from typing import Any

from archir.errors import SearchError

REMEASURE_MIN_ROUND_S = 0.25  # a front of a few members still gets windows seconds apart


def _seq(lat: Any, train_seq: int) -> int:
    return int(lat.seq_len or train_seq)


def check_available(lat: Any) -> None:
    """Refuse a search that requires predicted latency without a calibration.

    Raises:
        SearchError: ``latency.predict: true`` and no calibration for this machine, or one
            that cannot be used (older format, another CPU/runtime/thread count).
    """
    if lat.predict is not True:
        return
    from exporters.latency import find_calibration

    path = find_calibration(lat.runtime, lat.threads)
    if path is not None:
        from exporters.latency import CalibrationError, load_calibration

        try:
            load_calibration(path, runtime=lat.runtime, threads=lat.threads)
        except CalibrationError as exc:
            raise SearchError(
                "search.latency.predict is true but the latency calibration cannot be used: "
                + exc.message,
                hint=exc.hint,
            ) from None
        return
    raise SearchError(
        f"search.latency.predict is true but there is no latency calibration for runtime "
        f"'{lat.runtime}' with {lat.threads} thread(s) on this machine",
        hint=f"run `archir latency calibrate --runtime {lat.runtime} --threads "
        f"{lat.threads}`, or set search.latency.predict to null/false",
    )


def trial_latency(spec: Any, lat: Any, train_seq: int, model: Any = None) -> dict[str, Any]:
    """Latency of a concrete spec during a search (quick screen; see the module docstring).

    Args:
        spec: a concrete :class:`archir.Spec`.
        lat: the ``search.latency`` section.
        train_seq: ``train.seq_len`` (the default sequence length).
        model: the already compiled module, reused for a torch measurement.

    Returns:
        :func:`exporters.latency.latency_ms`'s record (``ms`` is the objective).

    Raises:
        LatencyError subclasses (ArchirError): export failure, missing calibration when
            ``predict`` is true.
    """
    from exporters.latency import latency_ms

    seq = _seq(lat, train_seq)
    quick = {
        "warmup": lat.warmup,
        "min_runs": lat.repeats,
        "max_runs": lat.repeats,
        "max_attempts": 1,
    }
    if lat.predict is True:
        return latency_ms(
            spec, lat.runtime, predict=True, batch=lat.batch, seq=seq, threads=lat.threads
        )
    if lat.predict is None and has_calibration(lat):
        from exporters.latency import CalibrationError

        try:
            return latency_ms(
                spec, lat.runtime, predict=True, batch=lat.batch, seq=seq, threads=lat.threads
            )
        except CalibrationError:
            pass  # a stale file (older format, other machine): measure instead
    if lat.runtime == "torch" and model is not None:
        return _record(_measure_model(spec, model, lat, seq, quick))
    return latency_ms(
        spec,
        lat.runtime,
        predict=False,
        batch=lat.batch,
        seq=seq,
        threads=lat.threads,
        **quick,
    )


def remeasure_all(
    specs: dict[int, Any], lat: Any, train_seq: int, models: dict[int, Any] | None = None
) -> tuple[dict[int, dict[str, Any]], dict[int, str]]:
    """Measured latency of several concrete specs (a Pareto front), never predicted,
    interleaved (:func:`_measure_together`: the calibration's rounds, at least
    ``REMEASURE_MIN_ROUND_S`` apart, in which every spec gets one window — the statistic
    calibration samples get). ``models``: compiled models by key (trained weights) to
    measure instead of compiling the spec afresh.

    Returns:
        (records by key as :func:`exporters.latency.latency_ms` returns them, error message
        by key for the specs that could not be measured — export failure and the like).
    """
    from archir.errors import ArchirError
    from exporters.latency.harness import Runner, torch_threads

    seq = _seq(lat, train_seq)
    errors: dict[int, str] = {}
    fns: dict[int, Any] = {}
    with ExitStack() as stack:
        for k, spec in specs.items():
            try:
                model = (models or {}).get(k)
                r = stack.enter_context(Runner(spec, lat.runtime, threads=lat.threads, model=model))
                with torch_threads(lat.threads):
                    fns[k] = r.call_for(lat.batch, seq)
            except ArchirError as exc:
                errors[k] = str(exc)
        if not fns:
            return {}, errors
        with torch_threads(lat.threads):
            return _measure_together(fns, lat), errors


def probe_reference_ms(lat: Any) -> float | None:
    """The speed probe's fastest time in this machine's calibration for ``lat``'s runtime
    and threads (ms): the machine's speed when it was calibrated; ``None`` without a usable
    calibration."""
    from exporters.latency import find_calibration
    from exporters.latency.calibrate import CalibrationError, load_calibration

    path = find_calibration(lat.runtime, lat.threads)
    if path is None:
        return None
    try:
        ref = load_calibration(path, runtime=lat.runtime, threads=lat.threads).get("probe_ms")
    except (CalibrationError, OSError):
        return None
    return float(ref) if ref else None


def _measure_together(fns: dict[Any, Any], lat: Any) -> dict[Any, dict[str, Any]]:
    """Records (:func:`exporters.latency.measurement_record`) of callables measured in
    interleaved rounds (:func:`exporters.latency.harness.measure_interleaved` with the
    calibration's rounds), at least ``REMEASURE_MIN_ROUND_S`` apart, on
    :func:`~exporters.latency.harness.clock` for ``lat.threads``, **with the speed probe**:
    rounds go on (up to three times as many) until two ran at the machine's calibrated
    speed (:func:`probe_reference_ms`; without a calibration, the probe's fastest window
    here). A 2-3 ms model measured in 20 rounds alone spans 5 s, which one slow phase of
    this VM can cover: over 6-8 repeats its fastest call moved 1.18-1.71x, with the probe
    1.12-1.17x (``benchmarks/front_measure_spread.py``)."""
    from exporters.latency import measurement_record
    from exporters.latency.harness import (
        RuntimeUnavailableError,
        SpeedProbe,
        clock,
        measure_interleaved,
    )

    with ExitStack() as stack:
        try:
            probe: SpeedProbe | None = stack.enter_context(SpeedProbe(lat.runtime, lat.threads))
        except RuntimeUnavailableError:  # no probe: the plain rounds
            probe = None
        ms = measure_interleaved(
            fns,
            warmup=lat.warmup,
            min_round_s=REMEASURE_MIN_ROUND_S,
            timer=clock(lat.threads),
            probe=probe,
            probe_ref_ms=probe_reference_ms(lat) if probe is not None else None,
        )
    return {k: measurement_record(m) for k, m in ms.items()}


def shipped_latency(onnx_path: Any, spec: Any, lat: Any, train_seq: int) -> dict[str, Any]:
    """Measured latency of the ONNX file a search ships (``best/model.onnx``: the
    precision its bits select) on onnxruntime at the search's latency shape and threads,
    interleaved as :func:`remeasure_all` measures (:func:`exporters.latency.harness.clock`:
    one thread, the calling thread's CPU time). With the default ``latency.runtime: torch``
    the search's own numbers are eager fp32; this is the number the user gets.

    Returns:
        :func:`exporters.latency.latency_ms`'s record plus ``runtime`` (``"ort"``),
        ``file``, ``batch`` and ``seq``.

    Raises:
        ArchirError: the file does not load or run in onnxruntime, or the shape is past
            ``max_seq_len``.
    """
    from archir.errors import ArchirError
    from exporters.latency.harness import onnx_file_callable
    from exporters.parity import check_seq_len

    seq = _seq(lat, train_seq)
    if spec.model.model.task != "image_classification":
        check_seq_len(seq, spec.model.model.max_seq_len, "tokens", spec.name)
    try:
        fn = onnx_file_callable(onnx_path, spec.model, lat.batch, seq, lat.threads)
    except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own types
        raise ArchirError(f"{onnx_path} does not run in onnxruntime: {exc}") from exc
    return {
        # the probe on the runtime measured here, against this machine's ort calibration
        **_measure_together({0: fn}, lat.model_copy(update={"runtime": "ort"}))[0],
        "runtime": "ort",
        "file": str(onnx_path),
        "batch": lat.batch,
        "seq": seq,
    }


def has_calibration(lat: Any) -> bool:
    """Whether a latency calibration exists for ``lat``'s runtime and threads."""
    from exporters.latency import find_calibration

    return find_calibration(lat.runtime, lat.threads) is not None


def _measure_model(spec: Any, model: Any, lat: Any, seq: int, kw: dict[str, Any]) -> Any:
    from exporters.latency.harness import Runner

    with Runner(spec, "torch", threads=lat.threads, model=model) as r:
        was_training = model.training
        try:
            return r.measure(lat.batch, seq, **kw)
        finally:
            model.train(was_training)


def _record(m: Any) -> dict[str, Any]:
    from exporters.latency import measurement_record

    return measurement_record(m)
