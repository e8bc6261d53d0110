"""What does weight inheritance buy evolution, and does an inherited evaluation rank like
training from scratch?

Parents: architectures drawn from the main job's space (``specs/search/hybrid-lm-quick.yaml``,
within its cost constraints), each trained ``--parent-steps`` steps (``wsd``, the search's
settings). Children: ``--children`` one-operator mutants of each parent drawn by
``searchers.evolution`` from the spec's ``search.evolution`` section (valid, within the
constraints, each a new model; the ``bits`` operator is left out, as it changes only the
evaluation's quantization, not what is trained). Each child is trained twice on ``text:pydoc``, with the
same seed and ladder (``train_ladder``: one ``wsd`` trunk, a decay branch per rung):

* **fresh**: from a fresh initialization, rungs 20 / 60 / 120 / 240 / ``--top``;
* **inherited**: from its parent's trained weights mapped onto its blocks
  (``searchers.evolution.inherited_source`` + ``archir.inherit.inherit``), rungs
  20 / 60 / 120 / 240.

Reported: the steps each needs to reach its parent's ``val_bpb`` (the first rung at or
below it), and Kendall τ of the rung-0 (60-step) and 240-step scores against the fresh
top-rung score (the truth a user retraining the child from scratch gets), for the fresh and
the inherited evaluations.

    python benchmarks/inheritance.py [--parents 4] [--children 4] [--top 480] [--jobs 2]

Results go to ``benchmarks/inheritance_results.json`` and the table to stdout.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
MAIN = ROOT / "specs" / "search" / "hybrid-lm-quick.yaml"
LOW = [20, 60, 120, 240]


def _cfg() -> Any:
    from archir.spec.loader import load_spec
    from archir.spec.sections import TrainSection

    main = load_spec(MAIN).data
    return TrainSection.model_validate(main["train"]).model_copy(
        update={"eval_batches": 100_000, "eval_batch_size": 64, "threads": 1}
    )


def _ladder(data: dict[str, Any], rungs: list[int], init: tuple[str, list[Any]] | None) -> dict:
    import torch

    from archir.compiler import compile as compile_spec
    from archir.inherit import inherit
    from archir.spec.loader import Spec
    from archir.tasks.base import get_task
    from archir.train import train_ladder
    from searchers.evolution import inherited_source

    torch.set_num_threads(1)
    spec = Spec(data)
    cfg = _cfg()
    task = get_task(cfg.task, cfg.task_options)
    model = compile_spec(spec, seed=cfg.seed)
    if init is not None:
        path, origins = init
        src, _ = inherited_source(Path(path).parent, origins, lambda n: Path(path))
        inherit(model, src)
    t0 = time.process_time()
    res = train_ladder(spec, task, cfg, rungs, model=model)
    out = {
        "rungs": {int(r["steps"]): float(r["val_bpb"]) for r in res.metrics["rungs"]},
        "cpu_s": time.process_time() - t0,
    }
    return {**out, "model": res.model}


def parent_job(data: dict[str, Any], steps: int, path: str) -> dict[str, Any]:
    from safetensors.torch import save_model

    r = _ladder(data, [steps // 4, steps], None)
    save_model(r.pop("model"), path)
    return r


def child_job(data: dict[str, Any], top: int, init: tuple[str, list[Any]] | None) -> dict:
    r = _ladder(data, LOW + ([top] if init is None else []), init)
    r.pop("model")
    return r


def kendall(a: list[float], b: list[float]) -> float:
    from scipy.stats import kendalltau

    return float(kendalltau(a, b).statistic)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--parents", type=int, default=4)
    ap.add_argument("--children", type=int, default=4)
    ap.add_argument("--parent-steps", type=int, default=240)
    ap.add_argument("--top", type=int, default=480)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "inheritance_results.json"))
    args = ap.parse_args()

    from archir.spec.loader import Spec, load_spec
    from archir.spec.space import random_decider
    from searchers.evolution import Evolution, genome_of, mutate, to_data
    from searchers.objectives import parse_objectives
    from searchers.space import spec_hash

    spec = load_spec(MAIN)
    sec = spec.data["search"]
    objs, cons = parse_objectives(
        sec["objectives"],
        sec["constraints"],
        task_metric="val_bpb",
        task_direction="minimize",
        task_metrics=("val_bpb", "val_loss"),
        trains=True,
    )
    from archir.spec.sections import EvolutionSection

    # bits only change the evaluation's fake quantization, not what is trained: left out, so
    # that every child trains a different model
    evo_sec = {**sec["evolution"], "operators": {"bits": 0}}
    evo = Evolution(EvolutionSection.model_validate(evo_sec), spec, objs, cons, None, args.seed)
    from searchers.evolution import check_child

    rng = random.Random(args.seed)
    parents: list[dict[str, Any]] = []
    while len(parents) < args.parents:
        d = spec.fix(random_decider(rng)).data
        d["name"] = f"parent-{len(parents)}"
        if check_child(d, evo.constraints)[0] is not None:
            parents.append(d)
    tmp = Path(tempfile.mkdtemp(prefix="inherit-bench-"))
    paths = [str(tmp / f"parent{i}.safetensors") for i in range(len(parents))]
    with ProcessPoolExecutor(args.jobs) as ex:
        pres = list(ex.map(parent_job, parents, [args.parent_steps] * len(parents), paths))
    children: list[tuple[int, dict[str, Any], list[Any], list[str]]] = []
    seen = {spec_hash(Spec(p)) for p in parents}
    for pi, p in enumerate(parents):
        got = 0
        while got < args.children:
            child = mutate(genome_of(p, 0), evo.space, rng, 1)
            data, origins = to_data(child)
            data["name"] = f"child-{pi}-{got}"
            s, _ = check_child(data, evo.constraints)
            if s is None or spec_hash(s) in seen:
                continue
            seen.add(spec_hash(s))
            mapped = [[0, o[1]] if o is not None else None for o in origins]
            children.append((pi, data, mapped, child.mutations))
            got += 1
    jobs = []
    for pi, data, mapped, _ in children:
        jobs.append((data, args.top, None))
        jobs.append((data, args.top, (paths[pi], mapped)))
    with ProcessPoolExecutor(args.jobs) as ex:
        res = list(ex.map(child_job, *zip(*jobs)))
    rows = []
    for k, (pi, _, _, muts) in enumerate(children):
        fresh, inh = res[2 * k], res[2 * k + 1]
        target = pres[pi]["rungs"][args.parent_steps]

        def reach(r: dict[int, float], target: float = target) -> int | None:
            return next((s for s in sorted(r) if r[s] <= target), None)

        rows.append(
            {
                "parent": pi,
                "mutations": muts,
                "parent_bpb": target,
                "fresh": fresh["rungs"],
                "inherited": inh["rungs"],
                "fresh_reach": reach(fresh["rungs"]),
                "inherited_reach": reach(inh["rungs"]),
            }
        )
        print(
            f"child {pi}.{k}: {'; '.join(muts)[:70]:<70} parent {target:.3f} | "
            f"fresh 60:{fresh['rungs'][60]:.3f} 240:{fresh['rungs'][240]:.3f} "
            f"{args.top}:{fresh['rungs'][args.top]:.3f} reach {reach(fresh['rungs'])} | "
            f"inherited 20:{inh['rungs'][20]:.3f} 60:{inh['rungs'][60]:.3f} "
            f"240:{inh['rungs'][240]:.3f} reach {reach(inh['rungs'])}",
            flush=True,
        )
    truth = [r["fresh"][args.top] for r in rows]
    summary = {
        "tau_fresh_60": kendall([r["fresh"][60] for r in rows], truth),
        "tau_inherited_60": kendall([r["inherited"][60] for r in rows], truth),
        "tau_fresh_240": kendall([r["fresh"][240] for r in rows], truth),
        "tau_inherited_240": kendall([r["inherited"][240] for r in rows], truth),
        "inherited_reach_median": statistics.median([r["inherited_reach"] or 10**9 for r in rows]),
        "fresh_reach_median": statistics.median([r["fresh_reach"] or 10**9 for r in rows]),
        "reached_inherited": sum(r["inherited_reach"] is not None for r in rows),
        "reached_fresh": sum(r["fresh_reach"] is not None for r in rows),
        "n_children": len(rows),
    }
    print(json.dumps(summary, indent=1))
    Path(args.out).write_text(
        json.dumps({"args": vars(args), "summary": summary, "rows": rows}, indent=1)
    )


if __name__ == "__main__":
    main()
