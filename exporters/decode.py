"""The decode (step) model: a causal language model that takes one token per sequence and
carries every block's state as explicit ONNX inputs and outputs, so a plain onnxruntime loop
generates text without recomputing the sequence.

Graph (``export_decode``)::

    inputs:  tokens int64 [batch, 1],  state_in.0 ... state_in.{n-1}
    outputs: logits float32 [batch, 1, vocab],  state_out.0 ... state_out.{n-1}

``state_out.i`` is fed back as ``state_in.i`` for the next token. What each state is comes
from the blocks' ``init_state`` / ``step`` (:meth:`archir.compiler.CompiledModel.step`): a
KV cache ``[batch, n_kv_heads, past, head_dim]`` for attention (``past`` grows by one per
token; with a sliding window it stops at ``window``: the axis is named ``past_window``),
Hyena's history of its long convolutions' inputs ``[batch, order - 1, d_model, past]``
(growing the same way), fixed-size recurrent states for the state-space and recurrent kinds,
the last inputs of a convolution or pooling window, a token MLP's running sums, and int64
position counters ``[]`` where a block needs one. The metadata key ``archir.decode`` holds
JSON describing each state tensor — input and output name, block, meaning, dtype, symbolic
shape, and ``init_shape``: the shape to fill with zeros before the first token (``batch``
replaced by the batch size) — and the position handling, so nothing of archir is needed to
generate (see :func:`ort_generate_loop`).

The export is refused unless onnxruntime, fed a real text token by token from zero states,
reproduces PyTorch's full-sequence logits at every position (``≤ 1e-4 ×`` the logits' scale),
at batch 1 and 3. Exported fp32 with torch.export (``dynamo``, the exporter of the
full-sequence model: ``batch`` and each growing cache axis a dynamic dimension from 0),
falling back to the TorchScript exporter with a note.

Precision (``export_decode(..., precision=)``, ``archir export --decode --precision``,
``best/decode.onnx`` at ``auto``): every node is tagged with its IR block (:func:`_export_proto`,
:func:`tag_by_weights`) and the fp32 graph that passed the gate is reduced per block by the
quantizers of the full-sequence export (:func:`ship_decode`; ``auto``: int8 MatMulInteger for
8-bit blocks, int4 MatMulNBits for 4-bit ones, fp32 elsewhere). The written graph's deviation
from PyTorch on the same tokens (max abs logit error, top-1 agreement) is reported, not
gated; ``archir.precision`` and ``archir.block_precision`` are written as in ``model.onnx``,
and ``archir.decode`` is unchanged (states stay float32 / int64).
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch

from archir.errors import ExportError
from archir.paths import check_out_file
from exporters import parity as par
from exporters.quantize import precision_counts

DECODE_META = "archir.decode"
#: the attribute of :class:`DecodeModule` holding the compiled model (module path prefix)
WRAPPED = "model"
#: precisions a decode graph is written at (:mod:`exporters.quantize`; ``auto``: each
#: block's ``bits``). ``int8-static`` is not one: its activation ranges would have to be
#: calibrated for every state input too.
DECODE_PRECISIONS = ("fp32", "fp16", "int8", "int4", "auto")
STATE_IN = "state_in.{}"
STATE_OUT = "state_out.{}"
POSITION_NOTE = (
    "Feed tokens in order, one per call. Every block that needs the position keeps its own "
    "int64 counter among the states (starting at 0, advanced by the graph), so the caller "
    "never passes positions. Start every state from zeros of init_shape (batch -> the batch "
    "size, every other named axis -> 0) and feed each state_out.i back as state_in.i."
)


@dataclass
class StateTensor:
    """One state tensor of the decode graph.

    Attributes:
        input, output: its graph input (``state_in.i``) and output (``state_out.i``) names.
        node: the IR node it belongs to; ``kind``: that block's kind; ``what``: its meaning.
        dtype: ``float32`` or ``int64``.
        shape: symbolic shape (``batch``, ``past``, ``past_window`` or numbers).
        init_shape: the shape before the first token (growing axes 0).
    """

    input: str
    output: str
    node: str
    kind: str
    what: str
    dtype: str
    shape: list[int | str]
    init_shape: list[int | str]


def _names(fn: Any, n: int) -> list[str]:
    named = list(getattr(fn, "state_names", ()))
    return [named[j] if j < len(named) else f"state {j}" for j in range(n)]


def state_layout(model: Any) -> list[StateTensor]:
    """The decode graph's state tensors, in input order (those of each plan step in turn).

    Raises:
        DecodeError: the model cannot decode (:meth:`CompiledModel.check_decodable`).
    """
    with torch.no_grad():
        s2 = model.init_state(2)
        s3 = model.init_state(3)
        _, after = model.step(torch.zeros(2, dtype=torch.long), s2)
    nodes = list(model.graph)
    out: list[StateTensor] = []
    for (op, idx, _), node, a, b, c in zip(model._plan, nodes, s2, s3, after):
        if not a:
            continue
        fn = model.embed if op == "embed" else model.blocks[idx].fn
        window = getattr(fn, "window", None)
        grow = "past_window" if window else "past"
        names = _names(fn, len(a))
        for j, (t2, t3, t_after) in enumerate(zip(a, b, c)):
            shape: list[int | str] = []
            init: list[int | str] = []
            for d, n in enumerate(t2.shape):
                if t3.shape[d] != n:
                    shape.append("batch")
                    init.append("batch")
                elif t_after.shape[d] != n:
                    shape.append(grow)
                    init.append(n)
                else:
                    shape.append(int(n))
                    init.append(int(n))
            i = len(out)
            out.append(
                StateTensor(
                    input=STATE_IN.format(i),
                    output=STATE_OUT.format(i),
                    node=node.name,
                    kind=node.kind or op,
                    what=names[j],
                    dtype="int64" if t2.dtype == torch.long else "float32",
                    shape=shape,
                    init_shape=init,
                )
            )
    return out


class DecodeModule(torch.nn.Module):
    """``forward(tokens [batch, 1], *states) -> (logits [batch, 1, vocab], *states)``: one
    :meth:`CompiledModel.step` with the state flattened into tensors (export wrapper)."""

    def __init__(self, model: Any) -> None:
        super().__init__()
        self.model = model
        with torch.no_grad():
            self.counts = [len(s) for s in model.init_state(1)]

    def forward(self, tokens: torch.Tensor, *flat: torch.Tensor) -> tuple[torch.Tensor, ...]:
        state: list[tuple[torch.Tensor, ...]] = []
        i = 0
        for n in self.counts:
            state.append(tuple(flat[i : i + n]))
            i += n
        logits, new = self.model.step(tokens[:, 0], state)
        return (logits[:, None], *[t for s in new for t in s])


def initial_states(layout: list[StateTensor], batch: int) -> dict[str, np.ndarray]:
    """Zero-filled first states for an onnxruntime decode loop (``{input name: array}``)."""
    out = {}
    for s in layout:
        shape = [batch if d == "batch" else int(d) for d in s.init_shape]
        out[s.input] = np.zeros(shape, dtype=np.int64 if s.dtype == "int64" else np.float32)
    return out


class OrtStepper:
    """An onnxruntime decode session with the states it has reached: ``feed(tokens [batch,
    1] int64) -> logits [batch, 1, vocab]``, starting from zero states (``init_shape``)."""

    def __init__(self, session: Any, layout: list[StateTensor], batch: int) -> None:
        self.session = session
        self.inputs = [s.input for s in layout]
        self.states = initial_states(layout, batch)

    def feed(self, tokens: np.ndarray) -> np.ndarray:
        got = self.session.run(None, {"tokens": tokens, **self.states})
        self.states = dict(zip(self.inputs, got[1:]))
        return np.asarray(got[0])


class OrtDecodeLoop:
    """A decode session made to look like a full-sequence one: ``run(None, {"tokens": [B,
    T]})`` steps through the tokens and returns ``[logits [B, T, vocab]]`` (for the parity
    gate's :func:`~exporters.parity.compare`)."""

    def __init__(self, session: Any, layout: list[StateTensor]) -> None:
        self.session = session
        self.layout = layout
        #: the logits of every ``run`` so far, in call order
        self.outputs: list[np.ndarray] = []

    def get_inputs(self) -> list[Any]:
        return self.session.get_inputs()[:1]

    def get_outputs(self) -> list[Any]:
        return self.session.get_outputs()[:1]

    def run(self, _: Any, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        tokens = next(iter(feeds.values()))
        stepper = OrtStepper(self.session, self.layout, tokens.shape[0])
        logits = [stepper.feed(tokens[:, t : t + 1]) for t in range(tokens.shape[1])]
        out = np.concatenate(logits, axis=1)
        self.outputs.append(out)
        return [out]


@dataclass
class DecodeReport:
    """What a decode export produced: ``path`` (``None`` when not written), the state
    layout, the parity of the fp32 onnxruntime decode loop against PyTorch's full forward
    (the gate), file size and seconds.

    At a reduced precision: ``precision`` (requested) and ``block_precision`` (IR block ->
    precision used), ``quantized_parity`` (the written graph's loop against PyTorch:
    max abs logit error, reported, not gated), ``top1_agreement`` (fraction of positions
    whose next-token argmax equals PyTorch's) and ``fp32_bytes`` (the fp32 graph's size).
    """

    path: str | None
    spec_name: str
    states: list[StateTensor]
    parity: par.ParityReport | None
    file_bytes: int
    export_s: float
    exporter: str = "dynamo"
    notes: list[str] = field(default_factory=list)
    written: bool = False
    forced: bool = False
    precision: str = "fp32"
    block_precision: dict[str, str] = field(default_factory=dict)
    quantized_parity: par.ParityReport | None = None
    top1_agreement: float | None = None
    fp32_bytes: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def __str__(self) -> str:
        lines = [
            f"export {self.spec_name} (decode step) -> {self.path or '(not written)'}",
            f"  exporter: torch.onnx ({self.exporter}), {self.precision}, {self.export_s:.1f}s, "
            f"{self.file_bytes:,} bytes"
            + (
                f" (fp32 {self.fp32_bytes:,})"
                if self.precision != "fp32" and self.fp32_bytes
                else ""
            ),
            "  inputs:  tokens: int64[batch, 1] + " + f"{len(self.states)} state tensor(s)",
            "  outputs: logits: float32[batch, 1, vocab] + the updated states",
        ]
        for s in self.states:
            shape = ", ".join(str(d) for d in s.shape)
            lines.append(
                f"    {s.input} -> {s.output}: {s.dtype}[{shape}]  {s.node} ({s.kind}) {s.what}"
            )
        if self.parity is not None:
            lines.append(f"  parity (decode loop vs full forward): {self.parity.summary()}")
        if self.quantized_parity is not None:
            agree = "" if self.top1_agreement is None else f"; top-1 {self.top1_agreement:.3f}"
            lines.append(
                f"  {self.precision} decode loop vs PyTorch (reported, not gated): "
                f"{self.quantized_parity.summary()}{agree}"
            )
        if self.precision != "fp32":
            lines.append(f"  precision per block: {precision_counts(self.block_precision)}")
        lines.extend(f"  note: {n}" for n in self.notes)
        if self.forced:
            lines.append("  WARNING: written with --force despite a parity failure")
        return "\n".join(lines)


def check_precision(precision: str) -> None:
    """Refuse a precision the decode graph is not written at.

    Raises:
        ExportError: ``precision`` is not one of :data:`DECODE_PRECISIONS`.
    """
    if precision in DECODE_PRECISIONS:
        return
    why = (
        " (static int8 calibrates activation ranges, which a decode graph would need for "
        "every state input too)"
        if precision == "int8-static"
        else ""
    )
    raise ExportError(
        f"a decode graph is not exported at precision '{precision}'{why}",
        hint="use one of: " + ", ".join(DECODE_PRECISIONS),
    )


def _export_proto(
    model: Any, layout: list[StateTensor], exporter: str
) -> tuple[onnx.ModelProto, str, list[str]]:
    """``(proto, exporter used, one line per exporter that failed before it)`` through the
    one export path (:func:`exporters.graph.export_graph`): ``dynamo`` (torch.export, as the
    full-sequence export; every growing axis a dimension from 0), ``legacy`` (TorchScript)
    or ``auto`` (dynamo, then legacy)."""
    from exporters.graph import DEFAULT_OPSET, Axis, export_graph
    from exporters.onnx_export import module_to_block

    wrapper = DecodeModule(model)
    tokens = torch.zeros(2, 1, dtype=torch.long)
    with torch.no_grad():
        state = model.init_state(2)
        for t in (3, 1, 4):  # a past of 3: no axis is 0 or 1 in the example
            _, state = model.step(torch.full((2,), t, dtype=torch.long), state)
    flat = [t for s in state for t in s]
    axes: list[dict[int, Axis]] = [{0: Axis("batch")}]
    for s in layout:
        axes.append(
            {
                i: Axis("batch") if n == "batch" else Axis(n, min=0)
                for i, n in enumerate(s.shape)
                if isinstance(n, str)
            }
        )
    out_axes = [{0: "batch"}] + [{i: a.name for i, a in ax.items()} for ax in axes[1:]]
    # the wrapper holds the compiled model as ``model``: its blocks' module paths carry
    # that prefix (``model.blocks.3.fn.q``), the tags the quantizer reads come from them
    m2b = {f"{WRAPPED}.{k}": v for k, v in module_to_block(model).items()}
    ex = export_graph(
        wrapper,
        (tokens, *flat),
        input_names=["tokens"] + [s.input for s in layout],
        output_names=["logits"] + [s.output for s in layout],
        input_axes=axes,
        output_axes=out_axes,
        leading=1,
        exporter=exporter,
        opset=DEFAULT_OPSET,
        mod2block=m2b,
    )
    tag_by_weights(ex.proto, model)
    return ex.proto, ex.exporter, ex.failures


def tag_by_weights(proto: onnx.ModelProto, model: Any) -> int:
    """Tag the untagged nodes that read a weight of ``model`` with that weight's IR block,
    recognising the weight by its values (as stored or transposed). The TorchScript
    exporter names a decode graph's nodes after the innermost module only (``/q/MatMul``:
    a block's ``step`` is a method, not a module call) and its weights ``onnx::MatMul_N``,
    so neither says the block. A weight whose values two blocks share (both zero-filled)
    is left untagged. Returns the number of nodes tagged."""
    import hashlib

    from onnx import numpy_helper

    from exporters.onnx_export import module_to_block
    from exporters.quantize import BLOCK_KEY, node_block

    def key(a: np.ndarray) -> tuple[tuple[int, ...], str]:
        return a.shape, hashlib.sha1(np.ascontiguousarray(a).tobytes()).hexdigest()

    inits = {
        i.name: i
        for i in proto.graph.initializer
        if i.data_type == onnx.TensorProto.FLOAT and len(i.dims) == 2
    }
    todo = [
        n for n in proto.graph.node if node_block(n) is None and any(x in inits for x in n.input)
    ]
    if not todo:  # torch.export's scopes tagged every weight's reader
        return 0
    m2b = module_to_block(model)
    owner: dict[tuple[tuple[int, ...], str], str | None] = {}
    for name, p in model.named_parameters():
        block = next((b for k, b in m2b.items() if name.startswith(k + ".")), None)
        if block is None or p.dim() != 2:
            continue
        w = p.detach().float().numpy()
        for k in {key(w), key(w.T)}:
            owner[k] = block if owner.get(k, block) == block else None
    found: dict[str, str | None] = {}
    tagged = 0
    for n in todo:
        for x in n.input:
            if x not in inits:
                continue
            if x not in found:
                found[x] = owner.get(key(numpy_helper.to_array(inits[x])))
            if found[x] is not None:
                n.metadata_props.add(key=BLOCK_KEY, value=str(found[x]))
                tagged += 1
                break
    return tagged


def decode_metadata(spec: Any, layout: list[StateTensor], limit: int | None) -> dict[str, Any]:
    """The JSON stored under ``archir.decode``."""
    m = spec.model.model
    return {
        "format": 1,
        "tokens": {"input": "tokens", "dtype": "int64", "shape": ["batch", 1]},
        "logits": {"output": "logits", "dtype": "float32", "shape": ["batch", 1, m.vocab_size]},
        "vocab_size": m.vocab_size,
        "max_tokens": limit,
        "states": [asdict(s) for s in layout],
        "position": POSITION_NOTE,
    }


def decode_proto(
    spec: Any, model: Any, exporter: str = "auto", precision: str = "fp32"
) -> tuple[onnx.ModelProto, list[StateTensor], int | None, str, list[str]]:
    """The decode graph of ``model`` (in eval mode) with its metadata, its state layout and
    its token limit (``CompiledModel.seq_limit``), the exporter used and why any before it failed;
    no parity check. ``exporter``: ``auto`` (torch.export, falling back to TorchScript),
    ``dynamo`` or ``legacy``. ``precision``: one of :data:`DECODE_PRECISIONS`
    (:func:`ship_decode`; the block -> precision map is in ``archir.block_precision``).

    Raises:
        DecodeError: the model cannot decode; ExportError: ``torch.onnx.export`` or a
            quantizer failed, or an unsupported ``precision``.
    """
    check_precision(precision)
    layout = state_layout(model)  # raises DecodeError
    limit = model.seq_limit
    proto, used, failed = _export_proto(model, layout, exporter)
    _label(proto, spec, model, layout, limit, used, "fp32", None)
    if precision != "fp32":
        proto, _ = ship_decode(proto, spec, model, layout, limit, used, precision)
    return proto, layout, limit, used, failed


def ship_decode(
    proto: onnx.ModelProto,
    spec: Any,
    model: Any,
    layout: list[StateTensor],
    limit: int | None,
    exporter: str,
    precision: str,
) -> tuple[onnx.ModelProto, dict[str, str]]:
    """The fp32 decode graph ``proto`` (nodes tagged with their IR block) reduced to
    ``precision`` by the quantizers of the full-sequence export
    (:func:`exporters.graph.ship_precision`; ``auto``: int8 / int4 MatMul for 8- / 4-bit
    blocks, fp32 elsewhere), with ``archir.precision``, ``archir.block_precision`` and
    ``archir.decode`` written as in ``model.onnx``. ``proto`` itself is left as it is.
    Returns ``(model, IR block -> precision)``.

    Raises:
        ExportError: an unsupported ``precision``, or a quantizer failed.
    """
    from exporters.graph import ship_precision
    from exporters.onnx_export import block_bits
    from exporters.quantize import gemm_to_matmul

    check_precision(precision)
    src = onnx.ModelProto()
    src.CopyFrom(proto)  # the 4-bit quantizer rewrites the graph it is given
    if precision != "fp16":
        gemm_to_matmul(src)  # one token's Linear is a Gemm: the quantizers take MatMuls
    final, plan = ship_precision(src, block_bits(model), precision)
    _label(final, spec, model, layout, limit, exporter, precision, plan)
    return final, plan


def _label(
    proto: onnx.ModelProto,
    spec: Any,
    model: Any,
    layout: list[StateTensor],
    limit: int | None,
    exporter: str,
    precision: str,
    plan: dict[str, str] | None,
) -> None:
    """Write the archir metadata of a decode graph (those of ``model.onnx`` and
    ``archir.decode``; ``plan`` ``None``: every block fp32)."""
    from exporters.onnx_export import _set_metadata, block_bits

    if plan is None:
        plan = {b: "fp32" for b in block_bits(model)}
    _set_metadata(proto, spec, precision, exporter, plan)
    proto.metadata_props.add(
        key=DECODE_META, value=json.dumps(decode_metadata(spec, layout, limit))
    )
    for p in proto.metadata_props:
        if p.key == "archir.inputs":
            p.value = json.dumps(
                {
                    "tokens": "int64 [batch, 1] the next token of each sequence",
                    "logits": "float32 [batch, 1, vocab] next-token logits",
                    "states": "see archir.decode",
                }
            )


def export_decode(
    spec: Any,
    out_path: str | Path | None,
    *,
    model: Any = None,
    weights: str | Path | None = None,
    task: Any = None,
    check: bool = True,
    force: bool = False,
    check_only: bool = False,
    threads: int | None = 1,
    exporter: str = "auto",
    precision: str = "fp32",
) -> DecodeReport:
    """Export a causal language model's decode step to ONNX (module docstring).

    Args:
        spec: a concrete :class:`archir.Spec` of a causal language model.
        out_path: the ``.onnx`` file (``None`` with ``check_only``).
        model: a trained ``CompiledModel`` (default: compiled with seed 0, ``weights`` loaded).
        task: task (or name) whose text feeds the parity loop; default the spec's own,
            ``"random"`` for random tokens.
        check: run the parity gate; ``force``: write despite a failure.
        exporter: ``auto`` (torch.export, as the full-sequence export; TorchScript when it
            fails, with a note), ``dynamo`` or ``legacy``.
        precision: what the written graph holds, one of :data:`DECODE_PRECISIONS` — as
            ``export_onnx``: ``auto`` follows each block's ``bits`` (int8 / int4 MatMul
            for 8- / 4-bit blocks, fp32 elsewhere). The parity gate runs on the fp32
            graph; the written graph's deviation from PyTorch (max abs logit error, top-1
            agreement of the next-token predictions on the same tokens) is reported, not
            gated.

    Raises:
        DecodeError: the model cannot decode; ExportError: the export, a quantizer or the
            parity gate failed, or an unsupported ``precision`` (checked first);
            PathError: a bad ``out_path``.
    """
    import archir
    from exporters.onnx_export import _check_model, block_bits, load_weights, write_model

    t0 = time.perf_counter()
    check_precision(precision)
    if not check_only and out_path is not None:
        check_out_file(out_path)
    if model is None:
        model = archir.compile(spec, seed=0)
        if weights is not None:
            load_weights(model, weights)
    was_training = model.training
    model.eval()
    try:
        proto, layout, limit, used, failures = decode_proto(spec, model, exporter)
        notes = [f"{used} exporter after: {f}" for f in failures]
        report_parity = None
        inputs: list[torch.Tensor] = []
        source = "random"
        fp32_bytes = proto.ByteSize()
        if check:
            spec_model = spec.model
            the_task = par.resolve_task(spec_model, task)
            L = max(2, min(spec_model.train.seq_len, spec_model.model.max_seq_len, 48))
            if limit is not None:
                L = min(L, limit)
            inputs, source = par.parity_inputs(
                spec_model, the_task, shapes=[(1, L), (3, min(17, L))]
            )
            sess = par.make_session(proto.SerializeToString(), threads)
            report_parity = par.compare(OrtDecodeLoop(sess, layout), model, inputs, source=source)
        final, plan = proto, {}
        q_parity, top1 = None, None
        if precision != "fp32":
            final, plan = ship_decode(proto, spec, model, layout, limit, used, precision)
            low = [b for b, v in block_bits(model).items() if v < 4 and plan.get(b) == "int4"]
            if low:
                notes.append(
                    "bits below 4 have no onnxruntime kernel; stored at 4 bits: " + ", ".join(low)
                )
            _check_model(final, f"{precision} decode")
            if check:
                q_parity, top1 = deviation(final, layout, model, inputs, source, threads)
        data = final.SerializeToString()
        report = DecodeReport(
            path=None,
            spec_name=spec.model.name,
            states=layout,
            parity=report_parity,
            file_bytes=len(data),
            export_s=0.0,
            exporter=used,
            notes=notes,
            precision=precision,
            block_precision=plan,
            quantized_parity=q_parity,
            top1_agreement=top1,
            fp32_bytes=fp32_bytes,
        )
        failed = report_parity is not None and not report_parity.passed
        if failed and not force:
            assert report_parity is not None
            raise ExportError(
                "decode parity failed: onnxruntime's token-by-token logits differ from "
                f"PyTorch's by {report_parity.max_abs_err:.3g} (tolerance "
                f"{report_parity.tolerance:.3g}); first divergence: "
                f"{report_parity.first_divergence or report_parity.where}",
                hint="the step form of a block is wrong in the export; --force writes it anyway",
            )
        if not check_only and out_path is not None:
            report.path = write_model(out_path, final, data)
            report.written, report.forced = True, failed
        report.export_s = time.perf_counter() - t0
        return report
    finally:
        model.train(was_training)


def deviation(
    proto: onnx.ModelProto,
    layout: list[StateTensor],
    model: Any,
    inputs: list[torch.Tensor],
    source: str = "random",
    threads: int | None = 1,
) -> tuple[par.ParityReport, float]:
    """How far a (quantized) decode graph's token-by-token logits are from PyTorch's
    full forward on ``inputs`` (``[batch, T]`` token tensors): the ungated
    :class:`~exporters.parity.ParityReport` (max abs logit error) and the top-1 agreement
    (fraction of the ``batch × T`` positions whose argmax over the vocabulary is
    PyTorch's)."""
    loop = OrtDecodeLoop(par.make_session(proto.SerializeToString(), threads), layout)
    rep = par.compare(loop, model, inputs, source=source, gated=False)
    same = total = 0
    with torch.no_grad():
        for x, got in zip(inputs, loop.outputs):
            ref = model(x).float().numpy()
            same += int((ref.argmax(-1) == got.argmax(-1)).sum())
            total += int(ref.shape[0] * ref.shape[1])
    return rep, same / total if total else 1.0


def read_decode_metadata(proto_or_path: Any) -> dict[str, Any]:
    """The ``archir.decode`` JSON of a decode model (a path or a loaded proto).

    Raises:
        ExportError: the file is not an archir decode model.
    """
    proto = (
        proto_or_path
        if isinstance(proto_or_path, onnx.ModelProto)
        else onnx.load(str(proto_or_path), load_external_data=False)
    )
    for p in proto.metadata_props:
        if p.key == DECODE_META:
            return dict(json.loads(p.value))
    raise ExportError(
        "not an archir decode model (no archir.decode metadata)",
        hint="export one with `archir export SPEC_OR_RUN --decode --out step.onnx`",
    )


def ort_generate_loop(
    session: Any, meta: dict[str, Any], prompt: list[int], max_new: int, pick: Any
) -> Any:
    """Generate with an onnxruntime decode session and only its metadata: feed ``prompt``
    token by token, then ``max_new`` tokens chosen by ``pick(logits [vocab] float32 numpy)
    -> int``; yields each new token as it is chosen. Batch 1."""
    stepper = OrtStepper(session, [StateTensor(**st) for st in meta["states"]], 1)

    def feed(tok: int) -> np.ndarray:
        return np.asarray(stepper.feed(np.array([[tok]], dtype=np.int64))[0, -1], np.float32)

    logits = None
    for tok in prompt:
        logits = feed(tok)
    for i in range(max_new if logits is not None else 0):
        nxt = int(pick(logits))
        yield nxt
        if i + 1 < max_new:
            logits = feed(nxt)


# --------------------------------------------------------------------------- decode cost


def measure_decode(
    spec: Any,
    model: Any = None,
    *,
    runtime: str = "ort",
    context: int = 128,
    threads: int = 1,
    budget_s: float = 0.3,
    warmup: int = 3,
    min_runs: int = 10,
    max_runs: int = 200,
    prefill_runs: int = 2,
    exporter: str = "auto",
    precision: str = "auto",
) -> dict[str, Any]:
    """What generating costs, measured on the graph that ships (``ort``: the decode model
    :func:`export_decode` writes, at ``precision`` — by default ``auto``, each block's
    ``bits``, as a search's ``best/decode.onnx``; ``torch``: :meth:`CompiledModel.step`
    in float32, ``precision`` not used), batch 1.

    ``prefill_ms``: feeding a ``context``-token prompt token by token from zero states
    (what ``archir generate`` does; the fastest of ``prefill_runs`` runs). ``decode_ms_per_token``: one
    more token with ``context`` tokens of state (the KV cache of attention holds
    ``context`` entries, or ``window``), repeated from that same state
    (:func:`~exporters.latency.harness.measure`: the fastest call). ``state_bytes``:
    the bytes of every state tensor at that point (what a server keeps per sequence).
    ``precision`` / ``block_precision``: what was timed (``fp32`` and ``{}`` for torch).
    Times are in ms of :func:`~exporters.latency.harness.clock` (one thread: the calling
    thread's CPU time).

    Raises:
        DecodeError: the model cannot decode, or cannot reach ``context + 1`` tokens
            (``max_seq_len`` of learned positions, token_mlp, hyena).
        ExportError: the decode graph did not export or quantize (``ort``), or an
            unsupported ``precision``.
    """
    import archir
    from archir.errors import DecodeError
    from exporters.latency.harness import clock, measure, torch_threads

    if model is None:
        model = archir.compile(spec, seed=0)
    model.eval()
    limit = model.seq_limit
    if limit is not None and context + 1 > limit:
        raise DecodeError(
            f"decode cost at context {context} needs {context + 1} tokens, past max_seq_len "
            f"{limit} of this model (learned positions, token_mlp or hyena cannot go past it)",
            hint=f"set search.decode.context below {limit}",
        )
    gen = torch.Generator().manual_seed(0)
    vocab = max(1, spec.model.model.vocab_size)
    prompt = torch.randint(0, vocab, (context,), generator=gen).tolist()
    tok = torch.randint(0, vocab, (1,), generator=gen)
    check_precision(precision)
    timed, plan = "fp32", {}
    if runtime == "ort":
        proto, layout, *_ = decode_proto(spec, model, exporter, precision)
        meta = {p.key: p.value for p in proto.metadata_props}
        timed, plan = precision, json.loads(meta.get("archir.block_precision", "{}"))
        sess = par.make_session(proto.SerializeToString(), threads)

        def prefill() -> tuple[Callable[[], Any], int]:
            """Feed the prompt; one more token from there, and the state's bytes."""
            stepper = OrtStepper(sess, layout, 1)
            for t in prompt:
                stepper.feed(np.array([[t]], dtype=np.int64))
            feeds = {"tokens": tok.numpy()[None, :], **stepper.states}
            return (lambda: sess.run(None, feeds)), sum(
                int(v.nbytes) for v in stepper.states.values()
            )

        fixed: Any = contextlib.nullcontext()
    elif runtime == "torch":

        def prefill() -> tuple[Callable[[], Any], int]:
            state = model.init_state(1)
            for t in prompt:
                _, state = model.step(torch.tensor([t]), state)
            return (lambda: model.step(tok, state)), sum(
                int(t.numel() * t.element_size()) for s in state for t in s
            )

        fixed = torch_threads(threads)
    else:
        raise ExportError(f"unknown runtime '{runtime}'", hint="ort or torch")
    with fixed, torch.no_grad():
        best_prefill = math.inf
        timer = clock(threads)  # one thread: the calling thread's CPU time
        for _ in range(max(1, prefill_runs)):
            t0 = timer()
            one, nbytes = prefill()
            best_prefill = min(best_prefill, timer() - t0)
        m = measure(
            one,
            warmup=warmup,
            min_runs=min_runs,
            max_runs=max_runs,
            budget_s=budget_s,
            max_attempts=1,
            timer=timer,
        )
    return {
        "decode_ms_per_token": m.min_ms,
        "prefill_ms": best_prefill * 1e3,
        "state_bytes": nbytes,
        "context": context,
        "runtime": runtime,
        "precision": timed,
        "block_precision": plan,
        "threads": threads,
        "median_ms": m.median_ms,
        "cv": m.cv,
        "runs": m.runs,
        "noisy": m.noisy,
    }
