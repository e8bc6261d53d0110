"""``archir export SPEC_OR_RUN_DIR --out model.onnx``: the deployable artifact, with a report.

Examples::

    archir export runs/lm --out best.onnx                            # the run's best/
    archir export runs/lm/best --out best.onnx                       # spec.yaml + model.safetensors
    archir export SPEC --weights w.safetensors --precision int8 --out m.onnx
    archir export specs/zoo/transformer.yaml --random-weights --out t.onnx   # untrained, fp32
    archir export SPEC --check-only                                  # parity report, no file
    archir export runs/lm/best --format safetensors --out deploy/    # spec.yaml + weights
    archir export runs/lm --decode --out step.onnx                   # one token per call, with state
    archir export runs/lm --decode --precision auto --out step.onnx  # ... at the searched bits
    archir export imported/ --format hf --out hf-model/              # a transformers folder

Weights come from ``--weights``, or the ``model.safetensors`` beside the spec in a folder;
without any, nothing is exported unless ``--random-weights`` says that untrained weights are
wanted (``--check-only`` writes nothing and needs no weights). ``--out`` is checked before
any export work.

Exit codes: 0 written (or check passed); 2 user error, including a parity failure (the
message names the first diverging output and position; ``--force`` writes anyway).
``archir show model.onnx`` reads the metadata back (:func:`show_onnx`).
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

from archir.cli import args as a

HELP = "export a spec or run to ONNX (parity-checked; fp32/fp16/int8/int8-static/int4/auto)"

RANDOM_NOTE = "weights: random (untrained, seed 0) — exported on purpose with --random-weights"


def add_arguments(p: argparse.ArgumentParser) -> None:
    from exporters.quantize import PRECISIONS

    p.add_argument(
        "spec",
        help="concrete spec file, a run folder (runs/NAME: its best/) or a folder holding "
        "spec.yaml + model.safetensors",
    )
    p.add_argument("--out", "-o", default=None, help="output .onnx file (dir for safetensors)")
    p.add_argument("--weights", type=a.regular_file, default=None, help="model.safetensors to load")
    p.add_argument(
        "--random-weights",
        action="store_true",
        help="export untrained (random, seed 0) weights when there are none",
    )
    p.add_argument("--precision", default=None, choices=PRECISIONS, help="default fp32")
    p.add_argument(
        "--format",
        default="onnx",
        choices=("onnx", "safetensors", "hf"),
        help="artifact kind (hf: a Hugging Face folder, config.json + model.safetensors, for "
        "Llama/Mistral/Qwen2/Mixtral/GPT-2/Mamba/RWKV-shaped specs)",
    )
    p.add_argument("--check-only", action="store_true", help="parity report, write nothing")
    p.add_argument("--force", action="store_true", help="write even if parity fails")
    p.add_argument("--no-check", action="store_true", help="skip the parity gate")
    p.add_argument("--task", default=None, help="task for inputs/calibration (or 'random')")
    p.add_argument(
        "--opset", type=a.int_range(1, a.MAX_OPSET), default=None, help="ONNX opset (default 20)"
    )
    p.add_argument(
        "--exporter", default=None, choices=("auto", "dynamo", "legacy"), help="default auto"
    )
    p.add_argument(
        "--decode",
        action="store_true",
        help="export the decode step of a causal LM: tokens [batch, 1] + state tensors in, "
        "logits + updated states out (--precision fp32/fp16/int8/int4/auto; see "
        "exporters.decode)",
    )
    p.add_argument("--json", action="store_true", help="machine-readable report")


def _is_run_folder(d: Path) -> bool:
    return any((d / f).exists() for f in ("run.json", "study.journal", "pareto.json", "trials"))


def resolve_source(path: str, weights: str | None) -> tuple[Any, str | None]:
    """``(spec, weights)`` for a spec file, a run folder or a folder of a spec and weights.

    A folder holding ``best/`` (a search's run folder, ``runs/NAME``) stands for its
    ``best/``; a folder holding ``spec.yaml`` gives that spec and the ``model.safetensors``
    beside it (if any). ``weights`` (``--weights``) wins over a folder's weights.

    Raises:
        ExportError: a run folder without ``best/``, a ``best/`` without its spec or
            weights, or a folder without ``spec.yaml``; SpecError: the spec is invalid.
    """
    from archir import load_spec
    from archir.errors import ExportError

    p = Path(path)
    if not p.is_dir():
        return load_spec(p), weights
    best = p / "best"
    if best.is_dir():
        missing = [f for f in ("spec.yaml", "model.safetensors") if not (best / f).is_file()]
        if "spec.yaml" in missing or (missing and weights is None):
            raise ExportError(
                f"run folder '{p}': its best/ has no {' and no '.join(missing)}",
                hint="give --weights FILE, or export a folder holding spec.yaml + "
                "model.safetensors",
            )
        p = best
    elif _is_run_folder(p):
        raise ExportError(
            f"run folder '{p}' has no best/ (the search has not finished, or kept no best)",
            hint=f"finish the search (archir search), or export {p}/best once it exists",
        )
    spec_p = p / "spec.yaml"
    if not spec_p.is_file():
        raise ExportError(
            f"folder '{p}' has no spec.yaml",
            hint="give a spec file, a run folder (runs/NAME) or a run's best/ folder",
        )
    w = p / "model.safetensors"
    return load_spec(spec_p), weights or (str(w) if w.is_file() else None)


def check_weights(
    source: str, weights: str | None, allow_none: bool, random_weights: bool, why: str
) -> None:
    """Refuse a source without trained weights unless ``allow_none`` (``--random-weights``
    or nothing is written), and ``--random-weights`` beside real weights.

    Raises:
        ExportError: either case; ``why`` says what random weights would do.
    """
    from archir.errors import ExportError

    if weights is not None and random_weights:
        raise ExportError(
            f"--random-weights given, but there are weights ({weights})",
            hint="drop --random-weights to use them",
        )
    if weights is None and not allow_none:
        raise ExportError(
            f"'{source}' has no trained weights (no --weights, no model.safetensors "
            f"beside it): {why}",
            hint="pass --weights FILE or a run folder, or add --random-weights to use "
            "untrained weights on purpose",
        )


def _check_flags(args: argparse.Namespace) -> None:
    """Refuse flags the chosen form would ignore, and ``--out`` problems, before any work.

    Raises:
        ExportError: a flag that does not apply; PathError: a bad ``--out``.
    """
    from archir.errors import ExportError
    from archir.paths import check_out_dir, check_out_file

    if args.format in ("safetensors", "hf"):
        onnx_only = {
            "decode": "--decode",
            "precision": "--precision",
            "opset": "--opset",
            "exporter": "--exporter",
            "task": "--task",
            "check_only": "--check-only",
            "force": "--force",
            "no_check": "--no-check",
        }
        if args.format == "hf":
            del onnx_only["no_check"]  # the transformers parity check can be skipped
        for dest, flag in onnx_only.items():
            if getattr(args, dest) not in (None, False):
                raise ExportError(
                    f"{flag} does not apply to --format {args.format}", hint="drop the flag"
                )
        if not args.out:
            raise ExportError(f"--out DIR is required for --format {args.format}", hint="--out DIR")
        check_out_dir(args.out)
        return
    if args.decode:
        if args.opset is not None:
            raise ExportError("--opset does not apply to --decode", hint="drop the flag")
        from exporters.decode import DECODE_PRECISIONS

        if args.precision is not None and args.precision not in DECODE_PRECISIONS:
            raise ExportError(
                f"--precision {args.precision} does not apply to --decode"
                + (
                    " (static int8 would need calibrated ranges for every state input)"
                    if args.precision == "int8-static"
                    else ""
                ),
                hint="--decode takes --precision " + ", ".join(DECODE_PRECISIONS),
            )
    if args.check_only:
        if args.out:
            raise ExportError(
                "--check-only writes nothing: drop --out", hint="or drop --check-only"
            )
        if args.force:
            raise ExportError("--force does not apply to --check-only", hint="drop the flag")
        return
    if not args.out:
        raise ExportError("--out is required (or use --check-only)", hint="--out model.onnx")
    check_out_file(args.out)


def run(args: argparse.Namespace) -> int:
    """Export; exit 0, or 2 for a user error (a parity failure included).

    Raises:
        ArchirError: a bad spec, folder, flag, ``--out`` or weights; no weights and no
            ``--random-weights``; an export or parity failure.
    """

    _check_flags(args)
    spec, weights = resolve_source(args.spec, args.weights)
    check_weights(
        args.spec,
        weights,
        args.random_weights or args.check_only,
        args.random_weights,
        "the export would hold random weights",
    )
    untrained = weights is None
    from exporters import export_onnx, export_safetensors

    if args.format == "hf":
        from archir.interop import export_hf

        hreport = export_hf(spec, args.out, weights=weights, check=not args.no_check)
        print(json.dumps(hreport.to_dict(), indent=2) if args.json else hreport)
        return 0

    if args.format == "safetensors":
        info = export_safetensors(spec, args.out, weights=weights)
        if untrained:
            info["note"] = RANDOM_NOTE
        if args.json:
            print(json.dumps(info, indent=2))
        else:
            print(
                f"wrote {info['spec']} and {info['weights']} "
                f"({info['params']:,} parameters, {info['weights_bytes']:,} bytes)"
                + (f"; {RANDOM_NOTE}" if untrained else "")
            )
        return 0
    if args.decode:
        from exporters.decode import export_decode

        dreport = export_decode(
            spec,
            args.out,
            weights=weights,
            task=args.task,
            check=not args.no_check,
            force=args.force,
            check_only=args.check_only,
            exporter=args.exporter or "auto",
            precision=args.precision or "fp32",
        )
        if args.json:
            print(json.dumps(dreport.to_dict(), indent=2, default=str))
        else:
            print(dreport)
            if untrained:
                print(f"  note: {RANDOM_NOTE if args.random_weights else 'weights: random'}")
        return 0
    report = export_onnx(
        spec,
        args.out,
        weights=weights,
        precision=args.precision or "fp32",
        check=not args.no_check,
        force=args.force,
        task=args.task,
        opset=args.opset,
        exporter=args.exporter or "auto",
        check_only=args.check_only,
    )
    if untrained:
        report.notes.append(RANDOM_NOTE if args.random_weights else "weights: random (untrained)")
    if args.json:
        print(json.dumps(report.to_dict(), indent=2, default=str))
    else:
        print(report)
    return 0


def show_onnx(path: str, as_json: bool) -> int:
    """Print what an exported file holds: archir metadata (spec, version, precision, inputs),
    opset, inputs/outputs with symbolic shapes, size, op counts, precision per block.

    Raises:
        ExportError: the file is missing or not an ONNX model.
    """
    import onnx

    from archir.errors import ExportError
    from exporters.onnx_export import tensor_infos

    p = Path(path)
    if not p.is_file():
        raise ExportError(f"'{p}' does not exist")
    try:
        proto = onnx.load(str(p), load_external_data=False)
    except Exception as exc:  # noqa: BLE001 - protobuf decode errors
        raise ExportError(f"'{p}' is not an ONNX model: {exc}") from None
    meta = {m.key: m.value for m in proto.metadata_props}
    ops: dict[str, int] = {}
    for n in proto.graph.node:
        ops[n.op_type] = ops.get(n.op_type, 0) + 1
    info: dict[str, Any] = {
        "path": str(p),
        "file_bytes": os.path.getsize(p),
        "opset": {o.domain or "ai.onnx": o.version for o in proto.opset_import},
        "producer": f"{proto.producer_name} {proto.producer_version}".strip(),
        "inputs": [vars(t) for t in tensor_infos(proto.graph.input)],
        "outputs": [vars(t) for t in tensor_infos(proto.graph.output)],
        "archir_version": meta.get("archir.version"),
        "spec_name": meta.get("archir.spec_name"),
        "precision": meta.get("archir.precision"),
        "exporter": meta.get("archir.exporter"),
        "input_descriptions": json.loads(meta.get("archir.inputs", "{}")),
        "block_precision": json.loads(meta.get("archir.block_precision", "{}")),
        "spec": meta.get("archir.spec"),
        "ops": dict(sorted(ops.items(), key=lambda kv: -kv[1])),
        "metadata": {k: v for k, v in meta.items() if not k.startswith("archir.")},
    }
    if as_json:
        print(json.dumps(info, indent=2))
        return 0
    lines = [
        f"{p}  ({info['file_bytes']:,} bytes)",
        f"  archir {info['archir_version'] or '?'}; spec {info['spec_name'] or '?'}; "
        f"precision {info['precision'] or '?'}; {info['exporter'] or info['producer']}",
        "  opset: " + ", ".join(f"{d} {v}" for d, v in info["opset"].items()),
    ]
    for kind in ("inputs", "outputs"):
        for t in info[kind]:
            desc = info["input_descriptions"].get(t["name"], "")
            shape = ", ".join(str(d) for d in t["shape"])
            lines.append(f"  {kind[:-1]} {t['name']}: {t['dtype']}[{shape}]  {desc}")
    if info["block_precision"]:
        from exporters.quantize import precision_counts

        lines.append("  precision per block: " + precision_counts(info["block_precision"]))
    lines.append("  ops: " + ", ".join(f"{k} {v}" for k, v in list(info["ops"].items())[:14]))
    if info["spec"]:
        lines.append("  spec:")
        lines.extend("    " + ln for ln in info["spec"].rstrip().splitlines())
    print("\n".join(lines))
    return 0
