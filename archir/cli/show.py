"""``archir show SPEC``: per-block table of role, kind, shape, params, FLOPs/token, state."""

from __future__ import annotations

import argparse
import json
from typing import Any

from archir.cli.args import seq_len

HELP = "show a spec's graph: every block's shape, params, FLOPs/token, state bytes, bits"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("spec", help="spec file (or an exported .onnx file)")
    p.add_argument(
        "--seq-len", type=seq_len, default=None, help="sequence length for costs (1..2^20)"
    )
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument(
        "--latency",
        action="store_true",
        help="add the predicted onnxruntime latency (batch 1, 1 thread) from this machine's "
        "calibration (`archir latency calibrate`)",
    )


def _predicted_latency(spec: object, seq_len: int) -> dict[str, Any]:
    """Predicted latency from the calibration, or the reason there is none."""
    from exporters.latency import CalibrationError, predict_spec

    try:
        p = predict_spec(spec, "ort", batch=1, seq=seq_len, threads=1)
    except CalibrationError as exc:
        return {"error": str(exc)}
    return {"ms": p.ms, "band_ms": list(p.band_ms), "extrapolated": p.extrapolated}


def _human(n: float) -> str:
    for unit, div in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.2f}{unit}"
    return f"{n:.0f}" if float(n).is_integer() else f"{n:.2f}"


def run(args: argparse.Namespace) -> int:
    if str(args.spec).endswith(".onnx"):
        try:
            from exporters.cli_export import show_onnx
        except ModuleNotFoundError:
            from archir.errors import ArchirError

            raise ArchirError("reading .onnx files needs the exporters package") from None
        return show_onnx(args.spec, as_json=args.json)
    from archir.cost import analyze
    from archir.spec import load_spec

    spec = load_spec(args.spec)
    report = analyze(spec, args.seq_len)
    latency = _predicted_latency(spec, report.seq_len) if args.latency else None
    if args.json:
        out = report.to_dict()
        if latency is not None:
            out["latency_predicted"] = latency
        print(json.dumps(out, indent=2))
        return 0
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    table = Table(title=f"{report.name} (seq_len {report.seq_len})")
    for col in ("node", "role", "kind", "output", "params", "FLOPs/token", "state B", "bits"):
        table.add_column(
            col, justify="right" if col in ("params", "FLOPs/token", "state B", "bits") else "left"
        )
    for r in report.blocks:
        params = _human(r.params) if r.shared_with is None else f"(= {r.shared_with})"
        table.add_row(
            r.name,
            r.role,
            r.kind,
            escape(r.shape),
            params,
            _human(r.flops_per_token),
            _human(r.state_bytes),
            f"{r.bits:g}",
        )
    table.add_section()
    table.add_row(
        "total",
        "",
        "",
        "",
        _human(report.params),
        _human(report.flops_per_token),
        _human(report.state_bytes),
        f"{report.weight_bits_avg:.2f}",
    )
    Console(width=max(Console().width, 120)).print(table)
    print(f"weight bytes: {_human(report.weight_bytes)}B")
    if latency is not None:
        if "ms" in latency:
            lo, hi = latency["band_ms"]
            extra = " (extrapolated)" if latency["extrapolated"] else ""
            print(
                f"predicted latency (onnxruntime, batch 1, 1 thread): {latency['ms']:.3f} ms, "
                f"90% band [{lo:.3f}, {hi:.3f}]{extra}"
            )
        else:
            print(f"predicted latency: unavailable: {latency['error']}")
    return 0
