"""Latency predictor accuracy on held-out random specs vs a FLOPs-only baseline.

    python benchmarks/latency_predictor.py                       # full: calibrate + 200 specs
    python benchmarks/latency_predictor.py --calibration FILE    # reuse a calibration
    python benchmarks/latency_predictor.py --n 40 --cal-budget-s 240   # reduced

Held-out specs come from ``specs/search/`` spaces and the built-in space (mixed token mixers,
widths 64-512, depth 2-12, seq 128-1024, bits 4/8/16) drawn with a seed different from the
calibration's. Each is measured on onnxruntime (batch 1, 1 thread by default) and predicted.
Reported: share of predictions within ±10 % of the measured median (goal ≥ 95 %), Spearman
rank correlation (goal ≥ 0.98), the same two for a FLOPs-only baseline (least-squares line
of latency on FLOPs fitted on the calibration samples), calibration wall time, and the
measurement CV (repeatability) of the held-out runs. Take the numbers on a quiet machine:
the measured "truth" is only as good as its CV.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
from scipy.stats import spearmanr

from exporters.latency import graph_features, load_calibration
from exporters.latency.calibrate import calibrate, predictor_from, random_specs
from exporters.latency.harness import Runner, time_limit


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=200, help="held-out specs (default 200)")
    ap.add_argument("--runtime", default="ort", choices=["ort", "torch"])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--calibration", default=None, help="reuse this calibration file")
    ap.add_argument("--cal-budget-s", type=float, default=540.0)
    ap.add_argument("--seed", type=int, default=98765, help="held-out seed (calibration: 1234)")
    ap.add_argument("--measure-budget-s", type=float, default=0.5)
    ap.add_argument("--json", default=None, help="write the results here")
    args = ap.parse_args()

    if args.calibration:
        cal = load_calibration(args.calibration, runtime=args.runtime, threads=args.threads)
    else:
        path, cal = calibrate(
            args.runtime,
            threads=args.threads,
            budget_s=args.cal_budget_s,
            out=Path("/tmp") / "archir-latency-bench-calibration.json",
            progress=lambda m: print(m, file=sys.stderr),
        )
        print(f"calibration written to {path}", file=sys.stderr)
    pred = predictor_from(cal)

    # FLOPs-only baseline: latency = a * FLOPs + b fitted on the calibration samples
    from archir.spec import spec_from_dict

    cf, cy = [], []
    for s in cal["samples"]:
        try:
            cf.append(graph_features(spec_from_dict(s["spec"]), s["batch"], s["seq"]).flops)
            cy.append(s["median_ms"])
        except Exception:
            continue
    a, b = np.polyfit(np.asarray(cf), np.asarray(cy), 1)

    rows = []
    t0 = time.perf_counter()
    for spec, seq in random_specs(args.n, args.seed):
        try:
            with (
                time_limit(60),
                Runner(spec, args.runtime, threads=args.threads) as r,
            ):
                m = r.measure(1, seq, budget_s=args.measure_budget_s, max_attempts=3)
        except Exception as exc:
            print(f"skip {spec.name}: {type(exc).__name__}", file=sys.stderr)
            continue
        g = graph_features(spec, 1, seq)
        p = pred.predict(g)
        rows.append(
            {
                "name": spec.name,
                "seq": seq,
                "measured_ms": m.median_ms,
                "cv": m.cv,
                "noisy": m.noisy,
                "predicted_ms": p.ms,
                "band_ms": p.band_ms,
                "extrapolated": p.extrapolated,
                "flops_ms": float(a * g.flops + b),
            }
        )
        print(
            f"[{time.perf_counter() - t0:6.0f}s] {len(rows):3d} {spec.name:40s} seq {seq:4d} "
            f"meas {m.median_ms:8.2f}  pred {p.ms:8.2f}  cv {m.cv:.3f}",
            file=sys.stderr,
        )
    y = np.asarray([r["measured_ms"] for r in rows])
    yp = np.asarray([r["predicted_ms"] for r in rows])
    yf = np.asarray([r["flops_ms"] for r in rows])
    inband = np.mean([r["band_ms"][0] <= r["measured_ms"] <= r["band_ms"][1] for r in rows])
    cvs = [r["cv"] for r in rows]
    res = {
        "n": len(rows),
        "runtime": args.runtime,
        "threads": args.threads,
        "calibration_samples": len(cal["samples"]),
        "calibration_wall_s": cal.get("wall_s"),
        "predictor_within_10pct": float(np.mean(np.abs(yp / y - 1) <= 0.10)),
        "predictor_spearman": float(spearmanr(y, yp).statistic),
        "predictor_median_abs_err_pct": float(np.median(np.abs(yp / y - 1)) * 100),
        "band_coverage": float(inband),
        "flops_within_10pct": float(np.mean(np.abs(yf / y - 1) <= 0.10)),
        "flops_spearman": float(spearmanr(y, yf).statistic),
        "flops_median_abs_err_pct": float(np.median(np.abs(yf / y - 1)) * 100),
        "measure_cv_median": statistics.median(cvs),
        "measure_cv_p90": float(np.quantile(cvs, 0.9)),
        "measure_noisy_share": float(np.mean([r["noisy"] for r in rows])),
    }
    print(json.dumps(res, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps({"summary": res, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
