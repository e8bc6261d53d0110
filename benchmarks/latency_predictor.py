"""Latency predictor accuracy on held-out random specs vs a FLOPs-only baseline.

    python benchmarks/latency_predictor.py --n 200                 # full: calibrate + 200 specs
    python benchmarks/latency_predictor.py --calibration FILE      # reuse a calibration
    python benchmarks/latency_predictor.py --n 30 --cal-budget-s 150   # reduced
    python benchmarks/latency_predictor.py --n 100 --export-only --export-workers 2
                                   # export the held-out graphs first (no timing: any load)

Every held-out spec is exported once, as ``archir export`` ships it (the one export path,
:func:`exporters.latency.harness.export_onnx_file`: torch.export, dynamic axes, the precision
its bits select), into ``--export-dir`` (kept between runs, keyed by seed, draw and spec
hash) by ``--export-workers`` processes; the measurement then only loads the files. A
Mamba-heavy spec takes minutes to export, so exporting is split from timing: it can run
on a loaded machine, the timing cannot.

Held-out specs are drawn (seed different from the calibration's) from the ``specs/search/``
spaces of width >= 64 and from ``benchmarks/latency_space.yaml`` (the same mixers over
widths 64-512, depth 2-12), at sequence lengths 128-1024 (:data:`HELDOUT_SEQS`: the lengths
every held-out seed since 2026-11-22 was drawn at; the calibration also measures 64), mixed
bits. The calibration is run on the same spaces
(``spaces=[benchmarks/latency_space.yaml]``). Each held-out spec's shipped graph (dynamic
axes) is measured on onnxruntime at its drawn length (batch 1, 1 thread by default) and
predicted. Reported: share of predictions within ±10 % of the measured time (the fastest
call over the harness's 20 interleaved rounds, as calibration measures; goal ≥ 95 %),
Spearman rank correlation (goal ≥ 0.98), the same two for a FLOPs-only baseline (line of
latency on FLOPs fitted in relative error on the calibration's whole-spec samples),
calibration wall time, and the repeatability of the measured truth itself: with
``--passes 2`` (the default) every batch is measured twice, one pass after the other, and
the share of specs whose two fastest calls agree within ±10 % is printed beside the
predictor's (against the first pass, and against the faster of the two). A predictor cannot
be judged more finely than that. ``--earlier-truth A.json B.json`` (the ``--json`` files of
earlier runs on the same seed, made at other times) also judges it against each spec's
median over every pass of every run: the truth over time, not one phase of the machine.

**Reference panel.** The machine's speed moves by a few percent within minutes and hours
(on the 2-core VM the whole held-out set ran 2-7 % faster or slower from one measurement to
the next), and the speed probe (a small MLP) sees only a fraction of it. So the first
``--reference-n`` (12) draws of ``--reference-seed`` (26457; never the held-out seed) are
timed in the same interleaved rounds as the held-out graphs, every pass. A pass's *level* is
the panel's median time relative to each member's median over all passes compared
(:func:`panel_levels`); the held-out times divided by their pass's level are the truth on
one speed. Reported beside the raw scores: the two passes' agreement on one speed, and
with ``--earlier-truth`` (runs made with the same panel) the predictor against each spec's
median over every levelled pass of every run.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import multiprocessing
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
from scipy.stats import spearmanr

from exporters.latency import graph_features, load_calibration
from exporters.latency.calibrate import (
    DEFAULT_BUDGET_S,
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
    SpeedProbe,
    clock,
    clock_name,
    measure_interleaved,
    onnx_file_callable,
)

SPACE = Path(__file__).resolve().parent / "latency_space.yaml"
#: held-out lengths (calibrate.SEQS before it gained 64): the cached exports and every
#: seed's draws since 2026-11-22 depend on them
HELDOUT_SEQS = (128, 192, 256, 384, 512, 768, 1024)


def export_path(root: Path, seed: int, i: int, data: dict[str, Any]) -> Path:
    """Where held-out draw ``i`` of ``seed`` is cached (the spec's hash in the name, so a
    changed space or spec never reuses a stale file)."""
    h = hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:12]
    return root / f"{seed}-{i:04d}-{h}.onnx"


def panel_levels(passes: list[list[float]]) -> list[float]:
    """The machine's speed in each pass, from a reference panel timed in the same rounds.

    ``passes[p][k]`` is panel member ``k``'s fastest call (ms) in pass ``p`` (every pass of
    every run being compared). Each member's reference is its median over all passes; a
    pass's level is the median over members of time / reference, so 1.03 means the machine
    ran 3 % slower than usual in that pass. Dividing a held-out time by its pass's level
    puts all passes on one speed (the panel's median over them).

    Raises:
        ValueError: no passes, or passes of different panels (lengths differ), or a
            non-positive time.
    """
    if not passes or not passes[0]:
        raise ValueError("no panel times")
    if any(len(q) != len(passes[0]) for q in passes):
        raise ValueError("panel passes of different lengths: not the same panel")
    a = np.asarray(passes, dtype=float)
    if not (a > 0).all():
        raise ValueError("panel times must be positive")
    ref = np.median(a, axis=0)
    return [float(np.median(q / ref)) for q in a]


def against_truth(tag: str, pred: Any, mine: Any, truth: Any) -> dict[str, float]:
    """The predictor (``pred``) and this run's measurement (``mine``) against an aggregate
    ``truth`` (ms arrays of one order), under keys ``predictor_vs_<tag>_...`` and
    ``truth_this_run_vs_<tag>_...``."""
    e, m = np.asarray(pred) / truth - 1, np.asarray(mine) / truth - 1
    return {
        f"predictor_vs_{tag}_within_10pct": float(np.mean(np.abs(e) <= 0.10)),
        f"predictor_vs_{tag}_median_signed_err_pct": float(np.median(e) * 100),
        f"truth_this_run_vs_{tag}_within_10pct": float(np.mean(np.abs(m) <= 0.10)),
        f"truth_this_run_vs_{tag}_within_5pct": float(np.mean(np.abs(m) <= 0.05)),
    }


def export_one(job: tuple[dict[str, Any], str, float]) -> tuple[str, float, str | None]:
    """Export one held-out spec as it ships (worker process). Returns (path, seconds,
    error or None); the file appears only complete (written aside, then renamed)."""
    import torch

    from archir.spec import spec_from_dict
    from exporters.latency.harness import export_onnx_file, time_limit

    data, path, limit_s = job
    torch.set_num_threads(1)
    t = time.perf_counter()
    part = path + ".part"
    try:
        with time_limit(limit_s):
            export_onnx_file(spec_from_dict(data), part)
        os.replace(part, path)
        return path, time.perf_counter() - t, None
    except Exception as exc:  # noqa: BLE001 - reported per spec
        Path(part).unlink(missing_ok=True)
        return path, time.perf_counter() - t, f"{type(exc).__name__}: {str(exc)[:160]}"


def export_all(
    draws: list[Any], root: Path, seed: int, workers: int, limit_s: float
) -> dict[int, float]:
    """Export every draw not yet in ``root`` with ``workers`` processes; returns draw index
    -> export seconds of the files written now."""
    root.mkdir(parents=True, exist_ok=True)
    jobs, index = [], {}
    for i, (spec, _seq) in enumerate(draws):
        path = export_path(root, seed, i, spec.data)
        if not path.exists():
            jobs.append((spec.data, str(path), limit_s))
            index[str(path)] = i
    took: dict[int, float] = {}
    if not jobs:
        return took
    t0 = time.perf_counter()
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(workers, maxtasksperchild=4) as pool:
        for k, (path, s, err) in enumerate(pool.imap_unordered(export_one, jobs), 1):
            i = index[path]
            if err:
                print(f"export {i} failed after {s:.0f} s: {err}", file=sys.stderr)
            else:
                took[i] = s
            print(
                f"[{time.perf_counter() - t0:5.0f}s] exported {k}/{len(jobs)} "
                f"(draw {i}: {s:.0f} s)",
                file=sys.stderr,
            )
    return took


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=200, help="held-out specs (default 200)")
    ap.add_argument("--runtime", default="ort", choices=["ort"], help="the shipped graph")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--calibration", default=None, help="reuse this calibration file")
    ap.add_argument("--cal-budget-s", type=float, default=DEFAULT_BUDGET_S)
    ap.add_argument("--seed", type=int, default=98765, help="held-out seed (calibration: 1234)")
    ap.add_argument(
        "--rounds", type=int, default=INTERLEAVED_ROUNDS, help="interleaved rounds (as calibration)"
    )
    ap.add_argument(
        "--window-s", type=float, default=INTERLEAVED_WINDOW_S, help="seconds per window"
    )
    ap.add_argument("--batch", type=int, default=50, help="held-out specs measured together")
    ap.add_argument(
        "--passes",
        type=int,
        default=2,
        choices=[1, 2],
        help="measure each batch twice: the truth's repeatability (default 2)",
    )
    ap.add_argument("--spec-limit-s", type=float, default=600.0, help="export time limit")
    ap.add_argument(
        "--export-dir",
        default="/tmp/archir-latbench-exports",
        help="held-out ONNX files, kept between runs",
    )
    ap.add_argument("--export-workers", type=int, default=1, help="export processes")
    ap.add_argument(
        "--export-only", action="store_true", help="export the held-out graphs, then stop"
    )
    ap.add_argument(
        "--clock",
        choices=["harness", "wall"],
        default="harness",
        help="time the held-out graphs by the harness's clock (one thread: thread CPU "
        "time, as calibration) or by wall time (the clock before calibration version 5)",
    )
    ap.add_argument(
        "--reference-seed",
        type=int,
        default=26457,
        help="the reference panel: the first --reference-n draws of this seed, timed in "
        "the same rounds as the held-out graphs, tell the machine's speed in each pass "
        "(default 26457)",
    )
    ap.add_argument(
        "--reference-n", type=int, default=12, help="reference panel size (0: no panel)"
    )
    ap.add_argument("--json", default=None, help="write the results here")
    ap.add_argument(
        "--earlier-truth",
        nargs="+",
        default=[],
        metavar="JSON",
        help="--json files of earlier runs on the same seed: also judge the predictor "
        "against each spec's median over every pass of every run (the truth over time)",
    )
    args = ap.parse_args()
    earlier: list[Any] = []
    earlier_panel: list[Any] = []  # each earlier run's "reference" (None: made without one)
    for f in args.earlier_truth:
        try:
            doc = json.loads(Path(f).read_text())
            earlier.append(doc["rows"])
            earlier_panel.append(doc.get("reference"))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            print(f"{f}: not a --json file of this benchmark ({exc})", file=sys.stderr)
            return 2

    spaces = [s for s in load_spaces(space_paths([SPACE])) if s.name != "tiny"]
    draws = list(space_specs(args.n, args.seed, spaces, seqs=HELDOUT_SEQS))
    if args.reference_n and args.reference_seed == args.seed:
        print(
            f"--reference-seed {args.seed} is the held-out seed: the panel must be other "
            "specs (choose another seed, or --reference-n 0)",
            file=sys.stderr,
        )
        return 2
    refs = list(space_specs(args.reference_n, args.reference_seed, spaces, seqs=HELDOUT_SEQS))
    for i, (f, run) in enumerate(zip(args.earlier_truth, earlier)):
        by_draw = {e["draw"]: e for e in run}
        for d, (spec, seq) in enumerate(draws):
            e = by_draw.get(d)
            if e is None or (e["name"], e["seq"]) != (spec.name, seq):
                print(f"{f}: no row for draw {d} ({spec.name}): another seed?", file=sys.stderr)
                return 2
        earlier[i] = by_draw
    root = Path(args.export_dir)
    t_exp = time.perf_counter()
    took = export_all(draws, root, args.seed, args.export_workers, args.spec_limit_s)
    export_all(refs, root, args.reference_seed, args.export_workers, args.spec_limit_s)
    print(
        f"held-out exports: {len(took)} written in {time.perf_counter() - t_exp:.0f} s",
        file=sys.stderr,
    )
    if args.export_only:
        return 0

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

    rows = []
    t0 = time.perf_counter()
    ms: dict[int, Any] = {}
    again: dict[int, Any] = {}  # the second pass
    probe = SpeedProbe(args.runtime, args.threads)
    probe_ref = cal.get("probe_ms")  # the machine's speed during calibration
    slow_batches = 0
    # the reference panel: loaded once, timed in every batch's rounds
    panel_fns: dict[Any, Any] = {}
    for k, (spec, seq) in enumerate(refs):
        path = export_path(root, args.reference_seed, k, spec.data)
        if not path.exists():
            print(f"reference {k} ({spec.name}) not exported: no panel", file=sys.stderr)
            panel_fns = {}
            break
        panel_fns[("ref", k)] = onnx_file_callable(path, spec.model, 1, seq, args.threads)
    panel_passes: list[list[float]] = []  # per batch and pass: each member's fastest call
    panel_probe: list[float] = []  # the speed probe's fastest window in the same pass
    for b0 in range(0, len(draws), args.batch):
        # load a batch of held-out graphs (one onnxruntime session each), then measure them
        # in interleaved rounds: each spec's windows are a round apart
        fns = {}
        for i in range(b0, min(b0 + args.batch, len(draws))):
            spec, seq = draws[i]
            path = export_path(root, args.seed, i, spec.data)
            if not path.exists():
                print(f"skip {spec.name}: not exported", file=sys.stderr)
                continue
            fn = onnx_file_callable(path, spec.model, 1, seq, args.threads)
            g = graph_features(spec, 1, seq)
            fns[len(rows)] = fn
            kinds = sorted({q.kind for q in g.parts if q.kind != "fixed"})
            rows.append(
                {
                    "name": spec.name,
                    "draw": i,
                    "d_model": g.d_model,
                    "depth": g.depth,
                    "seq": seq,
                    "kinds": kinds,
                    "flops": g.flops,
                    "precisions": sorted({q.precision for q in g.parts}),
                    "export_s": took.get(i),
                    "_g": g,
                }
            )
        print(
            f"[{time.perf_counter() - t0:5.0f}s] loaded {len(fns)} held-out graphs",
            file=sys.stderr,
        )
        for pass_ in range(args.passes):
            stats: dict[str, Any] = {}
            got = measure_interleaved(
                {**fns, **panel_fns},
                rounds=args.rounds,
                window_s=args.window_s,
                warmup=1,
                probe=probe,
                probe_ref_ms=probe_ref,
                probe_stats=stats,
                progress=lambda k, s: print(f"  round {k} ({s:.0f} s)", file=sys.stderr),
                timer=clock(args.threads) if args.clock == "harness" else time.perf_counter,
            )
            if panel_fns:
                panel_passes.append([got.pop(k).min_ms for k in panel_fns])
                panel_probe.append(stats["best_ms"])
                for i in fns:
                    rows[i].setdefault("_panel_pass", []).append(len(panel_passes) - 1)
            (ms if pass_ == 0 else again).update(got)
            slow_batches += stats["fast_rounds"] < 2
            print(
                f"  pass {pass_ + 1}: probe {stats['best_ms']:.3f} ms (calibration "
                f"{probe_ref or 0:.3f}), {stats['fast_rounds']}/{stats['rounds']} fast rounds",
                file=sys.stderr,
            )
    rep = []
    for i, row in enumerate(rows):
        m = ms[i]
        g = row.pop("_g")
        tp = time.perf_counter()
        p = pred.predict(g)
        pred_ms = (time.perf_counter() - tp) * 1e3
        w = m.window_min_ms
        even, odd = min(w[0::2]), min(w[1::2]) if len(w) > 1 else min(w)
        rep.append(even / odd)
        row.update(
            {
                "measured_ms": m.min_ms,
                "measured_ms_pass2": again[i].min_ms if i in again else None,
                "best_window_ms": m.best_ms,
                "median_ms": m.median_ms,
                "window_ms": m.window_ms,
                "window_min_ms": w,
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
            f"meas {m.min_ms:9.2f}  pred {p.ms:9.2f} ({100 * (p.ms / m.min_ms - 1):+5.1f}%)  "
            f"rep {even / odd:.3f} {','.join(row['kinds'])}",
            file=sys.stderr,
        )
    for r in rows:
        if "_panel_pass" in r:
            r["panel_pass"] = r.pop("_panel_pass")
    reference = {
        "seed": args.reference_seed,
        "names": [[spec.name, seq] for spec, seq in refs],
        "passes": panel_passes,
        "probe_ms": panel_probe,
    }
    y = np.asarray([r["measured_ms"] for r in rows])
    yp = np.asarray([r["predicted_ms"] for r in rows])
    yf = np.asarray([r["flops_ms"] for r in rows])
    inband = np.mean([r["band_ms"][0] <= r["measured_ms"] <= r["band_ms"][1] for r in rows])
    cvs = [r["cv"] for r in rows]
    rep_err = np.abs(np.asarray(rep) - 1)
    y2 = np.asarray([r["measured_ms_pass2"] or r["measured_ms"] for r in rows])
    two = args.passes == 2
    ylo = np.minimum(y, y2)
    # measurements whose fastest call a second window confirmed (within 5 %)
    quiet = np.asarray([not r["noisy"] for r in rows])
    inside = np.asarray([not r["extrapolated"] for r in rows])
    sig = yp / y - 1
    err = np.abs(sig)
    res = {
        "n": len(rows),
        "runtime": args.runtime,
        "threads": args.threads,
        "clock": "wall" if args.clock == "wall" else clock_name(clock(args.threads)),
        "calibration_clock": cal.get("clock", "wall"),
        "calibration_parts": len(cal.get("parts", [])),
        "calibration_wholes": len(cal.get("wholes", [])),
        "calibration_wall_s": cal.get("wall_s"),
        "composition": pred.comp_kind,
        "composition_oof_rmse": pred.comp_oof_rmse,
        "predictor_fit_s": round(fit_s, 2),
        "predict_wall_ms_median": statistics.median(r["predict_wall_ms"] for r in rows),
        "heldout_wall_s": round(time.perf_counter() - t0, 1),
        "heldout_rounds": args.rounds,
        "heldout_slow_batches": slow_batches,
        "calibration_slow_batches": cal.get("slow_batches"),
        "predictor_within_10pct": float(np.mean(err <= 0.10)),
        "predictor_within_5pct": float(np.mean(err <= 0.05)),
        "predictor_spearman": float(spearmanr(y, yp).statistic),
        "predictor_median_abs_err_pct": float(np.median(err) * 100),
        "predictor_p95_abs_err_pct": float(np.quantile(err, 0.95) * 100),
        "band_coverage": float(inband),
        # a kind, a kind's width or a shape outside the calibration (band widened)
        "extrapolated_n": int((~inside).sum()),
        "predictor_within_10pct_not_extrapolated": (
            float(np.mean(err[inside] <= 0.10)) if inside.any() else None
        ),
        "flops_within_10pct": float(np.mean(np.abs(yf / y - 1) <= 0.10)),
        "flops_spearman": float(spearmanr(y, yf).statistic),
        "flops_median_abs_err_pct": float(np.median(np.abs(yf / y - 1)) * 100),
        "confirmed_n": int(quiet.sum()),
        "confirmed_predictor_within_10pct": float(np.mean(err[quiet] <= 0.10)),
        "passes": args.passes,
        **{
            k: (float(v) if two else None)
            for k, v in (
                ("truth_pass2_vs_pass1_within_10pct", np.mean(np.abs(y2 / y - 1) <= 0.10)),
                ("truth_pass2_vs_pass1_within_5pct", np.mean(np.abs(y2 / y - 1) <= 0.05)),
                ("predictor_vs_pass2_within_10pct", np.mean(np.abs(yp / y2 - 1) <= 0.10)),
                ("predictor_vs_faster_pass_within_10pct", np.mean(np.abs(yp / ylo - 1) <= 0.10)),
                ("predictor_vs_faster_pass_spearman", spearmanr(ylo, yp).statistic),
            )
        },
        "predictor_median_signed_err_pct": float(np.median(sig) * 100),
        # by the measured time: (specs, share within +-10 %, median signed error %)
        "predictor_by_ms": {
            name: (int(m.sum()), float(np.mean(err[m] <= 0.10)), float(np.median(sig[m]) * 100))
            for name, m in (("<10", y < 10), ("10-50", (y >= 10) & (y <= 50)), (">50", y > 50))
            if m.any()
        },
        "repeat_within_5pct": float(np.mean(rep_err <= 0.05)),
        "repeat_within_10pct": float(np.mean(rep_err <= 0.10)),
        "repeat_median_abs_pct": float(np.median(rep_err) * 100),
        "median_vs_fastest_call_pct": float(
            np.median([r["median_ms"] / r["measured_ms"] - 1 for r in rows]) * 100
        ),
        "measure_cv_median": statistics.median(cvs),
        "measure_cv_p90": float(np.quantile(cvs, 0.9)),
    }
    if earlier:
        # each spec's median over all passes of all runs: one measurement can fall in a
        # slower or faster phase of the machine (on the 2-core VM a spec's fastest call
        # moved by 3-7 % at the median within an hour, the speed probe unchanged)
        over = []
        for r in rows:
            times = [r["measured_ms"], r["measured_ms_pass2"]]
            for run in earlier:
                e = run[r["draw"]]
                times += [e["measured_ms"], e["measured_ms_pass2"]]
            over.append(float(np.median([t for t in times if t])))
        ym = np.asarray(over)
        res["truth_runs"] = 1 + len(earlier)
        res.update(against_truth("median_over_runs", yp, y, ym))
        for r, v in zip(rows, over):
            r["measured_ms_median_over_runs"] = v
    if panel_passes:
        # the truth on one speed: each pass's times divided by the panel's level in it
        levels = panel_levels(panel_passes)
        yn = np.asarray([r["measured_ms"] / levels[r["panel_pass"][0]] for r in rows])
        y2n = np.asarray(
            [
                (r["measured_ms_pass2"] or r["measured_ms"]) / levels[r["panel_pass"][-1]]
                for r in rows
            ]
        )
        res.update(
            {
                "panel_levels": levels,
                "truth_pass2_vs_pass1_within_5pct_panel": float(
                    np.mean(np.abs(y2n / yn - 1) <= 0.05)
                ),
                "truth_pass2_vs_pass1_within_10pct_panel": float(
                    np.mean(np.abs(y2n / yn - 1) <= 0.10)
                ),
            }
        )
        same = [
            e is not None
            and e.get("seed") == reference["seed"]
            and e.get("names") == reference["names"]
            for e in earlier_panel
        ]
        if earlier and all(same):
            # every pass of every run on one speed, then each spec's median over them
            allp = [q for e in earlier_panel for q in e["passes"]] + panel_passes
            lv = panel_levels(allp)
            offs, o = [], 0
            for e in earlier_panel:
                offs.append(o)
                o += len(e["passes"])
            mine = o
            over_n = []
            for r in rows:
                times = [
                    r["measured_ms"] / lv[mine + r["panel_pass"][0]],
                    (r["measured_ms_pass2"] or r["measured_ms"]) / lv[mine + r["panel_pass"][-1]],
                ]
                for run, off in zip(earlier, offs):
                    e = run[r["draw"]]
                    pp = e["panel_pass"]
                    times += [
                        e["measured_ms"] / lv[off + pp[0]],
                        (e["measured_ms_pass2"] or e["measured_ms"]) / lv[off + pp[-1]],
                    ]
                over_n.append(float(np.median(times)))
            ymn = np.asarray(over_n)
            mine_n = np.asarray([r["measured_ms"] / lv[mine + r["panel_pass"][0]] for r in rows])
            res["panel_levels_over_runs"] = lv
            res.update(against_truth("panel_median_over_runs", yp, mine_n, ymn))
            for r, v in zip(rows, over_n):
                r["measured_ms_panel_median_over_runs"] = v
        elif earlier:
            print(
                "an earlier run has no panel or another one: no panel-levelled truth over runs",
                file=sys.stderr,
            )
    print(json.dumps(res, indent=1))
    if args.json:
        out: dict[str, Any] = {"summary": res, "rows": rows}
        if panel_passes:
            out["reference"] = reference
        Path(args.json).write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
