"""Does graph-mutation evolution beat NSGA-II over the spec's choices, and random, at equal
CPU time?

On the main job's space (``specs/search/hybrid-lm-quick.yaml``, ``text:pydoc``, rungs
60 / 240 / 960, eta 3, constraints ``params <= 8e5`` and ``weight_bytes <= 1e6``), each
arm searches for the same wall time with one worker process; two arms run side by side,
one per core (``--jobs 2``), so each gets the same CPU time:

* ``nsga2+ladder`` — the main job as shipped (NSGA-II over the spec's choices);
* ``random+ladder`` — the same ladder, random proposals;
* ``evolution+ladder`` — ``--searcher evolution`` with the spec's ``search.evolution``
  section: its first population is sampled from the spec's choices, then children are
  mutated graphs — kinds swapped, layers inserted or dropped (depth 2–6, wider than the
  spec's 3–4), widths, heads, state sizes and bits moved, layers tied, skips added;
* ``evolution+inherit`` — the same with ``inherit: true`` (children start from their
  parents' trained weights).

Each arm's front is read at 960 steps only (lower rungs do not count), trials finished
within the budget, and scored by the hypervolume of (val_bpb, latency_ms) against the
reference point (3.0 bpb, 20 ms), higher is better — the same scoring as
``benchmarks/ladder_search.py``.

    python benchmarks/evolution_search.py [--seeds 0 1 2] [--seconds 200] [--jobs 2]

Results go to ``benchmarks/evolution_search_results.json`` and the table to stdout.
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ladder_search import _main_data, front_at_top, hypervolume  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
ARMS = ("nsga2+ladder", "random+ladder", "evolution+ladder", "evolution+inherit")


def arm_spec(tmp: Path, arm: str, seed: int, seconds: float) -> Path:
    data = _main_data()
    sec = data["search"]
    sec["seed"] = seed
    sec["budget"] = {"trials": 10_000, "timeout_s": seconds}
    sec["max_rejections"] = 10_000
    sec["workers"] = 1
    if arm.startswith("random"):
        sec["sampler"] = "random"
    if arm == "evolution+inherit":
        sec["evolution"]["inherit"] = True
    data["name"] = f"bench-{arm.replace('+', '-')}-{seed}"
    p = tmp / f"{data['name']}.yaml"
    p.write_text(yaml.safe_dump(data, sort_keys=False))
    return p


def run_arm(arm: str, seed: int, seconds: float) -> dict[str, Any]:
    """One search; ``in_budget``: trials that finished within ``seconds`` of its start."""
    import optuna

    from searchers.objectives import trial_attrs
    from searchers.run import run_search
    from searchers.storage import open_storage

    with tempfile.TemporaryDirectory() as t:
        tmp = Path(t)
        spec = arm_spec(tmp, arm, seed, seconds)
        t0 = time.time()
        run_search(
            spec,
            out=tmp / "run",
            export=False,
            searcher="evolution" if arm.startswith("evolution") else "optuna",
            say=lambda s: None,
        )
        wall = time.time() - t0
        doc = json.loads((tmp / "run" / "pareto.json").read_text())
        st = open_storage(None, tmp / "run" / "study.journal")
        name = yaml.safe_load(spec.read_text())["name"]
        deadline = datetime.datetime.fromtimestamp(t0 + seconds)
        trials = optuna.load_study(study_name=name, storage=st).trials
        in_budget = [
            t.number for t in trials if t.datetime_complete and t.datetime_complete <= deadline
        ]
        origins: dict[str, int] = {}
        depths = []
        for tr in trials:
            a = trial_attrs(tr)
            lin = a.get("lineage")
            if tr.number in in_budget and isinstance(lin, dict) and a.get("continue_of") is None:
                origins[lin["origin"]] = origins.get(lin["origin"], 0) + 1
            if tr.number in in_budget and a.get("spec_yaml") and a.get("continue_of") is None:
                model = yaml.safe_load(a["spec_yaml"])["model"]
                depths.append(sum(int(g.get("repeat", 1)) for g in model["layers"]))
    return {
        "arm": arm,
        "seed": seed,
        "wall_s": wall,
        "doc": doc,
        "in_budget": in_budget,
        "origins": origins,
        "depths": depths,
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--seconds", type=float, default=200.0)
    ap.add_argument("--arms", nargs="+", default=list(ARMS), choices=ARMS)
    ap.add_argument("--ref-bpb", type=float, default=3.0)
    ap.add_argument("--ref-ms", type=float, default=20.0)
    ap.add_argument("--jobs", type=int, default=2, help="arms run side by side, 1 worker each")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "evolution_search_results.json"))
    args = ap.parse_args()
    top = _main_data()["search"]["fidelity"]["rungs"][-1]
    ref = (args.ref_bpb, args.ref_ms)
    jobs = [(arm, seed, args.seconds) for seed in args.seeds for arm in args.arms]
    rows = []
    with ProcessPoolExecutor(args.jobs) as ex:
        for r in ex.map(run_arm, *zip(*jobs)):
            pts = front_at_top(r["doc"], top, r["in_budget"])
            r.update(
                hv=hypervolume(pts, ref),
                n_top=len(pts),
                n_models=sum(
                    1
                    for row in r["doc"]["trials"]
                    if row["trial"] in set(r["in_budget"])
                    and row.get("continue_of") is None
                    and row.get("duplicate_of") is None
                    and row["status"] == "ok"
                ),
                best_bpb=min((p[0] for p in pts), default=float("nan")),
                points=pts,
            )
            del r["doc"]
            rows.append(r)
            print(
                f"{r['arm']:<18} seed {r['seed']}: HV {r['hv']:.3f}, {r['n_models']} models, "
                f"{r['n_top']} at {top} steps, best val_bpb {r['best_bpb']:.3f}, depths "
                f"{min(r['depths'], default=0)}-{max(r['depths'], default=0)}, origins "
                f"{r['origins']} ({r['wall_s']:.0f} s)",
                flush=True,
            )
    print(f"\narm                 HV mean [min, max]       best val_bpb at {top} steps (mean)")
    summary = {}
    for arm in args.arms:
        rs = [r for r in rows if r["arm"] == arm]
        hv = [r["hv"] for r in rs]
        bb = [r["best_bpb"] for r in rs if r["best_bpb"] == r["best_bpb"]]
        summary[arm] = {
            "hv_mean": statistics.mean(hv),
            "hv_min": min(hv),
            "hv_max": max(hv),
            "best_bpb_mean": statistics.mean(bb) if bb else None,
        }
        print(
            f"{arm:<19} {statistics.mean(hv):.3f} [{min(hv):.3f}, {max(hv):.3f}]      "
            + (f"{statistics.mean(bb):.3f}" if bb else "-")
        )
    Path(args.out).write_text(
        json.dumps(
            {
                "seconds": args.seconds,
                "seeds": args.seeds,
                "ref": ref,
                "summary": summary,
                "runs": rows,
                "date": datetime.date.today().isoformat(),
            },
            indent=1,
        )
    )


if __name__ == "__main__":
    main()
