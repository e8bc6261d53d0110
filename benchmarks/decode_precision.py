"""Decode at the searched precision (issue 14): onnxruntime ms per generated token of the
decode graph at fp32, int8 and int4 (and ``auto``, what the spec's ``bits`` select), side
by side in one interleaved run, with file sizes and each graph's deviation from the fp32
model on the prompt.

Usage::

    python benchmarks/decode_precision.py [--specs specs/zoo/transformer.yaml ...]
        [--context 128] [--threads 1] [--rounds 12] [--d-model 512]
        [--out benchmarks/decode_precision_results.json]

Per spec: one fp32 decode graph (:func:`exporters.decode.decode_proto`, the one export
path), reduced by :func:`exporters.decode.ship_decode` — the quantizers of ``archir export
--decode --precision`` — to each precision; one onnxruntime session each (``--threads``
intra-op threads); the ``--context``-token prompt fed token by token from zero states; then
one more token from that state is timed, the precisions in round-robin windows
(:func:`exporters.latency.harness.measure_interleaved`: ``best_ms`` is the fastest window's
median, ``median_ms`` over every run). Weights are the spec's untrained init (seed 0):
the deviation columns say what quantization does to those weights' logits, not a trained
model's quality.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

import archir
from archir.spec import spec_from_dict
from exporters import parity as par
from exporters.decode import OrtStepper, decode_proto, ship_decode
from exporters.latency.harness import measure_interleaved
from exporters.onnx_export import block_bits

PRECISIONS = ("fp32", "int8", "int4", "auto")


def bench(
    path: str, context: int, threads: int, rounds: int, d_model: int | None = None
) -> dict[str, Any]:
    spec = archir.load_spec(path)
    if d_model is not None:  # the same spec, wider (a linear-heavy variant)
        data = spec.data
        data["model"]["d_model"] = d_model
        data["name"] = f"{data['name']}-d{d_model}"
        spec = spec_from_dict(data)
    model = archir.compile(spec, seed=0).eval()
    proto, layout, limit, used, _ = decode_proto(spec, model)
    gen = torch.Generator().manual_seed(0)
    vocab = spec.model.model.vocab_size
    prompt = torch.randint(0, vocab, (context,), generator=gen).tolist()
    tok = np.array([[int(torch.randint(0, vocab, (1,), generator=gen))]], dtype=np.int64)
    calls, rows = {}, {}
    ref_logits = None
    for prec in PRECISIONS:
        graph, plan = (
            (proto, {b: "fp32" for b in block_bits(model)})
            if prec == "fp32"
            else ship_decode(proto, spec, model, layout, limit, used, prec)
        )
        data = graph.SerializeToString()
        sess = par.make_session(data, threads)
        stepper = OrtStepper(sess, layout, 1)
        logits = np.concatenate(
            [stepper.feed(np.array([[t]], dtype=np.int64)) for t in prompt], axis=1
        )[0]
        if ref_logits is None:
            ref_logits = logits
        feeds = {"tokens": tok, **stepper.states}
        calls[prec] = (lambda s, f: lambda: s.run(None, f))(sess, feeds)
        counts: dict[str, int] = {}
        for v in plan.values():
            counts[v] = counts.get(v, 0) + 1
        rows[prec] = {
            "file_bytes": len(data),
            "block_precision": counts,
            "max_abs_logit_dev_vs_fp32": float(np.abs(logits - ref_logits).max()),
            "top1_agreement_vs_fp32": float((logits.argmax(-1) == ref_logits.argmax(-1)).mean()),
        }
    got = measure_interleaved(calls, rounds=rounds, window_s=0.05, min_runs=5, warmup=5)
    for prec, m in got.items():
        rows[prec].update(best_ms=m.best_ms, median_ms=m.median_ms, cv=m.cv, noisy=m.noisy)
    base = rows["fp32"]
    for r in rows.values():
        r["speedup_best"] = base["best_ms"] / r["best_ms"]
        r["speedup_median"] = base["median_ms"] / r["median_ms"]
        r["size_ratio"] = base["file_bytes"] / r["file_bytes"]
    return {
        "spec": path,
        "d_model": spec.model.model.d_model,
        "params": sum(p.numel() for p in model.parameters()),
        "exporter": used,
        "context": context,
        "rows": rows,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--specs", nargs="+", default=["specs/zoo/transformer.yaml", "specs/zoo/hybrid.yaml"]
    )
    ap.add_argument("--context", type=int, default=128)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=12)
    ap.add_argument("--d-model", type=int, default=None, help="override d_model (wider)")
    ap.add_argument("--out", default="benchmarks/decode_precision_results.json")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    out = []
    for path in args.specs:
        res = bench(path, args.context, args.threads, args.rounds, args.d_model)
        out.append(res)
        print(
            f"\n{path} (d_model {res['d_model']}, {res['params']:,} parameters; decode at "
            f"context {args.context}, {args.threads} thread(s))"
        )
        print(
            f"  {'precision':9s} {'best ms':>8s} {'median':>8s} {'x fp32':>7s} {'size KiB':>9s} "
            f"{'smaller':>7s} {'max|dlogit|':>11s} {'top-1':>6s}  blocks"
        )
        for prec, r in res["rows"].items():
            print(
                f"  {prec:9s} {r['best_ms']:8.3f} {r['median_ms']:8.3f} "
                f"{r['speedup_best']:7.2f} {r['file_bytes'] / 1024:9.1f} {r['size_ratio']:7.2f} "
                f"{r['max_abs_logit_dev_vs_fp32']:11.4f} {r['top1_agreement_vs_fp32']:6.3f}  "
                f"{r['block_precision']}",
                flush=True,
            )
    Path(args.out).write_text(
        json.dumps(
            {
                "context": args.context,
                "threads": args.threads,
                "rounds": args.rounds,
                "results": out,
                "wall_s": time.perf_counter() - t0,
            },
            indent=1,
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
