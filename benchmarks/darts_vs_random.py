"""DARTS, GDAS, SPOS and random search side by side on a small hybrid space (CPU).

Usage::

    python benchmarks/darts_vs_random.py [--task text:pydoc|mad] [--trials 4] [--steps 60]
        [--out /tmp/darts_bench] [--methods random,darts,gdas,spos]

Each method gets the same trial budget: random search trains ``--trials`` architectures for
``--steps`` steps each; the one-shot methods train a supernet for about the same number of
single-model steps (the one-shot searchers' default) and retrain their pick for ``--steps``.
Printed (and written to ``<out>/results.json``): best quality, constraint satisfaction,
process CPU minutes, and the supernet's step time / weights against one candidate.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path
from typing import Any

import torch


def space(task: str, steps: int, trials: int) -> dict[str, Any]:
    mad = task.startswith("mad")
    return {
        "archir": 1,
        "name": "darts-bench",
        "model": {
            "task": "causal_lm",
            "vocab_size": 16 if mad else 256,
            "d_model": 32,
            "max_seq_len": 64,
            "embed": {"kind": "token_embedding"},
            "layers": [
                {
                    "repeat": {"int": [1, 2]},
                    "blocks": [
                        {
                            "kind": {"choice": ["attention", "identity", "hyena"]},
                            "n_heads": 2,
                        },
                        {
                            "kind": "swiglu",
                            "expansion": {"choice": [2, 4]},
                            "bits": {"choice": [16, 8]},
                        },
                    ],
                }
            ],
            "head": {"kind": "lm_head", "tie_embeddings": True},
        },
        "train": {
            "task": "mad:in-context-recall" if mad else "text:pydoc",
            "task_options": {"preset": "lite"} if mad else {},
            "steps": steps,
            "batch_size": 16,
            "seq_len": 64,
            "lr": 3e-3,
            "eval_batches": 4,
            "warmup_steps": 5,
            "threads": 1,
        },
        "search": {
            "objectives": {"quality": "minimize", "params": "minimize"},
            "constraints": {"weight_bytes": "<= 60000"},
            "budget": {"trials": trials},
            "fidelity": {"kind": "proxy", "steps": steps},
        },
    }


def step_cost(spec: Any) -> dict[str, float]:
    """Train-step time and weights: supernet (soft, all candidates) vs its largest candidate."""
    from archir import compile as compile_spec
    from archir.tasks.base import get_task
    from searchers.supernet import build_supernet

    net = build_supernet(spec)
    task = get_task(net.spec.train.task, net.spec.train.task_options)
    gen = torch.Generator().manual_seed(0)
    largest = {d.name: len(d.values) - 1 for d in net.decisions}
    single = compile_spec(net.fix(largest), seed=0)

    def timed(model: Any, prep: Any) -> float:
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
        ts = []
        for _ in range(6):
            x, y = task.train_batch(16, 64, gen)
            t0 = time.perf_counter()
            prep()
            loss = task.loss(model, x, y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            ts.append(time.perf_counter() - t0)
        return sorted(ts[1:])[len(ts[1:]) // 2]

    t_soft = timed(net, lambda: net.set_path("soft"))
    t_hard = timed(net, lambda: net.set_path("uniform"))
    t_one = timed(single, lambda: None)
    return {
        "supernet_soft_step_s": t_soft,
        "supernet_single_path_step_s": t_hard,
        "largest_candidate_step_s": t_one,
        "supernet_weights": sum(p.numel() for p in net.weight_parameters()),
        "largest_candidate_weights": sum(p.numel() for p in single.parameters()),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--task", default="text:pydoc")
    ap.add_argument("--trials", type=int, default=4)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--out", default="/tmp/darts_bench")
    ap.add_argument("--methods", default="random,darts,gdas,spos")
    args = ap.parse_args()
    torch.set_num_threads(1)
    from archir.spec import spec_from_dict
    from searchers.run import run_search

    out = Path(args.out) / args.task.replace(":", "_")
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    data = space(args.task, args.steps, args.trials)
    spec = spec_from_dict(data)
    path = out / "space.yaml"
    spec.save(path)
    rows: dict[str, Any] = {"step_cost": step_cost(spec)}
    print(json.dumps(rows["step_cost"], indent=1))
    for m in args.methods.split(","):
        c0, w0 = time.process_time(), time.perf_counter()
        if m == "random":
            res = run_search(path, out=out / m, sampler="random", export=False, say=lambda s: None)
            best = res.best or {}
            n = res.n_trials
            extra: dict[str, Any] = {}
        else:
            opts = {"relax": "gumbel"} if m == "gdas" else {}
            res = run_search(
                spec,
                searcher="spos" if m == "spos" else "darts",
                out=out / m,
                seed=0,
                export=False,
                say=lambda s: None,
                **opts,
            )
            best = res.best or {}
            r = res.extra
            n = len(r["trials"])
            extra = {
                "collapse": r["collapse"]["triggered"],
                "collapse_events": len(r["collapse"]["events"]),
                "supernet_steps": r["supernet"]["steps"],
                "chosen": r["chosen"][0]["arch"],
                "arch_weights": r["arch_weights"],
            }
        vals = best.get("values", {})
        cons = best.get("constraints", {})
        rows[m] = {
            "best_quality": vals.get("val_bpb", vals.get("accuracy")),
            "best_params": vals.get("params"),
            "weight_bytes": vals.get("weight_bytes"),
            "constraints_ok": all(v.get("ok") for v in cons.values()) if cons else None,
            "trials_trained": n,
            "cpu_min": (time.process_time() - c0) / 60,
            "wall_min": (time.perf_counter() - w0) / 60,
            **extra,
        }
        print(m, json.dumps(rows[m], default=str))
    (out / "results.json").write_text(json.dumps(rows, indent=2, default=str))


if __name__ == "__main__":
    main()
