"""Decode cost per token mixer kind: ms per generated token at several context lengths,
prefill time, and state size — onnxruntime (the decode model ``archir export --decode``
ships) against PyTorch eager (``CompiledModel.step``), side by side in one run.

Usage::

    python benchmarks/decode_cost.py [--contexts 128 1024 4096] [--kinds attention mamba ...]
        [--threads 1] [--layers 2] [--d-model 128] [--out benchmarks/decode_cost_results.json]

Each model: ``--layers`` × (kind + swiglu) at ``d_model`` 128, vocab 256, batch 1,
``max_seq_len`` one past the longest context (token_mlp at expansion 0.25 so that its
weights stay small). Per (kind, context) the two runtimes are measured back to back
(:func:`exporters.decode.measure_decode`: prefill = the context fed token by token from zero
states, once; ms/token = the best window median of one more token from that state). The
claim to check: attention's cost per token grows with the context, recurrent and
state-space kinds stay flat.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import archir
from archir import registry
from archir.spec import spec_from_dict
from exporters.decode import measure_decode

#: per-kind settings that keep the benchmark models small at long contexts
KIND_PARAMS: dict[str, dict[str, Any]] = {"token_mlp": {"expansion": 0.25}}


def kind_spec(kind: str, d: int, layers: int, max_len: int) -> Any:
    return spec_from_dict(
        {
            "archir": 1,
            "name": f"decode-{kind}",
            "model": {
                "task": "causal_lm",
                "vocab_size": 256,
                "d_model": d,
                "max_seq_len": max_len,
                "embed": {"kind": "token_embedding"},
                "layers": [
                    {
                        "repeat": layers,
                        "blocks": [{"kind": kind, **KIND_PARAMS.get(kind, {})}, {"kind": "swiglu"}],
                    }
                ],
                "head": {"kind": "lm_head", "tie_embeddings": True},
            },
        }
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--contexts", type=int, nargs="+", default=[128, 1024, 4096])
    ap.add_argument("--kinds", nargs="+", default=None, help="default: every token mixer")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--d-model", type=int, default=128)
    ap.add_argument("--out", default="benchmarks/decode_cost_results.json")
    args = ap.parse_args(argv)
    kinds = args.kinds or [k.name for k in registry.kinds("token_mixer")]
    max_len = max(args.contexts) + 1
    rows: list[dict[str, Any]] = []
    t0 = time.perf_counter()
    print(
        f"{'kind':18s} {'context':>7s} {'ort ms/tok':>10s} {'torch ms/tok':>12s} "
        f"{'torch/ort':>9s} {'ort prefill s':>13s} {'torch prefill s':>15s} {'state KiB':>9s}"
    )
    for kind in kinds:
        spec = kind_spec(kind, args.d_model, args.layers, max_len)
        model = archir.compile(spec, seed=0).eval()
        for ctx in args.contexts:
            got = {}
            for rt in ("ort", "torch"):
                got[rt] = measure_decode(
                    spec,
                    model,
                    runtime=rt,
                    context=ctx,
                    threads=args.threads,
                    budget_s=0.3,
                    prefill_runs=1,
                )
            o, t = got["ort"], got["torch"]
            row = {
                "kind": kind,
                "context": ctx,
                "ort_ms_per_token": o["decode_ms_per_token"],
                "torch_ms_per_token": t["decode_ms_per_token"],
                "torch_over_ort": t["decode_ms_per_token"] / o["decode_ms_per_token"],
                "ort_prefill_ms": o["prefill_ms"],
                "torch_prefill_ms": t["prefill_ms"],
                "state_bytes": o["state_bytes"],
                "ort_noisy": o["noisy"],
                "torch_noisy": t["noisy"],
            }
            rows.append(row)
            print(
                f"{kind:18s} {ctx:7d} {row['ort_ms_per_token']:10.3f} "
                f"{row['torch_ms_per_token']:12.3f} {row['torch_over_ort']:9.2f} "
                f"{row['ort_prefill_ms'] / 1e3:13.2f} {row['torch_prefill_ms'] / 1e3:15.2f} "
                f"{row['state_bytes'] / 1024:9.1f}",
                flush=True,
            )
    growth = {}
    lo, hi = min(args.contexts), max(args.contexts)
    for kind in kinds:
        a = next(r for r in rows if r["kind"] == kind and r["context"] == lo)
        b = next(r for r in rows if r["kind"] == kind and r["context"] == hi)
        growth[kind] = b["ort_ms_per_token"] / a["ort_ms_per_token"]
    print(f"\nort ms/token at context {hi} / at {lo}:")
    for kind, g in growth.items():
        print(f"  {kind:18s} {g:6.2f}x")
    Path(args.out).write_text(
        json.dumps(
            {
                "threads": args.threads,
                "layers": args.layers,
                "d_model": args.d_model,
                "contexts": args.contexts,
                "rows": rows,
                "growth": growth,
                "wall_s": time.perf_counter() - t0,
            },
            indent=1,
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
