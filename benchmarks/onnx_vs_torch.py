"""onnxruntime fp32 vs PyTorch eager latency, per block kind and per zoo spec, plus int8/int4
size and latency ratios and export wall time.

Usage::

    python benchmarks/onnx_vs_torch.py [--threads 2] [--seqs 128 512] [--repeats 20]
        [--kinds attention swiglu ...] [--zoo specs/zoo/*.yaml] [--markdown out.md]

Batch 1. Each per-kind model is one layer group of 4 × (kind [+ mlp for token mixers]) at
d_model 128 (the stack the matrix test uses, scaled up), vocab 256. Latency is the median
of ``--repeats`` forward passes after 3 warm-up passes; torch runs under
``torch.inference_mode()`` with ``torch.set_num_threads(threads)``, onnxruntime with
``intra_op_num_threads = threads``, all optimizations on.
"""

from __future__ import annotations

import argparse
import glob
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

import archir
from archir import registry
from archir.spec import spec_from_dict
from exporters import export_onnx
from exporters.parity import make_session


def kind_spec(kind: str, d: int = 128) -> Any:
    k = registry.get(kind)
    blocks: list[dict[str, Any]]
    if k.role == "token_mixer":
        blocks = [{"kind": kind}, {"kind": "mlp", "expansion": 4}]
    else:
        blocks = [{"kind": kind}]
    return spec_from_dict(
        {
            "archir": 1,
            "name": f"bench-{kind}",
            "model": {
                "task": "causal_lm",
                "vocab_size": 256,
                "d_model": d,
                "max_seq_len": 1024,
                "embed": {"kind": "token_embedding"},
                "layers": [{"repeat": 4, "blocks": blocks}],
                "head": {"kind": "lm_head"},
            },
        }
    )


def _median_ms(fn: Any, repeats: int) -> float:
    for _ in range(3):
        fn()
    ts = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return 1000 * statistics.median(ts)


def bench_one(
    name: str, spec: Any, seqs: list[int], threads: int, repeats: int, tmp: Path, quant: bool
) -> list[dict[str, Any]]:
    torch.set_num_threads(threads)
    model = archir.compile(spec, seed=0).eval()
    t0 = time.perf_counter()
    rep = export_onnx(spec, tmp / f"{name}.onnx", model=model, task="random")
    export_s = time.perf_counter() - t0
    files = {"fp32": tmp / f"{name}.onnx"}
    sizes = {"fp32": rep.file_bytes}
    if quant:
        for prec in ("int8", "int4"):
            r = export_onnx(
                spec,
                tmp / f"{name}-{prec}.onnx",
                model=model,
                precision=prec,
                task="random",
                quality=False,
            )
            files[prec] = tmp / f"{name}-{prec}.onnx"
            sizes[prec] = r.file_bytes
    sessions = {p: make_session(str(f), threads) for p, f in files.items()}
    rows = []
    m = spec.model.model
    for T in seqs:
        if m.task == "image_classification":
            x = torch.randn(1, m.channels, m.image_size, m.image_size)
        else:
            x = torch.randint(0, m.vocab_size, (1, min(T, m.max_seq_len)))
        with torch.inference_mode():
            t_torch = _median_ms(lambda x=x: model(x), repeats)
        feed = {sessions["fp32"].get_inputs()[0].name: x.numpy()}
        row: dict[str, Any] = {
            "name": name,
            "seq": int(x.shape[1]) if x.dim() == 2 else 0,
            "torch_ms": t_torch,
            "exporter": rep.exporter,
            "export_s": export_s,
            "fp32_bytes": sizes["fp32"],
        }
        for p, s in sessions.items():
            row[f"ort_{p}_ms"] = _median_ms(lambda s=s, feed=feed: s.run(None, feed), repeats)
        row["speedup"] = t_torch / row["ort_fp32_ms"]
        for p in ("int8", "int4"):
            if p in sizes:
                row[f"{p}_size_ratio"] = sizes["fp32"] / sizes[p]
                row[f"{p}_latency_ratio"] = row[f"ort_{p}_ms"] / row["ort_fp32_ms"]
        rows.append(row)
        print(_fmt_row(row), flush=True)
        if x.dim() != 2:
            break
    return rows


HEADER = (
    "| model | seq | torch ms | ort fp32 ms | ort/torch speedup | int8 size x | int8 lat ratio "
    "| int4 size x | int4 lat ratio | export s | exporter |\n"
    "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"
)


def _fmt_row(r: dict[str, Any]) -> str:
    def f(key: str, fmt: str) -> str:
        return format(r[key], fmt) if key in r else "-"

    return (
        f"| {r['name']} | {r['seq']} | {r['torch_ms']:.2f} | {r['ort_fp32_ms']:.2f} | "
        f"{r['speedup']:.2f}x | {f('int8_size_ratio', '.2f')} | {f('int8_latency_ratio', '.2f')} | "
        f"{f('int4_size_ratio', '.2f')} | {f('int4_latency_ratio', '.2f')} | "
        f"{r['export_s']:.1f} | {r['exporter']} |"
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seqs", type=int, nargs="+", default=[128, 512])
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--kinds", nargs="*", default=None, help="default: every mixer kind")
    ap.add_argument("--zoo", nargs="*", default=None, help="default: specs/zoo/*.yaml")
    ap.add_argument("--no-quant", action="store_true")
    ap.add_argument("--markdown", default=None, help="also write the table here")
    args = ap.parse_args(argv)
    kinds = args.kinds
    if kinds is None:
        kinds = registry.names("token_mixer") + registry.names("channel_mixer")
    zoo = args.zoo if args.zoo is not None else sorted(glob.glob("specs/zoo/*.yaml"))
    rows: list[dict[str, Any]] = []
    print(HEADER)
    with tempfile.TemporaryDirectory() as td:
        tmp = Path(td)
        for kind in kinds:
            try:
                rows += bench_one(
                    kind,
                    kind_spec(kind),
                    args.seqs,
                    args.threads,
                    args.repeats,
                    tmp,
                    not args.no_quant,
                )
            except Exception as exc:  # noqa: BLE001 - report and go on
                print(f"| {kind} | FAILED: {str(exc)[:200]} |", flush=True)
        for path in zoo:
            spec = archir.load_spec(path)
            try:
                rows += bench_one(
                    f"zoo:{Path(path).stem}",
                    spec,
                    args.seqs,
                    args.threads,
                    args.repeats,
                    tmp,
                    not args.no_quant,
                )
            except Exception as exc:  # noqa: BLE001
                print(f"| zoo:{Path(path).stem} | FAILED: {str(exc)[:200]} |", flush=True)
    if args.markdown:
        Path(args.markdown).write_text(
            HEADER + "\n" + "\n".join(_fmt_row(r) for r in rows) + "\n", encoding="utf-8"
        )
    slower = [r for r in rows if r["speedup"] < 1.0]
    print(
        f"\n{len(rows)} rows; onnxruntime slower than torch on {len(slower)}: "
        + ", ".join(f"{r['name']}@{r['seq']}" for r in slower),
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
