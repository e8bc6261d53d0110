"""Does the laddered search beat the obvious alternatives at equal CPU time?

On the main job's space (``specs/search/hybrid-lm-quick.yaml``, ``text:pydoc``), each arm
searches for the same wall time with one worker process (so the same CPU time: two arms run
side by side, one per core, ``--jobs 2``), for each seed:

* ``nsga2+ladder`` — the main job as shipped: NSGA-II, rungs 50 / 200 / 800, eta 3;
* ``random+ladder`` — the same ladder, random proposals;
* ``random`` — random proposals, every model trained the full 800 steps (same ``wsd``
  schedule, same whole-split evaluation), no ladder.

Each arm's front is read at 800 steps only (a ladder's lower rungs do not count) and scored
by the hypervolume of (val_bpb, latency_ms) — both minimized — against the reference point
(``--ref-bpb``, ``--ref-ms``), higher is better; latency as the search measured it.

The best model found is then compared with the zoo Transformer and the zoo hybrid
(``specs/zoo/transformer.yaml``, ``hybrid.yaml``) trained with the same budget: the same
``wsd`` schedule, batch and learning rate as the search, for as many steps as one worker's
share of the search's CPU time allows (``--zoo-steps``, default: measured), their latency
measured like the search's.

    python benchmarks/ladder_search.py [--seeds 0 1 2] [--seconds 300] [--arms ...] [--jobs 2]

Results go to ``benchmarks/ladder_search_results.json`` and the table to stdout.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
MAIN = ROOT / "specs" / "search" / "hybrid-lm-quick.yaml"
ARMS = ("nsga2+ladder", "random+ladder", "random")


def _main_data() -> dict[str, Any]:
    """The main job's spec as data (read by archir's loader: YAML 1.2 numbers such as 3e-3)."""
    import copy

    from archir.spec.loader import load_spec

    return copy.deepcopy(load_spec(MAIN).data)


def arm_spec(tmp: Path, arm: str, seed: int, seconds: float) -> Path:
    data = _main_data()
    sec = data["search"]
    sec["seed"] = seed
    sec["budget"] = {"trials": 10_000, "timeout_s": seconds}
    sec["max_rejections"] = 10_000
    sec["workers"] = 1
    if arm.startswith("random"):
        sec["sampler"] = "random"
    if arm == "random":
        top = sec["fidelity"]["rungs"][-1]
        data["train"].update(steps=top, schedule="wsd", eval_batches=100_000, eval_batch_size=64)
        sec["fidelity"] = {"kind": "full"}
    data["name"] = f"bench-{arm.replace('+', '-')}-{seed}"
    p = tmp / f"{data['name']}.yaml"
    p.write_text(yaml.safe_dump(data, sort_keys=False))
    return p


def front_at_top(
    doc: dict[str, Any], top_steps: int, in_budget: list[int]
) -> list[tuple[float, float]]:
    """(val_bpb, latency_ms) of the feasible trials evaluated at ``top_steps`` that finished
    within the budget, as found."""
    pts = []
    ok = set(in_budget)
    for row in doc["trials"]:
        if row["status"] != "ok" or row.get("duplicate_of") is not None or row["trial"] not in ok:
            continue
        if row.get("steps") != top_steps:
            continue
        v = row["values"]
        if "val_bpb" in v and "latency_ms" in v:
            pts.append((float(v["val_bpb"]), float(v["latency_ms"])))
    return pts


def hypervolume(pts: list[tuple[float, float]], ref: tuple[float, float]) -> float:
    from searchers.pareto import hypervolume_2d

    return float(hypervolume_2d(pts, ["minimize", "minimize"], ref)) if pts else 0.0


def run_arm(arm: str, seed: int, seconds: float) -> dict[str, Any]:
    """One search; ``in_budget``: the trials that finished within ``seconds`` of its start
    (a trial running at the deadline is finished by the search but not counted here)."""
    import datetime

    import optuna

    from searchers.run import run_search
    from searchers.storage import open_storage

    with tempfile.TemporaryDirectory() as t:
        tmp = Path(t)
        spec = arm_spec(tmp, arm, seed, seconds)
        t0 = time.time()
        run_search(spec, out=tmp / "run", export=False, say=lambda s: None)
        wall = time.time() - t0
        doc = json.loads((tmp / "run" / "pareto.json").read_text())
        st = open_storage(None, tmp / "run" / "study.journal")
        name = yaml.safe_load(spec.read_text())["name"]
        deadline = datetime.datetime.fromtimestamp(t0 + seconds)
        trials = optuna.load_study(study_name=name, storage=st).trials
        in_budget = [
            t.number for t in trials if t.datetime_complete and t.datetime_complete <= deadline
        ]
    return {"arm": arm, "seed": seed, "wall_s": wall, "doc": doc, "in_budget": in_budget}


def zoo_model(name: str, steps: int) -> dict[str, Any]:
    """A zoo spec trained ``steps`` steps with the search's training settings (wsd)."""
    import torch

    from archir.compiler import compile as compile_spec
    from archir.spec.loader import load_spec
    from archir.spec.sections import SearchSection, TrainSection
    from archir.train import train
    from searchers.latency import trial_latency

    torch.set_num_threads(1)
    spec = load_spec(ROOT / "specs" / "zoo" / f"{name}.yaml")
    main = _main_data()
    cfg = TrainSection.model_validate(main["train"]).model_copy(
        update={
            "steps": steps,
            "schedule": "wsd",
            "eval_every": steps,
            "eval_batches": 100_000,
            "eval_batch_size": 64,
            "threads": 1,
        }
    )
    t0 = time.process_time()
    res = train(spec, None, None, cfg)
    cpu = time.process_time() - t0
    sec = SearchSection.model_validate(main["search"])
    lat = trial_latency(spec, sec.latency, cfg.seq_len, compile_spec(spec, seed=0))
    from archir.cost import analyze

    return {
        "name": name,
        "steps": steps,
        "cpu_s": cpu,
        "val_bpb": float(res.metrics["val_bpb"]),
        "latency_ms": float(lat["ms"]),
        "params": float(analyze(spec).params),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--seconds", type=float, default=300.0)
    ap.add_argument("--arms", nargs="+", default=list(ARMS), choices=ARMS)
    ap.add_argument("--ref-bpb", type=float, default=3.0)
    ap.add_argument("--ref-ms", type=float, default=20.0)
    ap.add_argument("--zoo-steps", type=int, default=None)
    ap.add_argument("--jobs", type=int, default=2, help="arms run side by side, 1 worker each")
    ap.add_argument("--zoo-only", action="store_true", help="reuse --out's arms, redo the zoo")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "ladder_search_results.json"))
    args = ap.parse_args()
    top = _main_data()["search"]["fidelity"]["rungs"][-1]
    ref = (args.ref_bpb, args.ref_ms)
    rows = []
    jobs = [(arm, seed, args.seconds) for seed in args.seeds for arm in args.arms]
    if args.zoo_only:  # the arms of an earlier run (--out), the zoo models again
        done = []
        rows = json.loads(Path(args.out).read_text())["runs"]
    else:
        with ProcessPoolExecutor(args.jobs) as ex:
            done = list(ex.map(run_arm, *zip(*jobs)))
    for r in done:
        arm, seed = r["arm"], r["seed"]
        pts = front_at_top(r["doc"], top, r["in_budget"])
        r.update(
            hv=hypervolume(pts, ref),
            n_top=len(pts),
            n_models=len(
                {
                    json.dumps(row["params"], sort_keys=True)
                    for row in r["doc"]["trials"]
                    if row["trial"] in set(r["in_budget"])
                    and row.get("continue_of") is None
                    and row.get("duplicate_of") is None
                    and row["status"] == "ok"
                }
            ),
            best_bpb=min((p[0] for p in pts), default=float("nan")),
            points=pts,
        )
        del r["doc"]
        rows.append(r)
        print(
            f"{arm:<14} seed {seed}: HV {r['hv']:.3f}, {r['n_models']} models drawn, "
            f"{r['n_top']} at {top} steps, best val_bpb {r['best_bpb']:.3f} "
            f"({r['wall_s']:.0f} s)",
            flush=True,
        )
    # the zoo models with the same CPU time as one arm
    names = ("transformer", "hybrid")
    if args.zoo_steps is None:
        # the CPU time of a step, from two short runs (their difference leaves out the
        # compile and the whole-split evaluation every run has once)
        with ProcessPoolExecutor(args.jobs) as ex:
            short = list(ex.map(zoo_model, names, [20, 20]))
            long = list(ex.map(zoo_model, names, [80, 80]))
        steps = []
        for a, b in zip(short, long):
            per_step = (b["cpu_s"] - a["cpu_s"]) / 60
            fixed = max(0.0, a["cpu_s"] - 20 * per_step)
            steps.append(int((args.seconds - fixed) / per_step))
    else:
        steps = [args.zoo_steps] * len(names)
    with ProcessPoolExecutor(args.jobs) as ex:
        zoo = list(ex.map(zoo_model, names, steps))
    for n, name in zip(steps, names):
        print(
            f"zoo {name}: {n} steps in {zoo[names.index(name)]['cpu_s']:.0f} CPU s, "
            f"val_bpb {zoo[names.index(name)]['val_bpb']:.3f}, "
            f"latency {zoo[names.index(name)]['latency_ms']:.2f} ms",
            flush=True,
        )
    print("\narm             HV (mean [min, max])     best val_bpb at top rung   models drawn")
    for arm in args.arms:
        rs = [r for r in rows if r["arm"] == arm]
        hv = [r["hv"] for r in rs]
        best = [r["best_bpb"] for r in rs]
        print(
            f"{arm:<15} {statistics.fmean(hv):.3f} [{min(hv):.3f}, {max(hv):.3f}]     "
            f"{statistics.fmean(best):.3f} [{min(best):.3f}, {max(best):.3f}]     "
            f"{statistics.fmean(r['n_models'] for r in rs):.1f}"
        )
    for z in zoo:
        beat = []
        for r in rows:
            cand = [p for p in r["points"] if p[1] <= z["latency_ms"]]
            if cand:
                beat.append(min(p[0] for p in cand) < z["val_bpb"])
        print(
            f"zoo {z['name']}: val_bpb {z['val_bpb']:.3f} at {z['latency_ms']:.2f} ms; a searched "
            f"model at equal or lower latency beats it in {sum(beat)}/{len(rows)} runs"
        )
    Path(args.out).write_text(
        json.dumps({"seconds": args.seconds, "ref": ref, "runs": rows, "zoo": zoo}, indent=1)
    )


if __name__ == "__main__":
    main()
