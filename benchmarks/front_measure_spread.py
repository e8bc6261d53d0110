"""How much a search's final latency measurement moves between repeats, with and without the
speed probe.

    python benchmarks/front_measure_spread.py runs/hybrid-lm-quick          # 6 repeats
    python benchmarks/front_measure_spread.py runs/hybrid-lm-quick --repeats 10 --json out.json

A search reports two measured latencies of what it ships: the front re-measure and
``best/report.json`` ``shipped_latency`` (:func:`searchers.latency._measure_together`: the
fastest call over interleaved rounds). This script times the run's ``best/model.onnx`` at the
search's latency shape (``search.latency``: batch, ``seq_len`` or ``train.seq_len``, threads)
``--repeats`` times with each of two procedures, alternating, on one onnxruntime session:

* ``plain``: :data:`~exporters.latency.harness.INTERLEAVED_ROUNDS` rounds, at least
  ``REMEASURE_MIN_ROUND_S`` apart (the procedure before 2026-11-27, session 15);
* ``probe``: the same with the speed probe against this machine's calibrated probe time
  (:func:`searchers.latency.probe_reference_ms`): rounds go on, up to three times as many,
  until two ran at that speed (the procedure since).

It prints each procedure's values, their max / min (1.0 = the repeats agree), and the wall
time per measurement. A small model's 20 rounds span a few seconds, which a slow phase of a
shared VM can cover whole; the probe makes the measurement wait for a fast phase.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run", help="a search's run folder (with best/model.onnx)")
    ap.add_argument("--repeats", type=int, default=6)
    ap.add_argument("--json", default=None, help="write the values here")
    args = ap.parse_args(argv)

    from archir.spec import load_spec
    from archir.spec.sections import SearchSection, TrainSection
    from exporters.latency.harness import (
        SpeedProbe,
        clock,
        measure_interleaved,
        onnx_file_callable,
    )
    from searchers.latency import REMEASURE_MIN_ROUND_S, probe_reference_ms

    run = Path(args.run)
    spec = load_spec(run / "best" / "spec.yaml")
    sec = SearchSection.model_validate(spec.data.get("search") or {})
    lat = sec.latency
    seq = lat.seq_len or TrainSection.model_validate(spec.data.get("train") or {}).seq_len
    lat_ort = lat.model_copy(update={"runtime": "ort"})
    fn = onnx_file_callable(run / "best" / "model.onnx", spec.model, lat.batch, seq, lat.threads)
    ref = probe_reference_ms(lat_ort)
    print(
        f"{run / 'best' / 'model.onnx'}: batch {lat.batch}, seq {seq}, {lat.threads} thread(s); "
        f"calibrated probe time {ref} ms",
        file=sys.stderr,
    )
    out: dict[str, list[dict[str, Any]]] = {"plain": [], "probe": []}
    with SpeedProbe("ort", lat.threads) as probe:
        for i in range(args.repeats):
            for name in ("plain", "probe"):
                kw: dict[str, Any] = {}
                if name == "probe":
                    kw = {"probe": probe, "probe_ref_ms": ref, "probe_stats": {}}
                t = time.perf_counter()
                m = measure_interleaved(
                    {0: fn},
                    warmup=lat.warmup,
                    min_round_s=REMEASURE_MIN_ROUND_S,
                    timer=clock(lat.threads),
                    **kw,
                )[0]
                row = {
                    "ms": m.min_ms,
                    "wall_s": time.perf_counter() - t,
                    "windows": len(m.window_ms),
                }
                if name == "probe":
                    row["fast_rounds"] = kw["probe_stats"]["fast_rounds"]
                out[name].append(row)
            print(
                f"  repeat {i}: plain {out['plain'][-1]['ms']:.3f} ms, "
                f"probe {out['probe'][-1]['ms']:.3f} ms",
                file=sys.stderr,
            )
    summary = {}
    for name, rows in out.items():
        ms = [r["ms"] for r in rows]
        summary[name] = {
            "max_over_min": max(ms) / min(ms),
            "wall_s_mean": sum(r["wall_s"] for r in rows) / len(rows),
        }
        print(
            f"{name:6s} ms {' '.join(f'{v:.3f}' for v in ms)}  max/min "
            f"{summary[name]['max_over_min']:.3f}  wall {summary[name]['wall_s_mean']:.1f} s "
            f"per measurement"
        )
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": out, "summary": summary}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
