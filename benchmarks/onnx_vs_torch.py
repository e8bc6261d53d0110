"""onnxruntime fp32 vs PyTorch eager latency, per block kind and per zoo spec, plus int8/int4
size and latency ratios and export wall time.

Usage::

    python benchmarks/onnx_vs_torch.py [--threads 2] [--seqs 128 512] [--repeats 20]
        [--kinds attention swiglu ...] [--zoo specs/zoo/*.yaml] [--markdown out.md]
        [--baseline DIR] [--no-quant] [--max-seq-len 1024]

Batch 1. Each per-kind model is one layer group of 4 × (kind [+ mlp for token mixers]) at
d_model 128 (the stack the matrix test uses, scaled up), vocab 256. Latency is the median
of ``--repeats`` forward passes after 3 warm-up passes, the runtimes interleaved (one pass
of each in turn per repeat, so that load on a shared machine hits them alike); torch runs
under ``torch.inference_mode()`` with ``torch.set_num_threads(threads)``, onnxruntime with
``intra_op_num_threads = threads``, all optimizations on.

``--baseline DIR``: also export the same weights with the archir source tree in ``DIR`` (an
older commit, e.g. ``git archive <commit> | tar -x -C DIR``; exported in a subprocess) and
time that file in the same interleaved loop: before/after ratios from one run. ``--kinds``
with no name (or ``--zoo`` with none) skips that group.
"""

from __future__ import annotations

import argparse
import glob
import os
import random
import statistics
import subprocess
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


def kind_spec(kind: str, d: int = 128, max_seq_len: int = 1024) -> Any:
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
                "max_seq_len": max_seq_len,
                "embed": {"kind": "token_embedding"},
                "layers": [{"repeat": 4, "blocks": blocks}],
                "head": {"kind": "lm_head"},
            },
        }
    )


def _median_ms(fn: Any, repeats: int) -> float:
    return _interleaved_ms({"x": fn}, repeats)["x"]


def _interleaved_ms(fns: dict[str, Any], repeats: int) -> dict[str, float]:
    """Median ms of each callable: 3 warm-up passes each, then ``repeats`` rounds that call
    every one in turn, in an order shuffled each round (seeded). In a fixed order with
    ``--threads 2``, the session called right after another onnxruntime session ran
    1.4-1.6× slower than the one called after eager torch (the other session's worker
    threads still spinning, presumably): the same file exported by the same tree twice
    (``--baseline`` at the working tree) timed 54-59 ms against 38 ms at length 512
    (zoo:hybrid, session 22); shuffled, 44.6 against 44.5."""
    for fn in fns.values():
        for _ in range(3):
            fn()
    ts: dict[str, list[float]] = {k: [] for k in fns}
    keys, rng = list(fns), random.Random(0)
    for _ in range(repeats):
        rng.shuffle(keys)
        for k in keys:
            fn = fns[k]
            t = time.perf_counter()
            fn()
            ts[k].append(time.perf_counter() - t)
    return {k: 1000 * statistics.median(v) for k, v in ts.items()}


_BASELINE_EXPORT = """
import sys, archir
from exporters import export_onnx
spec = archir.load_spec(sys.argv[1])
model = archir.compile(spec, seed=0)
from safetensors.torch import load_model
load_model(model, sys.argv[2])
export_onnx(spec, sys.argv[3], model=model.eval(), task="random")
"""


def export_baseline(tree: Path, spec: Any, model: Any, out: Path) -> None:
    """Export ``model`` (its weights) with the archir source tree ``tree``, in a subprocess."""
    from safetensors.torch import save_model

    spec_file, weights = out.with_suffix(".yaml"), out.with_suffix(".safetensors")
    spec_file.write_text(spec.to_yaml(), encoding="utf-8")
    save_model(model, str(weights))
    env = dict(os.environ, PYTHONPATH=str(tree.resolve()))
    subprocess.run(
        [sys.executable, "-c", _BASELINE_EXPORT, str(spec_file), str(weights), str(out)],
        cwd=str(tree),
        env=env,
        check=True,
        capture_output=True,
    )


def bench_one(
    name: str,
    spec: Any,
    seqs: list[int],
    threads: int,
    repeats: int,
    tmp: Path,
    quant: bool,
    baseline: Path | None = None,
) -> list[dict[str, Any]]:
    torch.set_num_threads(threads)
    model = archir.compile(spec, seed=0).eval()
    t0 = time.perf_counter()
    rep = export_onnx(spec, tmp / f"{name}.onnx", model=model, task="random")
    export_s = time.perf_counter() - t0
    files = {"fp32": tmp / f"{name}.onnx"}
    if baseline is not None:
        files["base"] = tmp / f"{name}-base.onnx"
        export_baseline(baseline, spec, model, files["base"])
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
        feed = {sessions["fp32"].get_inputs()[0].name: x.numpy()}
        fns: dict[str, Any] = {"torch": lambda x=x: model(x)}
        for p, s in sessions.items():
            fns[p] = lambda s=s, feed=feed: s.run(None, feed)
        with torch.inference_mode():
            ms = _interleaved_ms(fns, repeats)
        t_torch = ms["torch"]
        row: dict[str, Any] = {
            "name": name,
            "seq": int(x.shape[1]) if x.dim() == 2 else 0,
            "torch_ms": t_torch,
            "exporter": rep.exporter,
            "export_s": export_s,
            "fp32_bytes": sizes["fp32"],
        }
        for p in sessions:
            row[f"ort_{p}_ms"] = ms[p]
        row["speedup"] = t_torch / row["ort_fp32_ms"]
        if "base" in sessions:
            row["base_speedup"] = t_torch / row["ort_base_ms"]
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


BASE_HEADER = (
    "| model | seq | torch ms | ort ms, baseline | ort ms, now | ort/torch speedup, baseline "
    "| ort/torch speedup, now | export s | exporter |\n"
    "|---|---:|---:|---:|---:|---:|---:|---:|---|"
)


def _fmt_row(r: dict[str, Any]) -> str:
    def f(key: str, fmt: str) -> str:
        return format(r[key], fmt) if key in r else "-"

    if "base_speedup" in r:
        return (
            f"| {r['name']} | {r['seq']} | {r['torch_ms']:.2f} | {r['ort_base_ms']:.2f} | "
            f"{r['ort_fp32_ms']:.2f} | {r['base_speedup']:.2f}x | {r['speedup']:.2f}x | "
            f"{r['export_s']:.1f} | {r['exporter']} |"
        )
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
    ap.add_argument(
        "--max-seq-len",
        type=int,
        default=1024,
        help="max_seq_len of the per-kind models (default 1024; longer --seqs are cut to it)",
    )
    ap.add_argument("--markdown", default=None, help="also write the table here")
    ap.add_argument(
        "--baseline",
        type=Path,
        default=None,
        help="an older archir source tree: also time its export of the same weights",
    )
    args = ap.parse_args(argv)
    quant = not args.no_quant and args.baseline is None
    kinds = args.kinds
    if kinds is None:
        kinds = registry.names("token_mixer") + registry.names("channel_mixer")
    zoo = args.zoo if args.zoo is not None else sorted(glob.glob("specs/zoo/*.yaml"))
    rows: list[dict[str, Any]] = []
    header = BASE_HEADER if args.baseline is not None else HEADER
    print(header)
    with tempfile.TemporaryDirectory() as td:
        tmp = Path(td)
        for kind in kinds:
            try:
                rows += bench_one(
                    kind,
                    kind_spec(kind, max_seq_len=args.max_seq_len),
                    args.seqs,
                    args.threads,
                    args.repeats,
                    tmp,
                    quant,
                    args.baseline,
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
                    quant,
                    args.baseline,
                )
            except Exception as exc:  # noqa: BLE001
                print(f"| zoo:{Path(path).stem} | FAILED: {str(exc)[:200]} |", flush=True)
    if args.markdown:
        Path(args.markdown).write_text(
            header + "\n" + "\n".join(_fmt_row(r) for r in rows) + "\n", encoding="utf-8"
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
