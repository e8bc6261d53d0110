"""Where the time of a dynamic-length ONNX export goes (issue 14): export seconds, split by
phase, and onnxruntime ms of the exported graph, for a Mamba block, an attention block and
three zoo models, under the current export path and under candidate variants, side by side.

Every export goes through :func:`exporters.graph.export_graph` (torch.export / dynamo
exporter, opset 20, dynamic ``batch`` and ``seq``), as the shipped file and the latency
calibration do. Phases (seconds, from one cProfile of that call):

* ``capture``: ``torch.export.export`` — every capture strategy torch.onnx tries (non-strict
  first, then strict when non-strict fails: ``tries`` counts them);
* ``decomp``: torch.onnx's ``run_decompositions`` to its ATen table;
* ``translate``: FX graph -> ONNX;
* ``optimize``: onnxscript's optimizer (``optimize=True``).

Variants (monkeypatches of this process only; nothing in the library changes):

* ``base``: the code as it is;
* ``noopt``: ``torch.onnx.export(..., optimize=False)`` (archir's own folding still runs);
* ``rope``: attention's rotary table accepts the ``SymInt`` length that non-strict
  torch.export passes (today ``rope_cos_sin`` only takes ``int`` or a tensor, so non-strict
  capture of any RoPE attention fails and torch.onnx falls back to the slower strict
  capture);
* ``steps<P>``: Mamba's exported scan unrolled over ``P`` steps per sub-chunk instead of
  ``archir.blocks.ssm.EXPORT_STEPS`` (fewer ops to trace, decompose and optimize; a
  divisor of ``EXPORT_CHUNK``).

ORT ms: one session per exported graph (1 thread, sequential), median of ``--reps`` runs
at batch 1 and T 128 and 512, the variants' sessions interleaved run by run (same machine
state for both). Example length: 67 (``exporters.onnx_export.EXAMPLE_SEQ``, what
``export_onnx`` uses) for models, 128 for blocks (a calibration part's shortest).

Usage::

    python benchmarks/export_speed.py                      # every case, base vs noopt
    python benchmarks/export_speed.py --cases attn-block --variants base,rope
    python benchmarks/export_speed.py --d-model 32         # blocks at a smaller width

Prints one table row per (case, variant); ``--json PATH`` writes the rows.
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import json
import pstats
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

import archir
from archir.spec import load_spec, spec_from_dict

ROOT = Path(__file__).resolve().parents[1]
ZOO = ROOT / "specs" / "zoo"
CASES = ("mamba-block", "attn-block", "zoo-mamba", "zoo-hybrid", "zoo-transformer")
VARIANTS = ("base", "noopt", "rope", "steps<P>")
PHASES = {
    "capture": "torch/export/__init__.py:",
    "decomp": "_fx_passes.py:10(decompose_with_registry)",
    "translate": "_core.py:767(_translate_fx_graph)",
    "optimize": "_onnx_program.py:316(optimize)",
}


@contextlib.contextmanager
def variant(name: str) -> Iterator[None]:
    """Apply a variant's monkeypatch for the duration (see the module docstring)."""
    undo: list[Callable[[], None]] = []
    if name == "noopt":
        orig_export = torch.onnx.export

        def export(*a: Any, **k: Any) -> Any:
            if k.get("dynamo"):
                k["optimize"] = False
            return orig_export(*a, **k)

        torch.onnx.export = export  # type: ignore[assignment]
        undo.append(lambda: setattr(torch.onnx, "export", orig_export))
    elif name == "rope":
        import archir.blocks.attention as at

        orig_rope = at.rope_cos_sin

        def rope(positions: Any, *a: Any, **k: Any) -> Any:
            if isinstance(positions, torch.SymInt):
                dev = a[2] if len(a) > 2 else k.get("device")
                positions = torch.arange(positions, dtype=torch.float32, device=dev)
            return orig_rope(positions, *a, **k)

        at.rope_cos_sin = rope
        undo.append(lambda: setattr(at, "rope_cos_sin", orig_rope))
    elif name.startswith("steps"):
        import archir.blocks.ssm as ssm

        old = ssm.EXPORT_STEPS
        ssm.EXPORT_STEPS = int(name.removeprefix("steps"))
        undo.append(lambda: setattr(ssm, "EXPORT_STEPS", old))
    elif name != "base":
        raise SystemExit(f"unknown variant {name!r}: {', '.join(VARIANTS)}")
    try:
        yield
    finally:
        for u in undo:
            u()


def block_case(kind: str, d: int) -> tuple[torch.nn.Module, torch.Tensor, bool]:
    """One residual block of ``kind`` at width ``d`` (as the calibration exports a part)."""
    spec = spec_from_dict(
        {
            "archir": 1,
            "name": f"one-{kind}",
            "model": {
                "task": "causal_lm",
                "vocab_size": 64,
                "d_model": d,
                "max_seq_len": 1024,
                "embed": {"kind": "token_embedding"},
                "head": {"kind": "lm_head"},
                "layers": [{"repeat": 1, "blocks": [{"kind": kind}]}],
            },
        }
    )
    model = archir.compile(spec, seed=0).eval()
    return model.blocks[0], torch.randn(2, 128, d), False


def zoo_case(name: str) -> tuple[Any, Any]:
    spec = load_spec(ZOO / f"{name}.yaml")
    return spec, archir.compile(spec, seed=0).eval()


def export_once(case: str, d: int) -> tuple[Any, float, dict[str, float], int, Any]:
    """Export ``case``; returns ``(proto, seconds, phases, capture tries, model)``."""
    from exporters.graph import Axis, export_graph, model_graph
    from exporters.onnx_export import _example_input

    prof = cProfile.Profile()
    if case.endswith("-block"):
        module, x, _ = block_case("mamba" if case.startswith("mamba") else "attention", d)
        axes = {0: Axis("batch"), 1: Axis("seq", 1, 1024)}
        t0 = time.perf_counter()
        prof.enable()
        ex = export_graph(
            module,
            (x,),
            input_names=["input"],
            output_names=["output"],
            input_axes=[axes],
            output_axes=[{0: "batch", 1: "seq"}],
            tag="part",
        )
        prof.disable()
        kind = "float"
    else:
        spec, module = zoo_case(case.removeprefix("zoo-"))
        t0 = time.perf_counter()
        prof.enable()
        ex = model_graph(spec.model, module, _example_input(spec.model))
        prof.disable()
        kind = "tokens"
    secs = time.perf_counter() - t0
    if ex.exporter != "dynamo":
        print(f"  note: {case} fell back to {ex.exporter}: {ex.failures}")
    st = pstats.Stats(prof)
    phases = {k: 0.0 for k in PHASES}
    tries = 0
    for (fname, line, func), (_, _, _, ct, _) in st.stats.items():  # type: ignore[attr-defined]
        key = f"{fname}:{line}({func})"
        for ph, pat in PHASES.items():
            if ph == "capture":
                if fname.endswith("torch/export/__init__.py") and func == "export":
                    phases[ph] += ct
            elif key.endswith(pat):
                phases[ph] += ct
        if fname.endswith("_capture_strategies.py") and func == "__call__":
            tries = st.stats[(fname, line, func)][1]  # type: ignore[attr-defined]
    return ex.proto, secs, phases, tries, (module, kind)


def ort_ms(protos: list[Any], kind: str, d: int, vocab: int, reps: int) -> list[dict[int, float]]:
    """Median ms per graph at T 128 and 512 (batch 1), graphs interleaved run by run."""
    import onnx
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    sessions = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, p in enumerate(protos):
            path = Path(tmp) / f"g{i}.onnx"
            onnx.save(p, str(path))
            sessions.append(ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"]))
    out: list[dict[int, float]] = [{} for _ in protos]
    gen = torch.Generator().manual_seed(0)
    for T in (128, 512):
        if kind == "float":
            feed = torch.randn(1, T, d, generator=gen).numpy()
        else:
            feed = torch.randint(0, vocab, (1, T), generator=gen).numpy()
        times: list[list[float]] = [[] for _ in protos]
        for r in range(reps + 1):
            for i, s in enumerate(sessions):
                name = s.get_inputs()[0].name
                t0 = time.perf_counter()
                s.run(None, {name: feed})
                if r:  # the first run of each is a warm-up
                    times[i].append((time.perf_counter() - t0) * 1e3)
        for i in range(len(protos)):
            out[i][T] = statistics.median(times[i])
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", default=",".join(CASES))
    ap.add_argument("--variants", default="base,noopt")
    ap.add_argument("--d-model", type=int, default=128, help="width of the block cases")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--json", type=Path)
    a = ap.parse_args()
    torch.manual_seed(0)
    rows: list[dict[str, Any]] = []
    # warm-up: the first export of a process also loads onnxscript's torchlib table
    export_once("attn-block", 32)
    print(
        f"{'case':16} {'variant':8} {'export s':>8} {'capture':>8} {'tries':>5} {'decomp':>7} "
        f"{'transl':>7} {'optim':>7} {'nodes':>6} {'ort128':>8} {'ort512':>8}"
    )
    for case in a.cases.split(","):
        protos, recs = [], []
        for v in a.variants.split(","):
            with variant(v):
                proto, secs, ph, tries, (module, kind) = export_once(case, a.d_model)
            protos.append(proto)
            recs.append(
                {
                    "case": case,
                    "variant": v,
                    "export_s": secs,
                    "tries": tries,
                    **ph,
                    "nodes": len(proto.graph.node),
                }
            )
        vocab = (
            64
            if case.endswith("-block")
            else zoo_case(case.removeprefix("zoo-"))[0].model.model.vocab_size
        )
        ms = ort_ms(protos, kind, a.d_model, vocab, a.reps)
        for r, m in zip(recs, ms):
            r["ort_ms_128"], r["ort_ms_512"] = m[128], m[512]
            rows.append(r)
            print(
                f"{r['case']:16} {r['variant']:8} {r['export_s']:8.1f} {r['capture']:8.1f} "
                f"{r['tries']:5d} {r['decomp']:7.1f} {r['translate']:7.1f} {r['optimize']:7.1f} "
                f"{r['nodes']:6d} {r['ort_ms_128']:8.2f} {r['ort_ms_512']:8.2f}",
                flush=True,
            )
    if a.json:
        a.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
