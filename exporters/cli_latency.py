"""``archir latency``: measure or predict a spec's forward latency; calibrate the predictor.

::

    archir latency SPEC [--runtime ort|torch|compile|both] [--batch B] [--seq T] [--threads N]
    archir latency SPEC --predict          # from this machine's calibration, with a band
    archir latency calibrate [--runtime ort] [--out FILE] [--budget-s 540] [--space FILE ...]

Calibration measures single blocks (and the fixed embedding/head part) of specs drawn from
``specs/search/`` (plus ``--space`` files) at widths 64-512 and sequence lengths 128-1024,
and a share of whole specs; see :mod:`exporters.latency.calibrate`.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from archir.cli.args import positive_int

HELP = "measure or predict forward latency (ms); 'calibrate' fits the predictor on this machine"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("spec", help="a concrete spec file, or the word 'calibrate'")
    p.add_argument(
        "--runtime",
        choices=["ort", "torch", "compile", "both"],
        default=None,
        help="onnxruntime, torch eager, torch.compile, or ort+torch (default: both; "
        "calibrate: ort)",
    )
    p.add_argument("--batch", type=int, default=1, help="batch size (default 1)")
    p.add_argument("--seq", type=int, default=None, help="sequence length (default train.seq_len)")
    p.add_argument("--threads", type=int, default=1, help="intra-op threads (default 1)")
    p.add_argument("--predict", action="store_true", help="predict from the calibration")
    p.add_argument("--calibration", default=None, help="calibration file (default: cache)")
    p.add_argument("--budget-s", type=float, default=None, help="seconds (measure: per attempt)")
    p.add_argument(
        "--windows",
        type=positive_int,
        default=None,
        help="timed windows per attempt; 'best' is the fastest window's median (default 5)",
    )
    p.add_argument("--cv-threshold", type=float, default=0.05, help="noisy above this CV")
    p.add_argument("--exporter", choices=["direct", "exporters", "auto"], default="direct")
    p.add_argument("--out", default=None, help="calibrate: output file")
    p.add_argument(
        "--space",
        action="append",
        default=[],
        help="calibrate: an extra search-space file to design on (repeatable)",
    )
    p.add_argument("--json", action="store_true", help="print JSON")


def _runtimes(arg: str | None) -> list[str]:
    if arg in (None, "both"):
        return ["ort", "torch"]
    return [arg]


def _calibrate(args: argparse.Namespace) -> int:
    from exporters.latency.calibrate import calibrate

    runtime = args.runtime or "ort"
    if runtime == "both":
        runtime = "ort"
    budget = args.budget_s if args.budget_s is not None else 540.0

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
    if args.json:
        print(json.dumps(info, indent=1))
    else:
        print(
            f"wrote {path}: {info['parts']} part and {info['wholes']} whole-spec samples in "
            f"{info['wall_s']} s "
            f"(median CV {info['cv_median']:.3f}; key {data['key']})"
        )
    return 0


def _fmt(rt: str, r: dict[str, Any]) -> str:
    lo, hi = r["band_ms"]
    if r["predicted"]:
        extra = " (extrapolated)" if r.get("extrapolated") else ""
        return f"{rt:8s} predicted {r['ms']:9.3f} ms   90% band [{lo:.3f}, {hi:.3f}]{extra}"
    flag = "  NOISY: machine too busy to trust" if r["noisy"] else ""
    return (
        f"{rt:8s} best {r['ms']:9.3f} ms   median {r['median_ms']:9.3f} ms   trimmed mean "
        f"{r['trimmed_mean_ms']:9.3f} ms   CV {r['cv']:.3f}   runs {r['runs']} in "
        f"{r.get('windows', 1)} windows{flag}"
    )


def run(args: argparse.Namespace) -> int:
    if args.spec == "calibrate":
        return _calibrate(args)
    import archir
    from exporters.latency import latency_ms
    from exporters.latency.harness import default_seq

    spec = archir.load_spec(args.spec)
    seq = default_seq(spec.model, args.seq)
    kw: dict[str, Any] = {"cv_threshold": args.cv_threshold, "exporter": args.exporter}
    if args.budget_s is not None:
        kw["budget_s"] = args.budget_s
    if args.windows is not None:
        kw["windows"] = args.windows
    results: dict[str, Any] = {}
    for rt in _runtimes(args.runtime):
        if args.predict:
            results[rt] = latency_ms(
                spec, rt, True, args.batch, seq, args.threads, calibration=args.calibration
            )
        else:
            results[rt] = latency_ms(spec, rt, False, args.batch, seq, args.threads, **kw)
    if args.json:
        print(json.dumps({"spec": spec.name, "batch": args.batch, "seq": seq, **results}, indent=1))
    else:
        print(f"{spec.name}: batch {args.batch}, seq {seq}, {args.threads} thread(s)")
        for rt, r in results.items():
            print("  " + _fmt(rt, r))
    return 0
