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
from contextlib import ExitStack
from pathlib import Path
from typing import Any

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
from exporters.latency.harness import (
    INTERLEAVED_ROUNDS,
    INTERLEAVED_WINDOW_S,
    Runner,
    SpeedProbe,
    measure_interleaved,
    time_limit,
    torch_threads,
)

SPACE = Path(__file__).resolve().parent / "latency_space.yaml"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=200, help="held-out specs (default 200)")
    ap.add_argument("--runtime", default="ort", choices=["ort", "torch"])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--calibration", default=None, help="reuse this calibration file")
    ap.add_argument("--cal-budget-s", type=float, default=540.0)
    ap.add_argument("--seed", type=int, default=98765, help="held-out seed (calibration: 1234)")
    ap.add_argument(
        "--rounds", type=int, default=INTERLEAVED_ROUNDS, help="interleaved rounds (as calibration)"
    )
    ap.add_argument(
        "--window-s", type=float, default=INTERLEAVED_WINDOW_S, help="seconds per window"
    )
    ap.add_argument("--batch", type=int, default=50, help="held-out specs measured together")
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
    ms: dict[int, Any] = {}
    draws = list(space_specs(args.n, args.seed, spaces))
    probe = SpeedProbe(args.runtime, args.threads)
    probe_ref = cal.get("probe_ms")  # the machine's speed during calibration
    slow_batches = 0
    for b0 in range(0, len(draws), args.batch):
        # prepare a batch of held-out specs (compile, export at its shape, session), then
        # measure them in interleaved rounds: each spec's windows are a round apart
        fns = {}
        with ExitStack() as stack, torch_threads(args.threads):
            for spec, seq in draws[b0 : b0 + args.batch]:
                try:
                    with time_limit(args.spec_limit_s):
                        r = stack.enter_context(Runner(spec, args.runtime, threads=args.threads))
                        fn = r.call_for(1, seq)
                        fn()
                except Exception as exc:
                    msg = f"{type(exc).__name__}: {str(exc)[:120]}"
                    print(f"skip {spec.name}: {msg}", file=sys.stderr)
                    continue
                g = graph_features(spec, 1, seq)
                fns[len(rows)] = fn
                kinds = sorted({q.kind for q in g.parts if q.kind != "fixed"})
                rows.append(
                    {
                        "name": spec.name,
                        "d_model": g.d_model,
                        "depth": g.depth,
                        "seq": seq,
                        "kinds": kinds,
                        "flops": g.flops,
                        "_g": g,
                    }
                )
            print(
                f"[{time.perf_counter() - t0:5.0f}s] prepared {len(fns)} held-out specs",
                file=sys.stderr,
            )
            stats: dict[str, Any] = {}
            ms.update(
                measure_interleaved(
                    fns,
                    rounds=args.rounds,
                    window_s=args.window_s,
                    warmup=1,
                    probe=probe,
                    probe_ref_ms=probe_ref,
                    probe_stats=stats,
                    progress=lambda k, s: print(f"  round {k} ({s:.0f} s)", file=sys.stderr),
                )
            )
            slow_batches += stats["fast_rounds"] < 2
            print(
                f"  probe {stats['best_ms']:.3f} ms (calibration {probe_ref or 0:.3f}), "
                f"{stats['fast_rounds']}/{stats['rounds']} fast rounds",
                file=sys.stderr,
            )
    rep = []
    for i, row in enumerate(rows):
        m = ms[i]
        g = row.pop("_g")
        tp = time.perf_counter()
        p = pred.predict(g)
        pred_ms = (time.perf_counter() - tp) * 1e3
        w = m.window_ms
        even, odd = min(w[0::2]), min(w[1::2]) if len(w) > 1 else min(w)
        rep.append(even / odd)
        row.update(
            {
                "measured_ms": m.best_ms,
                "median_ms": m.median_ms,
                "window_ms": w,
                "cv": m.cv,
                "noisy": m.noisy,
                "predicted_ms": p.ms,
                "band_ms": p.band_ms,
                "extrapolated": p.extrapolated,
                "flops_ms": float(a * row["flops"] + b),
                "predict_wall_ms": pred_ms,
            }
        )
        print(
            f"{i:3d} {row['name']:16s} d{g.d_model:<4d}L{g.depth:<3d}seq {row['seq']:4d} "
            f"meas {m.best_ms:9.2f}  pred {p.ms:9.2f} ({100 * (p.ms / m.best_ms - 1):+5.1f}%)  "
            f"rep {even / odd:.3f} {','.join(row['kinds'])}",
            file=sys.stderr,
        )
    y = np.asarray([r["measured_ms"] for r in rows])
    yp = np.asarray([r["predicted_ms"] for r in rows])
    yf = np.asarray([r["flops_ms"] for r in rows])
    inband = np.mean([r["band_ms"][0] <= r["measured_ms"] <= r["band_ms"][1] for r in rows])
    cvs = [r["cv"] for r in rows]
    rep_err = np.abs(np.asarray(rep) - 1)
    # measurements whose best window a second window confirmed (within 5 %)
    quiet = np.asarray([not r["noisy"] for r in rows])
    res = {
        "n": len(rows),
        "runtime": args.runtime,
        "threads": args.threads,
        "calibration_parts": len(cal.get("parts", [])),
        "calibration_wholes": len(cal.get("wholes", [])),
        "calibration_wall_s": cal.get("wall_s"),
        "predictor_fit_s": round(fit_s, 2),
        "predict_wall_ms_median": statistics.median(r["predict_wall_ms"] for r in rows),
        "heldout_wall_s": round(time.perf_counter() - t0, 1),
        "heldout_rounds": args.rounds,
        "heldout_slow_batches": slow_batches,
        "calibration_slow_batches": cal.get("slow_batches"),
        "predictor_within_10pct": float(np.mean(np.abs(yp / y - 1) <= 0.10)),
        "predictor_within_5pct": float(np.mean(np.abs(yp / y - 1) <= 0.05)),
        "predictor_spearman": float(spearmanr(y, yp).statistic),
        "predictor_median_abs_err_pct": float(np.median(np.abs(yp / y - 1)) * 100),
        "predictor_p95_abs_err_pct": float(np.quantile(np.abs(yp / y - 1), 0.95) * 100),
        "band_coverage": float(inband),
        "flops_within_10pct": float(np.mean(np.abs(yf / y - 1) <= 0.10)),
        "flops_spearman": float(spearmanr(y, yf).statistic),
        "flops_median_abs_err_pct": float(np.median(np.abs(yf / y - 1)) * 100),
        "confirmed_n": int(quiet.sum()),
        "confirmed_predictor_within_10pct": float(np.mean(np.abs(yp / y - 1)[quiet] <= 0.10)),
        "repeat_within_5pct": float(np.mean(rep_err <= 0.05)),
        "repeat_within_10pct": float(np.mean(rep_err <= 0.10)),
        "repeat_median_abs_pct": float(np.median(rep_err) * 100),
        "single_median_vs_best_median_pct": float(
            np.median([r["median_ms"] / r["measured_ms"] - 1 for r in rows]) * 100
        ),
        "measure_cv_median": statistics.median(cvs),
        "measure_cv_p90": float(np.quantile(cvs, 0.9)),
    }
    print(json.dumps(res, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps({"summary": res, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
