"""``archir export SPEC_OR_RUN_DIR --out model.onnx``: the deployable artifact, with a report.

Examples::

    archir export specs/zoo/transformer.yaml --out t.onnx            # random-init, fp32
    archir export runs/lm/best --out best.onnx                       # spec.yaml + model.safetensors
    archir export SPEC --weights w.safetensors --precision int8 --out m.onnx
    archir export SPEC --check-only                                  # parity report, no file
    archir export runs/lm/best --format safetensors --out deploy/    # spec.yaml + weights

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

HELP = "export a spec or run to ONNX (parity-checked; fp32/fp16/int8/int8-static/int4/auto)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    from exporters.quantize import PRECISIONS

    p.add_argument("spec", help="concrete spec file, or a run dir holding spec.yaml (+ weights)")
    p.add_argument("--out", "-o", default=None, help="output .onnx file (dir for safetensors)")
    p.add_argument("--weights", default=None, help="model.safetensors to load")
    p.add_argument("--precision", default="fp32", choices=PRECISIONS)
    p.add_argument(
        "--format", default="onnx", choices=("onnx", "safetensors"), help="artifact kind"
    )
    p.add_argument("--check-only", action="store_true", help="parity report, write nothing")
    p.add_argument("--force", action="store_true", help="write even if parity fails")
    p.add_argument("--no-check", action="store_true", help="skip the parity gate")
    p.add_argument("--task", default=None, help="task for inputs/calibration (or 'random')")
    p.add_argument("--opset", type=int, default=None)
    p.add_argument("--exporter", default="auto", choices=("auto", "dynamo", "legacy"))
    p.add_argument("--json", action="store_true", help="machine-readable report")


def resolve_source(path: str, weights: str | None) -> tuple[Any, str | None]:
    """``(spec, weights)`` for a spec file or a run directory.

    Raises:
        ExportError: the directory has no spec.yaml; SpecError: the spec is invalid.
    """
    from archir import load_spec
    from archir.errors import ExportError

    p = Path(path)
    if p.is_dir():
        spec_p = p / "spec.yaml"
        if not spec_p.is_file():
            raise ExportError(
                f"run directory '{p}' has no spec.yaml",
                hint="give a spec file or a run's best/ directory",
            )
        w = p / "model.safetensors"
        return load_spec(spec_p), weights or (str(w) if w.is_file() else None)
    return load_spec(p), weights


def run(args: argparse.Namespace) -> int:
    from archir.errors import ExportError
    from exporters import export_onnx, export_safetensors

    spec, weights = resolve_source(args.spec, args.weights)
    if args.format == "safetensors":
        if not args.out:
            raise ExportError("--out DIR is required for --format safetensors")
        info = export_safetensors(spec, args.out, weights=weights)
        if args.json:
            print(json.dumps(info, indent=2))
        else:
            print(
                f"wrote {info['spec']} and {info['weights']} "
                f"({info['params']:,} parameters, {info['weights_bytes']:,} bytes)"
            )
        return 0
    if not args.out and not args.check_only:
        raise ExportError("--out is required (or use --check-only)", hint="--out model.onnx")
    report = export_onnx(
        spec,
        args.out,
        weights=weights,
        precision=args.precision,
        check=not args.no_check,
        force=args.force,
        task=args.task,
        opset=args.opset,
        exporter=args.exporter,
        check_only=args.check_only,
    )
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
        counts: dict[str, int] = {}
        for v in info["block_precision"].values():
            counts[v] = counts.get(v, 0) + 1
        lines.append(
            "  precision per block: " + ", ".join(f"{k} x{n}" for k, n in sorted(counts.items()))
        )
    lines.append("  ops: " + ", ".join(f"{k} {v}" for k, v in list(info["ops"].items())[:14]))
    if info["spec"]:
        lines.append("  spec:")
        lines.extend("    " + ln for ln in info["spec"].rstrip().splitlines())
    print("\n".join(lines))
    return 0
