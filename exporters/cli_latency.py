"""``archir latency``: measure or predict a spec's forward latency; calibrate the predictor.

::

    archir latency SPEC [--runtime ort|torch|compile|both] [--batch B] [--seq T] [--threads N]
    archir latency SPEC --predict          # from this machine's calibration, with a band
    archir latency calibrate [--runtime ort] [--out FILE] [--budget-s 1080] [--space FILE ...]
                             [--export-workers N]
    archir latency calibrate --if-missing  # keep a usable calibration of this machine

Calibration measures single blocks (and the fixed embedding/head part) of specs drawn from
``specs/search/`` (plus ``--space`` files) at widths 64-512 and sequence lengths 64-1024,
and a share of whole specs; see :mod:`exporters.latency.calibrate`.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from archir.cli import args as a

HELP = "measure or predict forward latency (ms); 'calibrate' fits the predictor on this machine"

MAX_BATCH = 4096
MAX_CV = 1.0
MAX_EXPORT_WORKERS = 16


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("spec", help="a concrete spec file, or the word 'calibrate'")
    p.add_argument(
        "--runtime",
        choices=["ort", "torch", "compile", "both"],
        default=None,
        help="onnxruntime, torch eager, torch.compile, or ort+torch (default: both; "
        "--predict: the calibrated ones; calibrate: ort)",
    )
    p.add_argument(
        "--batch", type=a.int_range(1, MAX_BATCH), default=None, help="batch size (default 1)"
    )
    p.add_argument(
        "--seq",
        type=a.seq_len,
        default=None,
        help="sequence length, at most the spec's max_seq_len (default train.seq_len)",
    )
    p.add_argument("--threads", type=a.threads, default=1, help="intra-op threads (default 1)")
    p.add_argument("--predict", action="store_true", help="predict from the calibration")
    p.add_argument(
        "--calibration", type=a.regular_file, default=None, help="calibration file (default: cache)"
    )
    p.add_argument(
        "--budget-s",
        type=a.seconds,
        default=None,
        help="seconds (measure: per attempt; calibrate: the whole run, default 1080)",
    )
    p.add_argument(
        "--windows",
        type=a.int_range(1, a.MAX_WINDOWS),
        default=None,
        help="timed windows per attempt (default 5); 'fastest' is the fastest call",
    )
    p.add_argument(
        "--cv-threshold",
        type=a.float_range(0.0, MAX_CV),
        default=None,
        help="noisy above this coefficient of variation, in (0, 1] (default 0.05)",
    )
    p.add_argument(
        "--precision",
        choices=["auto", "fp32", "fp16", "int8", "int4"],
        default=None,
        help="precision of the ort graph measured (default auto: what the spec's per-block "
        "bits ship as, the graph `archir export --precision auto` writes)",
    )
    p.add_argument("--out", default=None, help="calibrate: output file")
    p.add_argument(
        "--space",
        action="append",
        default=[],
        type=a.regular_file,
        help="calibrate: an extra search-space file to design on (repeatable)",
    )
    p.add_argument(
        "--if-missing",
        action="store_true",
        help="calibrate: keep the calibration file if it exists and fits this machine, "
        "runtime and threads (a resumed search keeps the predictor it started with)",
    )
    p.add_argument(
        "--export-workers",
        type=a.int_range(1, MAX_EXPORT_WORKERS),
        default=None,
        help="calibrate: processes exporting a batch's graphs (default: up to 2, one per "
        "--threads CPUs; nothing is measured while they run)",
    )
    p.add_argument("--json", action="store_true", help="print JSON")


# flags that only one of the two modes reads: refused in the other, not silently ignored
_CALIBRATE_ONLY = {
    "out": "--out",
    "space": "--space",
    "if_missing": "--if-missing",
    "export_workers": "--export-workers",
}
_MEASURE_ONLY = {
    "predict": "--predict",
    "calibration": "--calibration",
    "windows": "--windows",
    "seq": "--seq",
    "batch": "--batch",
    "cv_threshold": "--cv-threshold",
    "precision": "--precision",
}
# flags a prediction has no use for (it times nothing)
_TIMING_ONLY = {
    "budget_s": "--budget-s",
    "windows": "--windows",
    "cv_threshold": "--cv-threshold",
    "precision": "--precision",
}


def _check_flags(args: argparse.Namespace) -> None:
    """Refuse flags the chosen mode would ignore.

    Raises:
        ArchirError: ``--out``/``--space`` without ``calibrate``, or a measuring flag with it.
    """
    from archir.errors import ArchirError

    calibrating = args.spec == "calibrate"
    wrong = _MEASURE_ONLY if calibrating else _CALIBRATE_ONLY
    for dest, flag in wrong.items():
        if getattr(args, dest) not in (None, False, []):
            raise ArchirError(
                f"{flag} does not apply to 'archir latency "
                + ("calibrate'" if calibrating else "SPEC'"),
                hint="drop the flag",
            )
    if args.predict:
        for dest, flag in _TIMING_ONLY.items():
            if getattr(args, dest) is not None:
                raise ArchirError(f"{flag} does not apply to --predict", hint="drop the flag")
    elif args.calibration is not None:
        raise ArchirError("--calibration applies to --predict only", hint="add --predict")


def _runtimes(arg: str | None) -> list[str]:
    if arg in (None, "both"):
        return ["ort", "torch"]
    return [arg]


def _predict_runtimes(args: argparse.Namespace) -> list[str]:
    """The runtimes ``--predict`` answers for. An explicit ``--runtime`` is kept (a missing
    calibration is then an error). Without one: the runtime of the ``--calibration`` file,
    else every runtime calibrated on this machine at these threads (``archir latency
    calibrate`` calibrates onnxruntime only, so its default must not ask for torch too),
    else ``ort`` (whose missing calibration is reported with the command that makes it)."""
    if args.runtime is not None:
        return _runtimes(args.runtime)
    from exporters.latency.calibrate import find_calibration, load_calibration

    if args.calibration is not None:
        key = load_calibration(args.calibration).get("key") or {}
        return [str(key.get("runtime", "ort"))]
    have = [rt for rt in _runtimes(None) if find_calibration(rt, args.threads) is not None]
    return have or ["ort"]


def _say(args: argparse.Namespace, info: dict[str, Any], line: str) -> None:
    """Print ``info`` as JSON under ``--json``, else the one ``line``."""
    print(json.dumps(info, indent=1) if args.json else line)


def _keep(args: argparse.Namespace, runtime: str) -> bool:
    """``--if-missing``: whether the calibration file (``--out`` or this machine's default)
    exists and loads for ``runtime`` and ``--threads`` (then it is kept and described);
    a calibration that does not load (another CPU, an older format, a torn file) is said and
    made again.

    Raises:
        ArchirError: the file is JSON but not an archir calibration (not replaced).
    """
    from pathlib import Path

    from archir.errors import ArchirError
    from exporters.latency.calibrate import (
        CalibrationError,
        NotACalibrationError,
        default_path,
        load_calibration,
    )

    path = Path(args.out) if args.out is not None else default_path(runtime, args.threads)
    if not path.exists():
        return False
    try:
        data = load_calibration(path, runtime=runtime, threads=args.threads)
    except NotACalibrationError as exc:
        raise ArchirError(
            f"{exc.message}; --if-missing does not replace it", hint="give --out a new file name"
        ) from None
    except CalibrationError as exc:
        print(f"calibrating again: {exc.message}", file=sys.stderr)
        return False
    info = {
        "path": str(path),
        "kept": True,
        "parts": len(data.get("parts", [])),
        "wholes": len(data.get("wholes", [])),
        "created": data.get("created"),
    }
    _say(
        args,
        info,
        f"kept {path}: {info['parts']} part and {info['wholes']} whole-spec samples, "
        f"made {info['created']} (drop --if-missing to calibrate again)",
    )
    return True


def _calibrate(args: argparse.Namespace) -> int:
    from archir.paths import check_out_file
    from exporters.latency.calibrate import DEFAULT_BUDGET_S, calibrate

    if args.out is not None:
        check_out_file(args.out)

    runtime = args.runtime or "ort"
    if runtime == "both":
        runtime = "ort"
    budget = args.budget_s if args.budget_s is not None else DEFAULT_BUDGET_S
    if args.if_missing and _keep(args, runtime):
        return 0

    def progress(msg: str) -> None:
        if not args.json:
            print(msg, file=sys.stderr)

    path, data = calibrate(
        runtime,
        threads=args.threads,
        budget_s=budget,
        out=args.out,
        spaces=args.space,
        progress=progress,
        export_workers=args.export_workers,
    )
    info = {
        "path": str(path),
        "parts": len(data["parts"]),
        "wholes": len(data["wholes"]),
        "wall_s": data["wall_s"],
        "cv_median": data["cv_median"],
        "key": data["key"],
        "skipped": data["skipped"],
    }
    _say(
        args,
        info,
        f"wrote {path}: {info['parts']} part and {info['wholes']} whole-spec samples in "
        f"{info['wall_s']} s (median CV {info['cv_median']:.3f}; key {data['key']})",
    )
    return 0


def _fmt(rt: str, r: dict[str, Any]) -> str:
    lo, hi = r["band_ms"]
    if r["predicted"]:
        extra = " (extrapolated)" if r.get("extrapolated") else ""
        return f"{rt:8s} predicted {r['ms']:9.3f} ms   90% band [{lo:.3f}, {hi:.3f}]{extra}"
    flag = "  NOISY: machine too busy to trust" if r["noisy"] else ""
    return (
        f"{rt:8s} fastest {r['ms']:9.3f} ms   median {r['median_ms']:9.3f} ms   trimmed mean "
        f"{r['trimmed_mean_ms']:9.3f} ms   CV {r['cv']:.3f}   runs {r['runs']} in "
        f"{r.get('windows', 1)} windows{flag}"
    )


def run(args: argparse.Namespace) -> int:
    """Measure, predict or calibrate; exit 0, or 2 for a user error.

    Raises:
        ArchirError: a flag that does not apply, a bad spec, ``--seq`` over the spec's
            ``max_seq_len``, a bad ``--out`` (checked before calibrating), no calibration.
    """
    _check_flags(args)
    if args.spec == "calibrate":
        return _calibrate(args)
    import archir
    from archir.errors import ArchirError
    from exporters.latency import latency_ms
    from exporters.latency.harness import default_seq

    spec = archir.load_spec(args.spec)
    max_seq = spec.model.model.max_seq_len
    if args.seq is not None and args.seq > max_seq:
        raise ArchirError(
            f"--seq {args.seq} is over the spec's max_seq_len {max_seq}",
            hint=f"use --seq 1..{max_seq}",
        )
    seq = default_seq(spec.model, args.seq)
    batch = args.batch or 1
    kw: dict[str, Any] = {
        "cv_threshold": 0.05 if args.cv_threshold is None else args.cv_threshold,
        "precision": args.precision or "auto",
    }
    if args.budget_s is not None:
        kw["budget_s"] = args.budget_s
    if args.windows is not None:
        kw["windows"] = args.windows
    results: dict[str, Any] = {}
    for rt in _predict_runtimes(args) if args.predict else _runtimes(args.runtime):
        if args.predict:
            results[rt] = latency_ms(
                spec, rt, True, batch, seq, args.threads, calibration=args.calibration
            )
        else:
            results[rt] = latency_ms(spec, rt, False, batch, seq, args.threads, **kw)
    if args.json:
        print(json.dumps({"spec": spec.name, "batch": batch, "seq": seq, **results}, indent=1))
    else:
        print(f"{spec.name}: batch {batch}, seq {seq}, {args.threads} thread(s)")
        for rt, r in results.items():
            print("  " + _fmt(rt, r))
    return 0
