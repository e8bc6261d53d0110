"""Latency predictor accuracy on held-out random specs vs a FLOPs-only baseline.

    python benchmarks/latency_predictor.py --n 200                 # full: calibrate + 200 specs
    python benchmarks/latency_predictor.py --calibration FILE      # reuse a calibration
    python benchmarks/latency_predictor.py --n 30 --cal-budget-s 150   # reduced

Held-out specs are drawn (seed different from the calibration's) from the ``specs/search/``
spaces of width >= 64 and from ``benchmarks/latency_space.yaml`` (the same mixers over widths
64-512, depth 2-12), at sequence lengths 128-1024, mixed bits. The calibration is run on the
same spaces (``spaces=[benchmarks/latency_space.yaml]``). Each held-out spec is exported at
its shape and measured on onnxruntime (batch 1, 1 thread by default) and predicted.
Reported: share of predictions within ±10 % of the measured median (goal ≥ 95 %), Spearman
rank correlation (goal ≥ 0.98), the same two for a FLOPs-only baseline (line of latency on
FLOPs fitted in relative error on the calibration's whole-spec samples), calibration wall
time, and the measurement CV (repeatability) of the held-out runs. Take the numbers on a
quiet machine: the measured "truth" is only as good as its CV.
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
from exporters.latency.calibrate import (
    calibrate,
    load_spaces,
    predictor_from,
    samples_features,
    space_paths,
    space_specs,
)
from exporters.latency.harness import Runner, time_limit

SPACE = Path(__file__).resolve().parent / "latency_space.yaml"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=200, help="held-out specs (default 200)")
    ap.add_argument("--runtime", default="ort", choices=["ort", "torch"])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--calibration", default=None, help="reuse this calibration file")
    ap.add_argument("--cal-budget-s", type=float, default=540.0)
    ap.add_argument("--seed", type=int, default=98765, help="held-out seed (calibration: 1234)")
    ap.add_argument("--measure-budget-s", type=float, default=0.3)
    ap.add_argument("--spec-limit-s", type=float, default=60.0)
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
            spaces=[SPACE],
            progress=lambda m: print(m, file=sys.stderr),
        )
        print(f"calibration written to {path}", file=sys.stderr)
    t_fit = time.perf_counter()
    pred = predictor_from(cal)
    fit_s = time.perf_counter() - t_fit

    # FLOPs-only baseline: latency = a * FLOPs + b, relative-error least squares on the
    # calibration's whole-spec samples
    _, _, wholes, wms = samples_features(cal)
    F = np.asarray([g.flops for g in wholes])
    Y = np.asarray(wms)
    (a, b), *_ = np.linalg.lstsq(np.stack([F / Y, 1 / Y], 1), np.ones_like(Y), rcond=None)

    spaces = [s for s in load_spaces(space_paths([SPACE])) if s.name != "tiny"]
    rows = []
    t0 = time.perf_counter()
    for spec, seq in space_specs(args.n, args.seed, spaces):
        try:
            with (
                time_limit(args.spec_limit_s),
                Runner(spec, args.runtime, threads=args.threads) as r,
            ):
                m = r.measure(
                    1, seq, warmup=2, min_runs=5, budget_s=args.measure_budget_s, max_attempts=3
                )
        except Exception as exc:
            print(f"skip {spec.name}: {type(exc).__name__}: {str(exc)[:120]}", file=sys.stderr)
            continue
        g = graph_features(spec, 1, seq)
        tp = time.perf_counter()
        p = pred.predict(g)
        pred_ms = (time.perf_counter() - tp) * 1e3
        kinds = sorted({q.kind for q in g.parts if q.kind != "fixed"})
        rows.append(
            {
                "name": spec.name,
                "d_model": g.d_model,
                "depth": g.depth,
                "seq": seq,
                "kinds": kinds,
                "measured_ms": m.median_ms,
                "cv": m.cv,
                "cpu_share": m.cpu_share,
                "noisy": m.noisy,
                "predicted_ms": p.ms,
                "band_ms": p.band_ms,
                "extrapolated": p.extrapolated,
                "flops_ms": float(a * g.flops + b),
                "predict_wall_ms": pred_ms,
            }
        )
        print(
            f"[{time.perf_counter() - t0:6.0f}s] {len(rows):3d} {spec.name:16s} d{g.d_model:<4d}"
            f"L{g.depth:<3d}seq {seq:4d} meas {m.median_ms:9.2f}  pred {p.ms:9.2f} "
            f"({100 * (p.ms / m.median_ms - 1):+5.1f}%)  cv {m.cv:.3f} cpu {m.cpu_share:.2f} "
            f"{','.join(kinds)}",
            file=sys.stderr,
        )
    y = np.asarray([r["measured_ms"] for r in rows])
    yp = np.asarray([r["predicted_ms"] for r in rows])
    yf = np.asarray([r["flops_ms"] for r in rows])
    inband = np.mean([r["band_ms"][0] <= r["measured_ms"] <= r["band_ms"][1] for r in rows])
    cvs = [r["cv"] for r in rows]
    # measurements not flagged noisy (CV and, with one thread, CPU share both fine)
    quiet = np.asarray([not r["noisy"] for r in rows])
    res = {
        "n": len(rows),
        "runtime": args.runtime,
        "threads": args.threads,
        "calibration_parts": len(cal.get("parts", [])),
        "calibration_wholes": len(cal.get("wholes", [])),
        "predictor_fit_s": round(fit_s, 2),
        "predict_wall_ms_median": statistics.median(r["predict_wall_ms"] for r in rows),
        "heldout_wall_s": round(time.perf_counter() - t0, 1),
        "calibration_wall_s": cal.get("wall_s"),
        "predictor_within_10pct": float(np.mean(np.abs(yp / y - 1) <= 0.10)),
        "predictor_spearman": float(spearmanr(y, yp).statistic),
        "predictor_median_abs_err_pct": float(np.median(np.abs(yp / y - 1)) * 100),
        "band_coverage": float(inband),
        "flops_within_10pct": float(np.mean(np.abs(yf / y - 1) <= 0.10)),
        "flops_spearman": float(spearmanr(y, yf).statistic),
        "flops_median_abs_err_pct": float(np.median(np.abs(yf / y - 1)) * 100),
        "quiet_n": int(quiet.sum()),
        "quiet_predictor_within_10pct": float(np.mean(np.abs(yp / y - 1)[quiet] <= 0.10)),
        "quiet_predictor_spearman": float(spearmanr(y[quiet], yp[quiet]).statistic),
        "quiet_flops_within_10pct": float(np.mean(np.abs(yf / y - 1)[quiet] <= 0.10)),
        "quiet_flops_spearman": float(spearmanr(y[quiet], yf[quiet]).statistic),
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
