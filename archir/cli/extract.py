"""``archir extract RUN``: a trained MatFormer run -> a smaller concrete spec + weights.

``--granularity 0.5`` extracts every ``matformer`` block at half its width;
``--granularity 0.25,0.5,1,0.5`` gives one granularity per block in model order
(Mix'n'Match). The output folder (``--out``) gets ``spec.yaml`` (plain ``swiglu``/``geglu``/
``mlp`` FFNs with the smaller ``d_ff``), ``model.safetensors`` and ``extract.json``; it is
checked before any work, and files there that an earlier extraction did not write are
never overwritten. ``--front`` prices granularity mixes without training (validation bpb of
the nested forward, latency of the extracted spec, parameters) and prints their Pareto
front (:mod:`searchers.matformer`). Devvrit, Kudugunta et al., 2023, "MatFormer".
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from archir.cli.args import int_range

HELP = "extract a smaller model from a trained MatFormer run (one granularity or a per-layer mix)"


def _granularity(text: str) -> float | list[float]:
    from archir.extract import parse_granularity

    try:
        return parse_granularity(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "run", help="a trained run folder (spec.yaml + model.safetensors or checkpoint.json)"
    )
    p.add_argument(
        "--granularity",
        type=_granularity,
        metavar="G[,G...]",
        help="one fraction of the full FFN width for every matformer block (0.5), or one per "
        "block in model order (0.25,0.5,1,0.5)",
    )
    p.add_argument("--out", help="output folder for spec.yaml, model.safetensors, extract.json")
    p.add_argument(
        "--front",
        action="store_true",
        help="price granularity mixes without training and print the Pareto front of "
        "(val metric, latency_ms, params)",
    )
    p.add_argument(
        "--max-mixes",
        type=int_range(1, 4096),
        default=32,
        help="--front: mixes priced at most (every uniform one always; default 32)",
    )
    p.add_argument(
        "--eval-batches",
        type=int_range(1, 10_000),
        help="--front: held-out batches per mix (default train.eval_batches)",
    )
    p.add_argument("--json", action="store_true", help="--front: every priced mix as JSON")


def run(args: argparse.Namespace) -> int:
    """Extract (exit 0) or print the front; user errors exit 2.

    Raises:
        ArchirError: neither or both of --granularity and --front, a bad --out, a run that
            cannot be read, no matformer blocks, a granularity not trained.
    """
    from archir.errors import ArchirError

    if args.front == (args.granularity is not None):
        raise ArchirError(
            "give either --granularity (extract one sub-model) or --front (price them all)",
            hint="see 'archir extract --help'",
        )
    if args.granularity is not None and args.out is None:
        raise ArchirError("--granularity needs --out FOLDER", hint="e.g. --out runs/small")
    from archir.extract import check_out, load_run

    out = check_out(args.out) if args.granularity is not None else None
    source = load_run(args.run)
    if args.front:
        return _front(source, args)
    assert out is not None
    from archir.extract import extract, write_extracted

    spec, model, gs = extract(source.spec, source.model, args.granularity)
    doc = write_extracted(
        out,
        spec,
        model,
        {"source": str(Path(args.run)), "source_spec": source.spec.name, "granularities": gs},
    )
    print(json.dumps({k: v for k, v in doc.items() if k != "format"}, indent=2))
    print(f"wrote {out}/spec.yaml, model.safetensors, extract.json")
    return 0


def _front(source: object, args: argparse.Namespace) -> int:
    from searchers.matformer import price_mixes

    rows, front, metric = price_mixes(
        source, max_mixes=args.max_mixes, eval_batches=args.eval_batches
    )
    if args.json:
        doc = {
            "metric": metric,
            "front": front,
            "mixes": [r.row(metric) for r in rows],
        }
        print(json.dumps(doc, indent=2, default=float))
        return 0
    print(f"{len(rows)} mixes priced, {len(front)} on the front of ({metric}, latency_ms, params)")
    print(f"{'granularities':<32} {metric:>9} {'latency_ms':>11} {'params':>10}")
    for i in sorted(front, key=lambda i: rows[i].params):
        r = rows[i]
        gs = ",".join(f"{g:g}" for g in r.granularities)
        print(f"{gs:<32} {r.metrics[metric]:>9.4f} {r.latency_ms:>11.3f} {r.params:>10,}")
    return 0
