"""The precision table (issue 14, part 2): file size, onnxruntime speed and task quality of
every precision ``archir export`` ships, side by side in one run.

Two models:

* **trained** — ``specs/zoo/transformer.yaml`` (d_model 128, 4 × attention + SwiGLU, the main
  job's scale) trained ``--steps`` steps on ``text:pydoc``: the quality delta (bits per byte
  on the validation split, onnxruntime file vs PyTorch) is read on it;
* **linear-heavy** — the same with ``d_model 512`` and SwiGLU expansion 4 (17 M parameters,
  most of the time in weight MatMuls): speed and size only (fresh weights).

Every variant is made by ``exporters.export_onnx(..., precision=P)`` (what ships), plus two
that do not ship, for comparison: int8 with per-channel weight scales and int4 with
``accuracy_level`` 0 (float compute in MatMulNBits; archir's int4 before this benchmark). Speed is the
best-window median of :func:`exporters.latency.measure_interleaved` at batch 1, 1 thread, at
several lengths, every variant of a model interleaved in the same rounds; ratios are
fp32 / variant (above 1: faster than fp32).

Usage::

    python benchmarks/precision.py [--steps 300] [--seqs 1,16,64,128] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_NUM_THREADS", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import onnx  # noqa: E402
import torch  # noqa: E402

import archir  # noqa: E402
from archir.tasks import get_task  # noqa: E402
from archir.train import train  # noqa: E402
from exporters import export_onnx  # noqa: E402
from exporters import parity as par  # noqa: E402
from exporters.latency import measure_interleaved  # noqa: E402
from exporters.latency.harness import ort_session  # noqa: E402

SHIPPED = ("fp32", "fp16", "int8", "int8-static", "int4")


def spec_text(d_model: int, expansion: float, steps: int) -> str:
    txt = (ROOT / "specs/zoo/transformer.yaml").read_text()
    txt = txt.replace("d_model: 128", f"d_model: {d_model}")
    txt = txt.replace("expansion: 2.667", f"expansion: {expansion}")
    return txt.replace("steps: 300", f"steps: {steps}")


def extra_variants(fp32: Path, tmp: Path) -> dict[str, Path]:
    """The two variants that do not ship: int8 with per-channel weight scales, int4 with
    ``accuracy_level`` 0 (float compute; archir's int4 before this benchmark)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.quantization.matmul_nbits_quantizer import (
        DefaultWeightOnlyQuantConfig,
        MatMulNBitsQuantizer,
    )

    out: dict[str, Path] = {}
    p = tmp / "int8-per-channel.onnx"
    quantize_dynamic(
        str(fp32),
        str(p),
        op_types_to_quantize=["MatMul", "Gemm", "Gather"],
        weight_type=QuantType.QInt8,
        per_channel=True,
        extra_options={"MatMulConstBOnly": True},
    )
    out["int8 per-channel"] = p
    cfg = DefaultWeightOnlyQuantConfig(
        block_size=32,
        is_symmetric=True,
        op_types_to_quantize=("MatMul",),
        quant_axes=(("MatMul", 0),),
        bits=4,
    )
    q = MatMulNBitsQuantizer(
        onnx.load(str(fp32)),
        bits=4,
        block_size=32,
        is_symmetric=True,
        op_types_to_quantize=("MatMul",),
        algo_config=cfg,
    )
    q.process()
    p = tmp / "int4-acc0.onnx"
    onnx.save(q.model.model, str(p))
    out["int4 acc0"] = p
    return out


def quality(task: Any, model: Any, path: Path | None, seq: int, batches: int) -> float:
    """Validation bits per byte of the PyTorch model (``path`` None) or an ONNX file."""
    if path is None:
        return float(task.evaluate(model, 8, seq, batches)[task.metric])
    sess = ort_session(path, 2)
    return float(task.evaluate(par.OrtModule(sess), 8, seq, batches)[task.metric])


def run_model(
    name: str, spec: Any, model: Any, task: Any, seqs: list[int], tmp: Path, q_batches: int
) -> dict[str, Any]:
    files: dict[str, Path] = {}
    notes: dict[str, str] = {}
    for prec in SHIPPED:
        f = tmp / f"{name}-{prec}.onnx"
        t0 = time.perf_counter()
        rep = export_onnx(
            spec, f, model=model, precision=prec, task=task or "random", quality=False
        )
        notes[prec] = f"export {time.perf_counter() - t0:.1f}s"
        files[prec] = f
        assert rep.written
    for k, p in extra_variants(files["fp32"], tmp).items():
        files[k] = p
    sizes = {k: p.stat().st_size for k, p in files.items()}
    rows: dict[str, Any] = {k: {"bytes": sizes[k]} for k in files}
    if task is not None:
        L = spec.model.train.seq_len
        ref = quality(task, model, None, L, q_batches)
        rows["torch"] = {"val_bpb": ref}
        for k, p in files.items():
            v = quality(task, model, p, L, q_batches)
            rows[k].update(val_bpb=v, delta_bpb=v - ref)
    gen = np.random.default_rng(0)
    for seq in seqs:
        x = gen.integers(0, 256, (1, seq))
        fns = {}
        for k, p in files.items():
            sess = ort_session(p, 1)
            feed = {"tokens": x}
            fns[k] = lambda sess=sess, feed=feed: sess.run(None, feed)
        res = measure_interleaved(fns, rounds=7, window_s=0.2)
        base = res["fp32"].best_ms
        for k, m in res.items():
            rows[k][f"ms@{seq}"] = m.best_ms
            rows[k][f"speedup@{seq}"] = base / m.best_ms
    return {"rows": rows, "notes": notes}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--seqs", default="1,16,64,128")
    ap.add_argument("--quality-batches", type=int, default=24)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    logging.getLogger().setLevel(logging.ERROR)
    torch.set_num_threads(2)
    seqs = [int(s) for s in args.seqs.split(",")]
    out: dict[str, Any] = {"steps": args.steps, "seqs": seqs}
    with tempfile.TemporaryDirectory(prefix="archir-prec-") as td:
        tmp = Path(td)
        spec = archir.spec_from_text(spec_text(128, 2.667, args.steps))
        task = get_task("text:pydoc")
        t0 = time.perf_counter()
        res = train(spec, task)
        model = res.model.eval()
        out["train_s"] = time.perf_counter() - t0
        out["train_metrics"] = {k: v for k, v in res.metrics.items() if isinstance(v, float)}
        torch.set_num_threads(1)
        out["trained d128"] = run_model("t128", spec, model, task, seqs, tmp, args.quality_batches)
        big = archir.spec_from_text(spec_text(512, 4, args.steps))
        bm = archir.compile(big, seed=0).eval()
        out["linear-heavy d512"] = run_model("d512", big, bm, None, seqs, tmp, 0)
    for name in ("trained d128", "linear-heavy d512"):
        rows = out[name]["rows"]
        print(f"\n{name}")
        head = f"  {'variant':16s} {'MB':>7s}" + "".join(f" {'x@' + str(s):>7s}" for s in seqs)
        if "torch" in rows:
            head += f" {'val_bpb':>8s} {'delta':>7s}"
            print(f"  torch val_bpb {rows['torch']['val_bpb']:.4f}")
        print(head)
        for k, r in rows.items():
            if k == "torch":
                continue
            line = f"  {k:16s} {r['bytes'] / 1e6:7.2f}"
            line += "".join(f" {r[f'speedup@{s}']:7.2f}" for s in seqs)
            if "val_bpb" in r:
                line += f" {r['val_bpb']:8.4f} {r['delta_bpb']:+7.4f}"
            print(line)
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1, default=float))


if __name__ == "__main__":
    main()
