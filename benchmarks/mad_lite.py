"""MAD lite table for the zoo's token mixers.

For every token mixer in the block registry (``identity`` excepted) and a striped Mamba +
attention hybrid it builds a MAD-style language model — embedding, 2 x
(token mixer, SwiGLU) pre-norm blocks, RMSNorm, LM head — runs ``archir.tasks.mad.run_mad``
with the ``lite`` preset and prints per-task scores, the mean and CPU seconds.
Kinds missing from the block registry are skipped with a note.

    python benchmarks/mad_lite.py                       # everything (lite preset)
    python benchmarks/mad_lite.py --tasks in-context-recall,memorization --steps 200
    python benchmarks/mad_lite.py --json out.json --mixers attention,mamba
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from typing import Any

import torch

#: every token mixer at its defaults, except where a parameter is set here
OVERRIDES: dict[str, dict[str, Any]] = {"attention": {"n_heads": 4, "pos": "rope"}}


def mixers() -> dict[str, list[dict[str, Any]]]:
    """Name -> the token mixers of its layers (cycled), from the registry."""
    from archir import registry

    out = {
        k.name: [{"kind": k.name, **OVERRIDES.get(k.name, {})}]
        for k in registry.kinds("token_mixer")
        if k.name != "identity"
    }
    # striped hybrid: first layer Mamba, second layer attention
    out["hybrid"] = [{"kind": "mamba"}, {"kind": "attention", **OVERRIDES["attention"]}]
    return out


def make_spec(name: str, mixers: list[dict[str, Any]], d_model: int, layers: int):
    from archir.spec import spec_from_dict

    groups = []
    for i in range(layers):
        mixer = mixers[i % len(mixers)]
        groups.append(
            {"repeat": 1, "blocks": [dict(mixer), {"kind": "swiglu", "expansion": 2.667}]}
        )
    return spec_from_dict(
        {
            "archir": 1,
            "name": f"mad-{name}",
            "model": {
                "task": "causal_lm",
                "vocab_size": 256,
                "d_model": d_model,
                "max_seq_len": 128,
                "embed": {"kind": "token_embedding"},
                "layers": groups,
                "head": {"kind": "lm_head", "tie_embeddings": True},
            },
        }
    )


def main(argv: list[str] | None = None) -> int:
    from archir import registry
    from archir.errors import ArchirError
    from archir.tasks import mad

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    table = mixers()
    ap.add_argument("--mixers", help="comma-separated subset of " + ",".join(table))
    ap.add_argument("--tasks", help="comma-separated subset of MAD tasks")
    ap.add_argument("--d-model", type=int, default=128)
    ap.add_argument("--layers", type=int, default=2, help="(mixer, SwiGLU) pairs")
    ap.add_argument("--steps", type=int, help="override the lite preset's steps per setting")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", help="write the results to this JSON file (after every mixer)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.steps:
        mad.PRESETS["lite"] = replace(mad.PRESETS["lite"], steps=args.steps)
    tasks = args.tasks.split(",") if args.tasks else list(mad.TASKS)
    names = args.mixers.split(",") if args.mixers else list(table)
    have = set(registry.names())
    rows: dict[str, Any] = {}
    for name in names:
        missing = sorted({m["kind"] for m in table[name]} - have)
        if missing:
            print(f"skip {name}: kind(s) {missing} not in the registry", flush=True)
            continue
        spec = make_spec(name, table[name], args.d_model, args.layers)
        t0 = time.process_time()
        try:
            report = mad.run_mad(
                spec,
                "lite",
                tasks,
                on_result=lambda r, name=name: print(
                    f"  {name:<17} {r.task:<25} {r.setting.label:<26} "
                    f"acc {r.accuracy:.3f} cpu {r.cpu_s:.0f}s",
                    flush=True,
                ),
            )
        except ArchirError as exc:
            print(f"skip {name}: {exc}", flush=True)
            continue
        rows[name] = {**report.to_dict(), "total_cpu_s": time.process_time() - t0}
        if args.json:  # after every mixer: a long run that is stopped keeps what it measured
            with open(args.json, "w") as f:
                payload = {"args": vars(args), "data_version": mad.DATA_VERSION, "results": rows}
                json.dump(payload, f, indent=2)
    if not rows:
        return 1
    short = {
        "in-context-recall": "recall",
        "fuzzy-in-context-recall": "fuzzy",
        "noisy-in-context-recall": "noisy",
        "selective-copying": "sel.copy",
        "compression": "compress",
        "memorization": "memorize",
    }
    header = ["mixer", *[short[t] for t in tasks], "mean", "CPU s"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, r in sorted(rows.items(), key=lambda kv: -kv[1]["mean"]):
        cells = [f"{r['scores'][t]:.3f}" for t in tasks]
        lines.append(
            f"| {name} | " + " | ".join(cells) + f" | {r['mean']:.3f} | {r['total_cpu_s']:.0f} |"
        )
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
