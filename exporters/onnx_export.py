"""Export a concrete spec's lowered model to ONNX, gated by a parity check.

``export_onnx(spec, out_path)`` compiles the spec (or takes a trained model), exports it with
``torch.onnx.export(..., dynamo=True)`` — the torch.export/onnxscript exporter, the default
and supported path on torch 2.x; the TorchScript exporter is deprecated (``exporter=
"legacy"`` still selects it, ``"auto"`` falls back to it when the dynamo path fails) — with
dynamic ``batch`` and ``seq`` axes (images: dynamic ``batch``), stores the concrete spec,
archir version, precision and input descriptions in ``metadata_props``, passes
``onnx.checker.check_model(full_check=True)``, then runs onnxruntime against PyTorch on real
inputs before writing. A parity failure raises :class:`~archir.errors.ExportError` naming
the first diverging output and position, unless ``force=True``.
"""

from __future__ import annotations

import json
import os
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import onnx
import torch

import archir
from archir.errors import ExportError
from archir.paths import check_out_file, normal_mode, write_bytes
from exporters import parity as par
from exporters import quantize as qz
from exporters.graph import DEFAULT_OPSET, model_graph

# opsets accepted up front: the torch.export exporter emits opset 18 at least (it does not
# down-convert below that) and, with torch 2.13 / onnxscript 0.7, nothing past 25 passes
# the onnx checker; the legacy exporter caps its opset at 18.
MIN_OPSET, MAX_OPSET = 18, 25
MIN_LEGACY_OPSET = 9
EXAMPLE_SEQ = 67
META_PREFIX = "archir."


@dataclass
class TensorInfo:
    """An input or output of the ONNX graph: name, element type, symbolic shape."""

    name: str
    dtype: str
    shape: list[int | str]
    description: str = ""

    def __str__(self) -> str:
        return f"{self.name}: {self.dtype}[{', '.join(str(d) for d in self.shape)}]"


@dataclass
class ExportReport:
    """What an export produced.

    Attributes:
        path: the written file (``None`` for ``check_only`` / a refused export).
        opset: ONNX opset of the default domain.
        inputs, outputs: graph inputs/outputs with symbolic shapes (``batch``, ``seq``).
        file_bytes: size of the (final-precision) model; ``fp32_bytes`` of the fp32 export.
        parity: fp32 parity against PyTorch (the gate), ``None`` when ``check=False``.
        quantized_parity: the final-precision model vs PyTorch (reported, not gated).
        precision: requested precision; ``block_precision``: IR block -> precision used.
        quality: task metric of PyTorch vs the exported file (``metric``, ``torch``,
            ``onnx``, ``delta``), when a task is available and ``check`` ran.
        export_s: wall seconds of the whole export; ``exporter``: ``dynamo`` or ``legacy``.
        written: whether ``path`` was written; ``forced``: written despite a parity failure.
        notes: anything the user should know (fallbacks, bits without a kernel ...).
    """

    path: str | None
    opset: int
    inputs: list[TensorInfo]
    outputs: list[TensorInfo]
    file_bytes: int
    parity: par.ParityReport | None
    precision: str
    block_precision: dict[str, str]
    export_s: float
    exporter: str = "dynamo"
    fp32_bytes: int = 0
    quantized_parity: par.ParityReport | None = None
    quality: dict[str, Any] | None = None
    written: bool = False
    forced: bool = False
    spec_name: str = ""
    notes: list[str] = field(default_factory=list)

    @property
    def size_ratio(self) -> float:
        """fp32 bytes / final bytes (1.0 for fp32)."""
        return self.fp32_bytes / self.file_bytes if self.file_bytes else 1.0

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["size_ratio"] = self.size_ratio
        return d

    def __str__(self) -> str:
        lines = [
            f"export {self.spec_name} -> {self.path or '(not written)'}",
            f"  exporter: torch.onnx ({self.exporter}), opset {self.opset}, "
            f"precision {self.precision}, {self.export_s:.1f}s",
            "  inputs:  " + "; ".join(str(t) for t in self.inputs),
            "  outputs: " + "; ".join(str(t) for t in self.outputs),
            f"  size: {_human_bytes(self.file_bytes)}"
            + (
                f" (fp32 {_human_bytes(self.fp32_bytes)}, {self.size_ratio:.2f}x smaller)"
                if self.precision != "fp32" and self.fp32_bytes
                else ""
            ),
        ]
        if self.parity is not None:
            lines.append(f"  parity fp32: {self.parity.summary()}")
            if self.parity.first_divergence:
                lines.append(f"    first divergence: {self.parity.first_divergence}")
        if self.quantized_parity is not None:
            lines.append(f"  parity {self.precision}: {self.quantized_parity.summary()}")
        if self.quality:
            q = self.quality
            lines.append(
                f"  quality ({q['task']}, {q['metric']}): torch {q['torch']:.4f}, "
                f"onnx {q['onnx']:.4f}, delta {q['delta']:+.4f}"
            )
        counts = Counter(self.block_precision.values())
        line = "  precision per block: " + qz.precision_counts(self.block_precision)
        if len(counts) > 1:
            common = counts.most_common(1)[0][0]
            rest = [f"{b}={p}" for b, p in self.block_precision.items() if p != common]
            line += f" (all {common} but " + ", ".join(rest[:12])
            line += (" ..." if len(rest) > 12 else "") + ")"
        lines.append(line)
        lines.extend(f"  note: {n}" for n in self.notes)
        if self.forced:
            lines.append("  WARNING: written with --force despite a parity failure")
        return "\n".join(lines)

    def __rich__(self) -> str:
        from rich.markup import escape

        return escape(str(self))


def _human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n:.2f} GiB"


# -- model and graph bookkeeping --------------------------------------------------------------


def _weights_mismatch(model: torch.nn.Module, path: Path) -> str | None:
    """Why the safetensors file at ``path`` does not fit ``model``: counts and the first
    missing key, unexpected key and shape mismatch; ``None`` when every key and shape fits.
    A model key absent from the file is fine when it shares storage with one in it (tied
    weights are saved once)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        file_shapes = {k: list(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118
    sd = model.state_dict()
    in_file = {sd[k].data_ptr() for k in file_shapes if k in sd}
    missing = [k for k in sd if k not in file_shapes and sd[k].data_ptr() not in in_file]
    unexpected = [k for k in file_shapes if k not in sd]
    shapes = [
        (k, file_shapes[k], list(sd[k].shape))
        for k in file_shapes
        if k in sd and file_shapes[k] != list(sd[k].shape)
    ]
    parts = []
    if missing:
        parts.append(
            f"{len(missing)} missing key(s) (first: '{missing[0]}' {list(sd[missing[0]].shape)})"
        )
    if unexpected:
        k = unexpected[0]
        parts.append(f"{len(unexpected)} unexpected key(s) (first: '{k}' {file_shapes[k]})")
    if shapes:
        k, fs, ms = shapes[0]
        parts.append(
            f"{len(shapes)} shape mismatch(es) (first: '{k}' is {fs} in the file, {ms} in the spec)"
        )
    return "; ".join(parts) or None


def load_weights(model: torch.nn.Module, weights: str | os.PathLike) -> None:
    """Load a safetensors checkpoint into ``model`` (strict).

    Raises:
        ExportError: missing file, or keys/shapes that do not match the spec (the message
            counts missing keys, unexpected keys and shape mismatches and names the first
            of each).
    """
    from safetensors.torch import load_model

    p = Path(weights)
    if not p.is_file():
        raise ExportError(f"weights file '{p}' does not exist", hint="give a .safetensors file")
    hint = "export with the spec.yaml that was saved beside the weights"
    try:
        why = _weights_mismatch(model, p)
    except Exception as exc:  # noqa: BLE001 - not a safetensors file, truncated header ...
        raise ExportError(
            f"weights '{p}' are not a readable safetensors file: {str(exc)[:300]}", hint=hint
        ) from None
    if why:
        raise ExportError(f"weights '{p}' do not fit the spec: {why}", hint=hint)
    try:
        load_model(model, str(p), strict=True)
    except Exception as exc:  # noqa: BLE001 - safetensors raises several types
        lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
        detail = " ".join(lines[:3])[:400]
        raise ExportError(f"weights '{p}' do not fit the spec: {detail}", hint=hint) from None


def module_to_block(model: Any) -> dict[str, str]:
    """Top-level module path of the CompiledModel (``blocks.3``, ``embed``...) -> IR node name
    (``layers.1.blocks.1``). Shared blocks map to their owner."""
    out: dict[str, str] = {}
    graph = getattr(model, "graph", None)
    plan = getattr(model, "_plan", None)
    if graph is None or plan is None:
        return out
    for node, (op, idx, _) in zip(list(graph), plan):
        if op == "block":
            out.setdefault(f"blocks.{idx}", node.name)
        elif op == "merge":
            out.setdefault(f"merges.{idx}", node.name)
        elif op == "embed":
            out["embed"] = node.name
        elif op == "norm":
            out["final_norm"] = node.name
        elif op == "head":
            out["head"] = node.name
    return out


def block_bits(model: Any) -> dict[str, float]:
    """IR node name -> weight bits, for nodes that own weights (shared nodes excluded)."""
    out: dict[str, float] = {}
    for node in getattr(model, "graph", []):
        if node.op == "merge" or getattr(node, "weights_of", None):
            continue
        out[node.name] = float(node.bits)
    return out


def fold_constant_weights(proto: onnx.ModelProto) -> int:
    """Replace ``Gather(initializer W, constant scalar i, axis=0)`` by a new initializer
    ``W[i]`` (e.g. an MoE expert's weights read out of a ``[E, d, h]`` bank) and
    ``Transpose(initializer W)`` by ``Wᵀ`` (the exporter leaves the transposes of weights
    used by several MatMuls, as in weight-shared layers, unfolded), so that the consuming
    MatMul has a plain 2-D initializer that onnxruntime's int8/int4 quantizers turn into
    MatMulInteger / MatMulNBits (they skip a MatMul whose weight is computed). Initializers
    nothing reads any more are dropped. Returns the number of nodes folded."""
    from onnx import numpy_helper

    g = proto.graph
    inits = {i.name: i for i in g.initializer}
    arrays: dict[str, Any] = {}
    rename: dict[str, str] = {}
    keep = []
    for n in g.node:
        axis = next((a.i for a in n.attribute if a.name == "axis"), 0)
        if (
            n.op_type == "Gather"
            and axis == 0
            and n.input[0] in inits
            and n.input[1] in inits
            and not inits[n.input[1]].dims  # a scalar index: the result drops the axis
        ):
            if n.input[0] not in arrays:
                arrays[n.input[0]] = numpy_helper.to_array(inits[n.input[0]])
            i = int(numpy_helper.to_array(inits[n.input[1]]))
            name = f"{n.input[0]}.{i}"
            if name not in inits:
                new = numpy_helper.from_array(arrays[n.input[0]][i].copy(), name)
                g.initializer.append(new)
                inits[name] = new
            rename[n.output[0]] = name
            continue
        if n.op_type == "Transpose" and n.input[0] in inits:
            if n.input[0] not in arrays:
                arrays[n.input[0]] = numpy_helper.to_array(inits[n.input[0]])
            w = arrays[n.input[0]]
            perm = next((list(a.ints) for a in n.attribute if a.name == "perm"), None)
            perm = perm or list(range(w.ndim))[::-1]
            name = f"{n.input[0]}.T" + ("" if perm == [1, 0] else "".join(map(str, perm)))
            if name not in inits:
                new = numpy_helper.from_array(w.transpose(perm).copy(), name)
                g.initializer.append(new)
                inits[name] = new
            rename[n.output[0]] = name
            continue
        keep.append(n)
    if not rename:
        return 0
    del g.node[:]
    g.node.extend(keep)
    # subgraphs (an If's branches) read main-graph values too; ONNX names are unique across
    # the nested graphs, so renaming inside them is safe
    every = [m for n in g.node for m in (n, *qz.subgraph_nodes(n))]
    for n in every:
        for j, x in enumerate(n.input):
            if x in rename:
                n.input[j] = rename[x]
    for o in g.output:
        if o.name in rename:  # never the case for archir models; keep the graph valid
            g.node.append(onnx.helper.make_node("Identity", [rename[o.name]], [o.name]))
    used = {x for n in every for x in n.input} | {o.name for o in g.output}
    for i in [i for i in g.initializer if i.name in arrays and i.name not in used]:
        g.initializer.remove(i)
    # value_info entries of removed outputs would confuse the checker's shape inference
    vi = [v for v in g.value_info if v.name not in rename]
    del g.value_info[:]
    g.value_info.extend(vi)
    return len(rename)


_DTYPES = {
    onnx.TensorProto.FLOAT: "float32",
    onnx.TensorProto.FLOAT16: "float16",
    onnx.TensorProto.INT64: "int64",
    onnx.TensorProto.INT32: "int32",
}


def tensor_infos(values: Any) -> list[TensorInfo]:
    out = []
    for v in values:
        t = v.type.tensor_type
        dims: list[int | str] = [
            d.dim_param if d.dim_param else (d.dim_value if d.HasField("dim_value") else "?")
            for d in t.shape.dim
        ]
        out.append(TensorInfo(v.name, _DTYPES.get(t.elem_type, str(t.elem_type)), dims))
    return out


def input_descriptions(spec_model: Any) -> dict[str, str]:
    m = spec_model.model
    if m.task == "image_classification":
        return {
            "images": f"float32 [batch, {m.channels}, {m.image_size}, {m.image_size}] images",
            "logits": f"float32 [batch, {m.n_classes}] class logits",
        }
    desc = {
        "tokens": f"int64 [batch, seq] token ids in [0, {m.vocab_size}), "
        f"seq <= {m.max_seq_len} (max_seq_len)",
    }
    if m.task == "causal_lm":
        desc["logits"] = f"float32 [batch, seq, {m.vocab_size}] next-token logits (causal)"
    else:
        desc["logits"] = f"float32 [batch, {m.n_classes}] class logits"
    return desc


# -- the exporter -----------------------------------------------------------------------------


def _example_input(spec_model: Any) -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    m = spec_model.model
    # neither 0 nor 1 on a dynamic axis, nor on a size derived from it (torch.export would
    # specialize them): 67 steps make 3+ chunks for the chunked scans (chunks of 16 and 32)
    return par.random_input(spec_model, 2, max(2, min(EXAMPLE_SEQ, m.max_seq_len)), gen)


def _torch_export(
    model: torch.nn.Module, spec_model: Any, opset: int, exporter: str
) -> tuple[onnx.ModelProto, str, list[str]]:
    """``(model proto, exporter used, one line per exporter that failed before it)``: the
    full-sequence graph through the one export path (:func:`exporters.graph.model_graph`),
    tagged with IR blocks and with constant weights folded."""
    ex = model_graph(spec_model, model, _example_input(spec_model), exporter=exporter, opset=opset)
    return ex.proto, ex.exporter, ex.failures


def _set_metadata(
    proto: onnx.ModelProto, spec: Any, precision: str, exporter: str, plan: dict[str, str]
) -> None:
    spec_model = spec.model
    meta = {
        "archir.version": archir.__version__,
        "archir.spec": spec.to_yaml(),
        "archir.spec_name": spec_model.name,
        "archir.precision": precision,
        "archir.block_precision": json.dumps(plan),
        "archir.inputs": json.dumps(input_descriptions(spec_model)),
        "archir.task": spec_model.model.task,
        "archir.exporter": f"torch.onnx {exporter} (torch {torch.__version__})",
    }
    if spec_model.model.task != "image_classification":
        meta[par.MAX_SEQ_LEN_KEY] = str(spec_model.model.max_seq_len)
    keep = [p for p in proto.metadata_props if not p.key.startswith(META_PREFIX)]
    del proto.metadata_props[:]
    for p in keep:
        proto.metadata_props.add(key=p.key, value=p.value)
    for k, v in meta.items():
        proto.metadata_props.add(key=k, value=v)
    proto.doc_string = f"archir {archir.__version__}: {spec_model.name} ({precision})"
    descs = input_descriptions(spec_model)
    for v in list(proto.graph.input) + list(proto.graph.output):
        if v.name in descs:
            v.doc_string = descs[v.name]


def read_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The ``metadata_props`` of an ONNX file (weights not loaded)."""
    proto = onnx.load(str(path), load_external_data=False)
    return {p.key: p.value for p in proto.metadata_props}


def _check_model(proto: onnx.ModelProto, where: str) -> None:
    try:
        onnx.checker.check_model(proto, full_check=True)
    except Exception as exc:  # noqa: BLE001 - checker/shape-inference errors
        raise ExportError(
            f"onnx.checker rejected the {where} model: {str(exc).splitlines()[0][:400]}"
        ) from None


def _quality(task: Any, spec_model: Any, model: torch.nn.Module, session: Any) -> dict[str, Any]:
    cfg = spec_model.train
    L = max(2, min(cfg.seq_len, spec_model.model.max_seq_len))
    batches = 2
    t = task.evaluate(model, 8, L, batches)
    o = task.evaluate(par.OrtModule(session), 8, L, batches)
    metric = task.metric
    return {
        "task": task.name,
        "metric": metric,
        "torch": float(t[metric]),
        "onnx": float(o[metric]),
        "delta": float(o[metric]) - float(t[metric]),
        "direction": task.direction,
    }


def write_model(out_path: str | os.PathLike, proto: onnx.ModelProto, data: bytes) -> str:
    """Write ``proto`` (serialized: ``data``) to ``out_path``, making its folder; past
    1.9 GB the weights go to an external-data file beside it (protobuf caps a message at
    2 GB). Returns the path written."""
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    if len(data) > 1_900_000_000:
        onnx.save(proto, str(out), save_as_external_data=True)
        normal_mode(out)
    else:
        write_bytes(out, data)
    return str(out)


def export_onnx(
    spec: Any,
    out_path: str | os.PathLike | None,
    *,
    model: torch.nn.Module | None = None,
    weights: str | os.PathLike | None = None,
    precision: str = "fp32",
    check: bool = True,
    force: bool = False,
    task: Any = None,
    opset: int | None = None,
    exporter: str = "auto",
    check_only: bool = False,
    quality: bool = True,
    threads: int | None = 1,
) -> ExportReport:
    """Export a concrete spec (or its trained model) to ONNX.

    Args:
        spec: a concrete :class:`archir.Spec`.
        out_path: file to write (may be ``None`` with ``check_only``).
        model: an already-trained ``CompiledModel`` (default: ``archir.compile(spec, seed=0)``
            with ``weights`` loaded when given).
        weights: a ``.safetensors`` checkpoint for the compiled spec.
        precision: ``fp32 | fp16 | int8 | int8-static | int4 | auto`` (see
            :mod:`exporters.quantize`; ``auto`` follows the IR's per-block ``bits``).
        check: run the parity gate (onnxruntime vs PyTorch, fp32 max abs error ≤ 1e-4 ×
            output scale) and, for reduced precisions, the quality report.
        force: write even when parity fails (the report says so).
        task: a Task or task name for real inputs, calibration and the quality report
            (default: the spec's ``train.task``; ``"random"``: random inputs only).
        opset: ONNX opset (default 20).
        exporter: ``dynamo`` (torch.export based), ``legacy`` (TorchScript, deprecated) or
            ``auto`` (dynamo, falling back to legacy).
        check_only: run everything but write nothing.
        quality: compute the task-quality report for reduced precisions (needs a task).
        threads: onnxruntime intra-op threads for the checks.

    Returns:
        ExportReport (``str(report)`` is the CLI's rendering).

    Raises:
        ExportError: parity failure (names the first diverging output/position), export or
            quantization failure, checker failure, bad weights or precision.
        PathError: ``out_path`` is a folder, a device, or in a place that cannot be written
            (checked before any export work).
        SpecError: the spec is open.
    """
    t0 = time.perf_counter()
    spec_model = spec.model  # raises SpecError for an open spec
    if precision not in qz.PRECISIONS:
        raise ExportError(
            f"unknown precision '{precision}'", hint="expected one of: " + ", ".join(qz.PRECISIONS)
        )
    if exporter not in ("auto", "dynamo", "legacy"):
        raise ExportError(f"unknown exporter '{exporter}'", hint="dynamo, legacy or auto")
    opset = DEFAULT_OPSET if opset is None else opset
    lo = MIN_LEGACY_OPSET if exporter == "legacy" else MIN_OPSET
    if not lo <= opset <= MAX_OPSET:
        raise ExportError(
            f"opset {opset} is not supported by the {exporter} exporter",
            hint=f"use an opset in {lo}..{MAX_OPSET} (default {DEFAULT_OPSET})"
            + ("; --exporter legacy accepts down to 9" if lo > MIN_LEGACY_OPSET else ""),
        )
    if not check_only and out_path is not None:
        check_out_file(out_path)  # before any export work
    if model is None:
        model = archir.compile(spec, seed=0)
        if weights is not None:
            load_weights(model, weights)
    was_training = model.training
    model.eval()
    notes: list[str] = []
    try:
        proto, used, failures = _torch_export(model, spec_model, opset, exporter)
        if used != exporter and exporter == "auto" and used == "legacy":
            why = failures[0].split(": ", 1)[-1] if failures else "unknown reason"
            notes.append(f"dynamo exporter failed ({why}); used the legacy TorchScript exporter")
        bits = block_bits(model)
        _set_metadata(proto, spec, "fp32", used, {b: "fp32" for b in bits})
        _check_model(proto, "fp32")
        fp32_bytes = proto.ByteSize()
        the_task = (
            par.resolve_task(spec_model, task) if check or precision == "int8-static" else None
        )
        parity_report = None
        if check:
            inputs, source = par.parity_inputs(spec_model, the_task)
            sess = par.make_session(proto.SerializeToString(), threads)
            parity_report = par.compare(sess, model, inputs, source=source)
        final, plan = proto, {b: "fp32" for b in bits}
        q_parity = None
        quality_report = None
        if precision != "fp32":
            calib = None
            if precision == "int8-static":
                in_name = proto.graph.input[0].name
                calib = par.TaskCalibrationReader(
                    in_name, par.calibration_batches(spec_model, the_task)
                )
            final, plan = qz.quantize(proto, precision, bits, calib)
            low = {b: v for b, v in bits.items() if v < 4 and plan.get(b) == "int4"}
            if low:
                notes.append(
                    "bits below 4 have no onnxruntime kernel; stored at 4 bits: "
                    + ", ".join(f"{b} ({v:g})" for b, v in low.items())
                )
            _set_metadata(final, spec, precision, used, plan)
            _check_model(final, precision)
            if check:
                qsess = par.make_session(final.SerializeToString(), threads)
                inputs, source = par.parity_inputs(spec_model, the_task)
                q_parity = par.compare(qsess, model, inputs, source=source, gated=False)
                if quality and the_task is not None:
                    try:
                        quality_report = _quality(the_task, spec_model, model, qsess)
                    except Exception as exc:  # noqa: BLE001 - a task that cannot evaluate
                        notes.append(f"quality report skipped: {exc}")
                elif the_task is None:
                    notes.append("no task data for this model: quality not measured")
        data = final.SerializeToString()
        in_infos = tensor_infos(final.graph.input)
        descs = input_descriptions(spec_model)
        for t in in_infos:
            t.description = descs.get(t.name, "")
        out_infos = tensor_infos(final.graph.output)
        for t in out_infos:
            t.description = descs.get(t.name, "")
        report = ExportReport(
            path=None,
            opset=next((o.version for o in final.opset_import if o.domain in ("", "ai.onnx")), 0),
            inputs=in_infos,
            outputs=out_infos,
            file_bytes=len(data),
            parity=parity_report,
            precision=precision,
            block_precision=plan,
            export_s=0.0,
            exporter=used,
            fp32_bytes=fp32_bytes,
            quantized_parity=q_parity,
            quality=quality_report,
            spec_name=spec_model.name,
            notes=notes,
        )
        failed = parity_report is not None and not parity_report.passed
        if failed and not force:
            report.export_s = time.perf_counter() - t0
            pr = parity_report
            assert pr is not None
            raise ExportError(
                f"parity check failed: onnxruntime and PyTorch differ by {pr.max_abs_err:.3g} "
                f"(tolerance {pr.tolerance:.3g}); first divergence: {pr.first_divergence or pr.where}",
                hint="the export is wrong for this block; --force writes it anyway",
            )
        if not check_only and out_path is not None:
            report.path = write_model(out_path, final, data)
            report.written = True
            report.forced = failed
        report.export_s = time.perf_counter() - t0
        return report
    finally:
        model.train(was_training)
