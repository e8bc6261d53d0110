"""Reduced-precision variants of an exported fp32 ONNX model.

Precisions (``--precision``):

* ``fp32`` — the export as is.
* ``fp16`` — every float tensor and op in float16 (``onnxruntime.transformers.float16``),
  inputs and outputs kept float32; runs on onnxruntime's CPU provider.
* ``int8`` — dynamic quantization (``onnxruntime.quantization.quantize_dynamic``): weights of
  every MatMul/Gemm with a constant weight (and the token-embedding Gather) stored as int8,
  activations quantized on the fly (per-tensor, unsigned). One scale per weight tensor:
  per-channel scales ran 0-9 % slower on this project's AVX2 CPU with no measurable
  quality gain on a trained model (``benchmarks/precision.py``).
* ``int8-static`` — QDQ static quantization (``quantize_static``) of the weight MatMuls/Convs,
  activation ranges calibrated (MinMax) on task batches (random inputs without a task).
* ``int4`` — weight-only 4-bit blockwise quantization to ``MatMulNBits`` (and
  ``GatherBlockQuantized`` for the embedding) with ``onnxruntime.quantization.
  matmul_nbits_quantizer`` (RTN, symmetric, block 32, ``accuracy_level`` 4: activations
  quantized to int8 per block for the product — on this AVX2 CPU 3.4x faster than the
  float-compute kernel for one token at a time and 1.5x for 16, the same for whole
  prompts, ``benchmarks/precision.py``).
* ``auto`` — the IR's per-block ``bits`` decide: ``bits >= 16`` stays float32; ``bits == 8``
  gets int8 (dynamic); ``bits <= 4`` gets int4 weight-only (2, 1.58 and 1 bits have no
  onnxruntime kernel and are stored at 4 bits — the report says so).

Each graph node carries the IR block it came from in its ``metadata_props`` key
``archir.block`` (set by the exporter); quantization picks nodes per block with it.
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import onnx

from archir.errors import ExportError

PRECISIONS = ("fp32", "fp16", "int8", "int8-static", "int4", "auto")
BLOCK_KEY = "archir.block"
INT4_BLOCK = 32
#: MatMulNBits ``accuracy_level``: 4 = int8 compute (the fast kernels on x86 CPUs)
INT4_ACCURACY_LEVEL = 4


def precision_counts(plan: dict[str, str]) -> str:
    """``int4 x1, int8 x2, fp32 x5`` for a block -> precision map (``fp32`` when empty)."""
    counts = Counter(plan.values())
    return ", ".join(f"{k} x{n}" for k, n in sorted(counts.items())) or "fp32"


def node_block(node: onnx.NodeProto) -> str | None:
    for p in node.metadata_props:
        if p.key == BLOCK_KEY:
            return p.value
    return None


def weight_nodes(model: onnx.ModelProto, op_types: Sequence[str] = ("MatMul", "Gemm")) -> list:
    """Nodes of ``op_types`` whose weight operand (input 1; input 0 for Gather) is an
    initializer: ``[(node, block)]``."""
    inits = {i.name for i in model.graph.initializer}
    out = []
    for n in model.graph.node:
        if n.op_type not in op_types:
            continue
        w = n.input[0] if n.op_type == "Gather" else (n.input[1] if len(n.input) > 1 else "")
        if w in inits:
            out.append((n, node_block(n)))
    return out


def retag(model: onnx.ModelProto, tags: dict[str, str]) -> onnx.ModelProto:
    """Restore ``archir.block`` tags a quantizer dropped: a new node takes the tag of the
    longest original node name it starts with (``node_linear_Q4`` <- ``node_linear``)."""
    names = sorted(tags, key=len, reverse=True)
    for n in model.graph.node:
        if node_block(n) is not None:
            continue
        hit = tags.get(n.name) or next((tags[o] for o in names if n.name.startswith(o)), None)
        if hit is None:  # quantizer helper nodes are named after their input tensor
            hit = next((tags[o] for o in names if any(i.startswith(o) for i in n.input)), None)
        if hit is not None:
            n.metadata_props.add(key=BLOCK_KEY, value=hit)
    return model


def gemm_to_matmul(model: onnx.ModelProto) -> int:
    """Rewrite each ``Gemm(A, W, C?)`` with an initializer weight ``W`` (``alpha``/``beta``
    1, ``A`` not transposed) as ``MatMul(A, W or Wᵀ)`` followed by ``Add(C)`` when it has a
    bias, in place: the MatMul keeps the Gemm's name and block tag (the Add gets
    ``<name>_bias``). A ``Linear`` on a 2-D input — the decode graph's one token per
    sequence, ``[batch, d]`` — exports as a Gemm, which the 4-bit quantizer does not take
    and the int8 one renames past its node list; as a MatMul both quantize it like the
    full-sequence graph's. Returns the number of nodes rewritten."""
    from onnx import helper, numpy_helper

    g = model.graph
    inits = {i.name: i for i in g.initializer}
    attrs = {"alpha": 1.0, "beta": 1.0, "transA": 0, "transB": 0}
    out: list[onnx.NodeProto] = []
    done = 0
    transposed: set[str] = set()
    for n in g.node:
        a = dict(attrs)
        a.update({x.name: helper.get_attribute_value(x) for x in n.attribute})
        if (
            n.op_type != "Gemm"
            or n.input[1] not in inits
            or a["alpha"] != 1.0
            or a["beta"] != 1.0
            or a["transA"]
            or len(inits[n.input[1]].dims) != 2
        ):
            out.append(n)
            continue
        w = n.input[1]
        if a["transB"]:
            transposed.add(w)
            name = f"{w}.T"
            if name not in inits:
                t = numpy_helper.from_array(numpy_helper.to_array(inits[w]).T.copy(), name)
                g.initializer.append(t)
                inits[name] = t
            w = name
        bias = len(n.input) > 2 and n.input[2] != ""
        mm_out = f"{n.output[0]}_mm" if bias else n.output[0]
        mm = helper.make_node("MatMul", [n.input[0], w], [mm_out], name=n.name)
        mm.metadata_props.extend(n.metadata_props)
        out.append(mm)
        if bias:
            add = helper.make_node(
                "Add", [mm_out, n.input[2]], [n.output[0]], name=f"{n.name}_bias"
            )
            add.metadata_props.extend(n.metadata_props)
            out.append(add)
        done += 1
    if done:
        del g.node[:]
        g.node.extend(out)
        used = _read_names(g)
        for i in [i for i in g.initializer if i.name in transposed and i.name not in used]:
            g.initializer.remove(i)
    return done


def _read_names(g: onnx.GraphProto) -> set[str]:
    """Every name a node of ``g`` or of its subgraphs reads, and ``g``'s outputs."""
    names = {o.name for o in g.output}
    for n in g.node:
        names.update(n.input)
        for at in n.attribute:
            for sub in [at.g] if at.HasField("g") else list(at.graphs):
                names |= _read_names(sub)
    return names


def plan_precision(
    model: onnx.ModelProto, precision: str, block_bits: dict[str, float]
) -> dict[str, str]:
    """Per-IR-block precision label for ``precision`` (``fp32``/``fp16``/``int8``/``int4``).

    Blocks without quantizable weights (norms, parameter-free mixers) stay ``fp32`` except
    under ``fp16``.
    """
    if precision not in PRECISIONS:
        raise ExportError(
            f"unknown precision '{precision}'", hint="expected one of: " + ", ".join(PRECISIONS)
        )
    has_weights = {b for _, b in weight_nodes(model, ("MatMul", "Gemm", "Gather", "Conv")) if b}
    plan: dict[str, str] = {}
    for block, bits in block_bits.items():
        if precision == "fp16":
            plan[block] = "fp16"
        elif block not in has_weights or precision == "fp32":
            plan[block] = "fp32"
        elif precision == "int8":
            plan[block] = "int8"
        elif precision == "int8-static":
            plan[block] = "int8-static"
        elif precision == "int4":
            plan[block] = "int4"
        else:  # auto
            plan[block] = "fp32" if bits >= 16 else ("int8" if bits >= 8 else "int4")
    return plan


def _names(model: onnx.ModelProto, plan: dict[str, str], label: str, ops: Sequence[str]):
    return [n.name for n, b in weight_nodes(model, ops) if b is not None and plan.get(b) == label]


def to_fp16(model: onnx.ModelProto) -> onnx.ModelProto:
    from onnxruntime.transformers.float16 import convert_float_to_float16
    from onnxruntime.transformers.onnx_model import OnnxModel

    out = convert_float_to_float16(model, keep_io_types=True, disable_shape_infer=False)
    # the converter keeps an fp32 initializer read only by an op it leaves in fp32 (rope's
    # float Range) but declares it fp16 in value_info, which the checker rejects: an
    # initializer's type is its own
    inits = {i.name for i in out.graph.initializer}
    kept = [v for v in out.graph.value_info if v.name not in inits]
    del out.graph.value_info[:]
    out.graph.value_info.extend(kept)
    wrapped = OnnxModel(out)
    wrapped.topological_sort()
    return wrapped.model


def to_int4(model: onnx.ModelProto, nodes: list[str], gather_nodes: list[str]) -> onnx.ModelProto:
    """Weight-only 4-bit (MatMulNBits / GatherBlockQuantized) on the named nodes."""
    from onnxruntime.quantization.matmul_nbits_quantizer import (
        DefaultWeightOnlyQuantConfig,
        MatMulNBitsQuantizer,
    )

    ops: tuple[str, ...] = ("MatMul",) + (("Gather",) if gather_nodes else ())
    cfg = DefaultWeightOnlyQuantConfig(
        block_size=INT4_BLOCK,
        is_symmetric=True,
        op_types_to_quantize=ops,
        quant_axes=(("MatMul", 0), ("Gather", 1)),
        bits=4,
        accuracy_level=INT4_ACCURACY_LEVEL,
    )
    chosen = set(nodes) | set(gather_nodes)
    # nodes_to_include does not restrict the quantizer in every version: exclude the rest
    others = [n.name for n, _ in weight_nodes(model, ("MatMul", "Gather")) if n.name not in chosen]
    others += [n.name for n in model.graph.node if n.op_type == "MatMul" and n.name not in chosen]
    q = MatMulNBitsQuantizer(
        model,
        bits=4,
        block_size=INT4_BLOCK,
        is_symmetric=True,
        nodes_to_exclude=sorted(set(others)),
        nodes_to_include=sorted(chosen),
        op_types_to_quantize=ops,
        algo_config=cfg,
        accuracy_level=INT4_ACCURACY_LEVEL,
    )
    q.process()
    return q.model.model


def to_int8_dynamic(model: onnx.ModelProto, nodes: list[str], tmp: Path) -> onnx.ModelProto:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    src, dst = tmp / "in8.onnx", tmp / "out8.onnx"
    onnx.save(model, str(src))
    quantize_dynamic(
        str(src),
        str(dst),
        op_types_to_quantize=["MatMul", "Gemm", "Gather"],
        nodes_to_quantize=nodes,
        weight_type=QuantType.QInt8,
        per_channel=False,
        extra_options={"MatMulConstBOnly": True},
    )
    return onnx.load(str(dst))


def to_int8_static(
    model: onnx.ModelProto, nodes: list[str], reader: Any, tmp: Path
) -> onnx.ModelProto:
    from onnxruntime.quantization import (
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    src, dst = tmp / "in8s.onnx", tmp / "out8s.onnx"
    onnx.save(model, str(src))
    quantize_static(
        str(src),
        str(dst),
        reader,
        quant_format=QuantFormat.QDQ,
        op_types_to_quantize=["MatMul", "Gemm", "Conv"],
        nodes_to_quantize=nodes,
        activation_type=QuantType.QInt8,
        weight_type=QuantType.QInt8,
        per_channel=True,
        calibrate_method=CalibrationMethod.MinMax,
        extra_options={"ActivationSymmetric": True, "WeightSymmetric": True},
    )
    return onnx.load(str(dst))


def quantize(
    model: onnx.ModelProto,
    precision: str,
    block_bits: dict[str, float],
    calibration: Any = None,
) -> tuple[onnx.ModelProto, dict[str, str]]:
    """Turn an fp32 export into ``precision``. Returns ``(model, per-block precision)``.

    Args:
        model: the fp32 model (nodes tagged with ``archir.block``).
        precision: one of :data:`PRECISIONS`.
        block_bits: IR block name -> bits (used by ``auto``).
        calibration: a CalibrationDataReader (needed by ``int8-static``).

    Raises:
        ExportError: unknown precision, or a quantizer failed.
    """
    plan = plan_precision(model, precision, block_bits)
    _import_quantizers()
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # the quantizers log advice at WARNING on the root logger
    try:
        return _quantize(model, precision, plan, calibration)
    finally:
        root.setLevel(level)


def _import_quantizers() -> None:
    """Import onnxruntime's quantizers without their side effect on logging: importing
    ``matmul_nbits_quantizer`` calls ``logging.basicConfig(level=INFO)``, which installs a
    root handler and makes every later INFO record of the process print (hundreds of
    "skip to quantize node ..." lines per int4 export)."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    import onnxruntime.quantization  # noqa: F401
    import onnxruntime.quantization.matmul_nbits_quantizer  # noqa: F401

    for h in list(root.handlers):
        if h not in handlers:
            root.removeHandler(h)
    root.setLevel(level)


def _quantize(
    model: onnx.ModelProto, precision: str, plan: dict[str, str], calibration: Any
) -> tuple[onnx.ModelProto, dict[str, str]]:
    if precision == "fp32" or all(v == "fp32" for v in plan.values()):
        return model, plan
    if precision == "fp16":
        return to_fp16(model), plan
    with tempfile.TemporaryDirectory(prefix="archir-q-") as td:
        tmp = Path(td)
        try:
            out = model
            tags = {n.name: b for n in model.graph.node if (b := node_block(n))}
            int4 = _names(out, plan, "int4", ("MatMul",))
            int4_gather = _names(out, plan, "int4", ("Gather",))
            if int4 or int4_gather:
                out = retag(to_int4(out, int4, int4_gather), tags)
            int8 = _names(out, plan, "int8", ("MatMul", "Gemm", "Gather"))
            if int8:
                out = retag(to_int8_dynamic(out, int8, tmp), tags)
            static = _names(out, plan, "int8-static", ("MatMul", "Gemm", "Conv"))
            if static:
                if calibration is None:
                    raise ExportError("int8-static needs calibration data")
                out = retag(to_int8_static(out, static, calibration, tmp), tags)
                unquantize_subgraph_reads(out)
        except ExportError:
            raise
        except Exception as exc:  # noqa: BLE001 - quantizer internals
            raise ExportError(
                f"onnxruntime could not quantize the model to {precision}: "
                f"{type(exc).__name__}: {exc}",
                hint="try another --precision, or report the block kind",
            ) from exc
    return sort_nodes(out), plan


def _subgraphs(node: onnx.NodeProto) -> list[onnx.GraphProto]:
    """``node``'s subgraphs: an ``If``'s branches, a ``Loop`` / ``Scan`` body."""
    return [
        g
        for a in node.attribute
        for g in ([a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs))
    ]


def subgraph_nodes(node: onnx.NodeProto) -> list[onnx.NodeProto]:
    """Every node inside ``node``'s subgraphs, nested ones included."""
    return [m for g in _subgraphs(node) for n in g.node for m in (n, *subgraph_nodes(n))]


#: operations onnxruntime's ``QDQPropagationTransformer`` moves a ``DequantizeLinear`` past
_QDQ_PROPAGATES = frozenset(
    {"Reshape", "Transpose", "Squeeze", "Unsqueeze", "Slice", "Flatten", "MaxPool", "Resize"}
)


def unquantize_subgraph_reads(model: onnx.ModelProto) -> int:
    """Drop each ``QuantizeLinear``/``DequantizeLinear`` pair whose dequantized value reaches
    an ``If``/``Loop``/``Scan`` branch read only through reshapes and transposes, in place;
    returns how many. onnxruntime 1.32 aborts the process loading such a graph (its QDQ
    propagation moves the ``DequantizeLinear`` past the reshape and looks the branch's
    read up among the ``If`` node's explicit inputs: a C++ assertion, not an error) —
    what a static int8 export of an attention whose values ``v`` feed the causal
    attention's ``If`` (:mod:`exporters.causal_attention`) produced. The value stays fp32
    there; its ``MatMul`` keeps its int8 weights."""
    g = model.graph
    read_inside = {i for n in g.node for m in subgraph_nodes(n) for i in m.input}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for n in g.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    producer = {o: n for n in g.node for o in n.output}

    def reaches_a_branch(name: str) -> bool:
        todo, seen = [name], set()
        while todo:
            t = todo.pop()
            if t in seen:
                continue
            seen.add(t)
            if t in read_inside:
                return True
            todo += [
                o for c in consumers.get(t, []) if c.op_type in _QDQ_PROPAGATES for o in c.output
            ]
        return False

    dropped = 0
    for dq in [n for n in g.node if n.op_type == "DequantizeLinear"]:
        q = producer.get(dq.input[0])
        if q is None or q.op_type != "QuantizeLinear" or not reaches_a_branch(dq.output[0]):
            continue
        for c in consumers.get(dq.output[0], []):
            c.input[:] = [q.input[0] if i == dq.output[0] else i for i in c.input]
        g.node.remove(dq)
        if all(c is dq for c in consumers.get(q.output[0], [])):
            g.node.remove(q)
        dropped += 1
    return dropped


def sort_nodes(model: onnx.ModelProto) -> onnx.ModelProto:
    """Order the nodes so that every node comes after the producers of its inputs, the
    values its subgraphs read from the enclosing graph included (onnxruntime's quantizers
    sort without those and can put an ``If`` — e.g. Hyena's long convolution, whose
    branches read the filter from the main graph — before the node computing what its
    branches read, which the checker rejects). ``onnx_ir``'s ``Graph.sort`` counts them and
    keeps a valid order as it is; a model without subgraphs is returned unchanged."""
    if not any(_subgraphs(n) for n in model.graph.node):
        return model
    from onnxscript import ir

    m = ir.from_proto(model)
    m.graph.sort()
    return ir.to_proto(m)


def file_size(path: str | os.PathLike) -> int:
    return os.path.getsize(path)
