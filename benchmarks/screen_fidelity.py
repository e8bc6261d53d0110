"""How well a search's default latency screen ranks what ships.

    python benchmarks/screen_fidelity.py                       # the main job's space, 24 specs
    python benchmarks/screen_fidelity.py --space specs/search/hybrid-lm.yaml --n 30
    python benchmarks/screen_fidelity.py --export-only --export-workers 2   # any load

A search with the default ``search.latency`` (``runtime: torch``, no calibration; the main
job's until 2026-11-27) ranks every trial by a **quick screen**: eager PyTorch at fp32, ``warmup`` untimed and ``repeats`` timed
calls (:func:`searchers.latency.trial_latency`), and re-measures the Pareto front the same
way before reporting. The user then runs ``best/model.onnx``: onnxruntime, at the precision
the spec's per-block ``bits`` select. This script draws concrete specs from a search space
that meet its pre-training constraints (``params``, ``weight_bytes``) — the models such a
search trains and ranks — and measures, at the space's latency shape and threads:

* ``screen``: the quick screen exactly as a trial gets it (one call of ``trial_latency``);
* ``torch``: eager fp32 again, the fastest call over the harness's interleaved rounds (the
  statistic the front is re-measured with);
* ``ort``: the shipped graph (``exporters.latency.harness.export_onnx_file``: the one export
  path at the bits' precision) on onnxruntime, interleaved with ``torch`` in the same rounds.

It prints, for each proxy — ``screen``, ``torch`` and, per ``--calibration FILE``, that
calibration's prediction (``predicted_0`` ...) — Spearman ρ and Kendall τ against ``ort`` (a
proxy ranks well when these are near 1) and how often it orders a pair of specs whose
``ort`` times differ by more than 10 % the other way; then the median ``ort / torch`` of the
specs holding each block kind (why the ranking moves). Exports are cached in ``--export-dir`` (keyed by seed, draw and spec
hash), so timing can be repeated on a quiet machine.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from itertools import combinations
from pathlib import Path
from typing import Any

import numpy as np
from scipy.stats import kendalltau, spearmanr

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from latency_predictor import export_all, export_path  # noqa: E402 - the same export workers

#: export time limit per model (s); the main job's models take 13-55 s on this VM
EXPORT_LIMIT_S = 600.0


def draw_feasible(space: Any, sec: Any, n: int, seed: int) -> list[Any]:
    """``n`` distinct concrete specs of ``space`` that meet the pre-training constraints of
    its ``search:`` section ``sec``."""
    from archir.cost import analyze
    from archir.hashing import canonical_hash
    from exporters.latency.calibrate import draw_from_space
    from searchers.objectives import check_constraints, parse_constraint

    cons = [parse_constraint(k, v) for k, v in (sec.constraints or {}).items()]
    rng = random.Random(seed)
    out: list[Any] = []
    seen: set[str] = set()
    for _ in range(200 * n):
        if len(out) >= n:
            break
        s = draw_from_space(space, rng)
        if s is None:
            continue
        h = canonical_hash(s)
        if h in seen:
            continue
        seen.add(h)
        rep = analyze(s)
        values = {"params": rep.params, "weight_bytes": rep.weight_bytes}
        if check_constraints(cons, values, pre_training=True):
            continue
        out.append(s)
    return out


def discordant(proxy: np.ndarray, truth: np.ndarray, margin: float = 0.10) -> tuple[int, int]:
    """(pairs the proxy orders against the truth, pairs whose truth differs by > margin)."""
    bad = total = 0
    for i, j in combinations(range(len(truth)), 2):
        if max(truth[i], truth[j]) <= (1 + margin) * min(truth[i], truth[j]):
            continue
        total += 1
        bad += (proxy[i] - proxy[j]) * (truth[i] - truth[j]) < 0
    return bad, total


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--space", default=str(ROOT / "specs" / "search" / "hybrid-lm-quick.yaml"))
    ap.add_argument("--n", type=int, default=24, help="concrete specs drawn")
    ap.add_argument("--seed", type=int, default=5)
    ap.add_argument("--export-dir", default="/tmp/archir-screen-exports")
    ap.add_argument("--export-workers", type=int, default=1)
    ap.add_argument("--export-only", action="store_true")
    ap.add_argument(
        "--calibration",
        action="append",
        default=[],
        help="also rank by the predictor of this calibration file (repeatable)",
    )
    ap.add_argument("--json", default=None, help="write the rows and summary here")
    args = ap.parse_args()

    from archir.spec import load_spec
    from archir.spec.sections import SearchSection, TrainSection

    space = load_spec(args.space)
    sec = SearchSection.model_validate(space.data.get("search") or {})
    lat = sec.latency
    train_seq = int(TrainSection.model_validate(space.data.get("train") or {}).seq_len)
    seq = int(lat.seq_len or train_seq)
    specs = draw_feasible(space, sec, args.n, args.seed)
    root = Path(args.export_dir)
    root.mkdir(parents=True, exist_ok=True)
    export_all([(s, seq) for s in specs], root, args.seed, args.export_workers, EXPORT_LIMIT_S)
    paths = [export_path(root, args.seed, i, s.data) for i, s in enumerate(specs)]
    if args.export_only:
        return 0

    from contextlib import ExitStack

    import archir
    from exporters.latency.harness import (
        Runner,
        clock,
        measure_interleaved,
        onnx_file_callable,
        torch_threads,
    )
    from searchers.latency import trial_latency

    # the default screen, whatever the space's own latency section says (the main job's
    # now predicts onnxruntime): torch eager, never predicted
    screen_lat = lat.model_copy(update={"runtime": "torch", "predict": False})
    rows: list[dict[str, Any]] = []
    fns: dict[tuple[int, str], Any] = {}
    with torch_threads(lat.threads), ExitStack() as stack:
        for i, (s, p) in enumerate(zip(specs, paths)):
            if not p.exists():
                continue
            model = archir.compile(s).eval()
            screen = trial_latency(s, screen_lat, train_seq, model)["ms"]  # as a trial got it
            r = stack.enter_context(Runner(s, "torch", threads=lat.threads, model=model))
            fns[(i, "torch")] = r.call_for(lat.batch, seq)  # as the front is re-measured
            fns[(i, "ort")] = onnx_file_callable(p, s.model, lat.batch, seq, lat.threads)
            m = s.model.model
            kinds = sorted({b.kind for layer in m.layers for b in layer.blocks if b.kind})
            rows.append(
                {
                    "draw": i,
                    "name": s.name,
                    "d_model": m.d_model,
                    "screen_ms": screen,
                    "kinds": kinds,
                }
            )
        t1 = time.perf_counter()
        got = measure_interleaved(fns, warmup=lat.warmup, timer=clock(lat.threads))
        timing_s = round(time.perf_counter() - t1, 1)
    for r in rows:
        r["torch_ms"] = got[(r["draw"], "torch")].min_ms
        r["ort_ms"] = got[(r["draw"], "ort")].min_ms
    from exporters.latency import graph_features, load_calibration
    from exporters.latency.calibrate import predictor_from

    proxies = ["screen", "torch"]
    for j, f in enumerate(args.calibration):
        pred = predictor_from(load_calibration(f, runtime="ort", threads=lat.threads))
        for r in rows:
            g = graph_features(specs[r["draw"]], lat.batch, seq)
            r[f"predicted_{j}_ms"] = pred.predict(g).ms
        proxies.append(f"predicted_{j}")
        print(f"predicted_{j}: {f}")
    ort = np.array([r["ort_ms"] for r in rows])
    summary: dict[str, Any] = {
        "n": len(rows),
        "seq": seq,
        "threads": lat.threads,
        "timing_s": timing_s,
    }
    print(
        f"\n{len(rows)} specs of {Path(args.space).name} at [{lat.batch}, {seq}], "
        f"{lat.threads} thread(s); timed in {summary['timing_s']} s"
    )
    print(
        f"{'draw':>4} {'d':>4} {'screen ms':>9} {'torch ms':>9} {'ort ms':>8} {'ort/torch':>9}  kinds"
    )
    for r in sorted(rows, key=lambda r: r["ort_ms"]):
        print(
            f"{r['draw']:4d} {r['d_model']:4d} {r['screen_ms']:9.2f} {r['torch_ms']:9.2f} "
            f"{r['ort_ms']:8.2f} {r['ort_ms'] / r['torch_ms']:9.2f}  {','.join(r['kinds'])}"
        )
    for name in proxies:
        proxy = np.array([r[f"{name}_ms"] for r in rows])
        rho = float(spearmanr(proxy, ort).statistic)
        tau = float(kendalltau(proxy, ort).statistic)
        bad, total = discordant(proxy, ort)
        summary[name] = {
            "spearman": rho,
            "kendall": tau,
            "discordant": int(bad),
            "pairs": int(total),
        }
        print(
            f"{name:>6} vs shipped ort: Spearman {rho:.3f}  Kendall tau {tau:.3f}  "
            f"orders {bad} of {total} pairs (> 10 % apart in ort) the other way"
        )
    by_kind: dict[str, list[float]] = {}
    for r in rows:
        for k in r["kinds"]:
            by_kind.setdefault(k, []).append(r["ort_ms"] / r["torch_ms"])
    summary["ort_over_torch_median_by_kind"] = {k: statistics.median(v) for k, v in by_kind.items()}
    print(
        "median ort/torch of the specs containing each kind: "
        + ", ".join(
            f"{k} {v:.2f}" for k, v in sorted(summary["ort_over_torch_median_by_kind"].items())
        )
    )
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows, "summary": summary}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
