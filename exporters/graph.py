"""The one export path: every ONNX graph archir runs or ships is made by :func:`export_graph`.

Who calls it:

* :func:`exporters.export_onnx` — the full-sequence model file a user ships
  (``tokens [batch, seq] -> logits``), then reduced to its precision by
  :mod:`exporters.quantize`;
* :func:`exporters.decode.export_decode` — the decode step (one token plus the state tensors);
* :mod:`exporters.latency` — the whole model a search or ``archir latency`` measures
  (:class:`~exporters.latency.harness.Runner`, through :func:`model_graph`, at the precision
  the spec's ``bits`` select, exactly as ``export_onnx(..., precision="auto")`` writes it)
  and the parts the calibration measures (one residual block, or the embedding and head,
  through :func:`part_graph`, at that part's precision).

So what is timed is what ships: the same exporter (``torch.onnx.export(..., dynamo=True)``,
the torch.export/onnxscript path, opset :data:`DEFAULT_OPSET`, the TorchScript exporter only
as the fallback a failed dynamo export falls back to under ``exporter="auto"``, with a
note), the same dynamic axes, the same clean-up (block tags, folded constant weights) and
the same quantizers. Only the parity gate and the metadata are the shipping path's own.

Speed. A torch.export-based export spends most of a small model's time rebuilding
onnxscript's table of ATen functions (parsing the source of ~500 functions on every call);
the table is a pure function of the installed onnxscript, so :func:`_memoize_torchlib` keeps
it for the process (one block: ~4 s -> ~1 s per export).
"""

from __future__ import annotations

import contextlib
import functools
import io
import logging
import os
import sys
import tempfile
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import onnx
import torch

from archir.errors import ExportError

DEFAULT_OPSET = 20
# the legacy (TorchScript) exporter caps its opset at 18
LEGACY_MAX_OPSET = 18


@dataclass(frozen=True)
class Axis:
    """A dynamic axis of a graph input: its symbolic name and bounds (inclusive). Inputs
    sharing a name share the dimension (e.g. ``batch``)."""

    name: str
    min: int = 1
    max: int | None = None


@dataclass
class Exported:
    """What :func:`export_graph` produced.

    Attributes:
        proto: the fp32 ONNX model (tagged, constant weights folded).
        exporter: ``dynamo`` or ``legacy`` — which exporter made it.
        failures: one line per exporter that failed before it (empty normally).
    """

    proto: onnx.ModelProto
    exporter: str
    failures: list[str] = field(default_factory=list)


@functools.lru_cache(maxsize=1)
def _memoize_torchlib() -> bool:
    """Keep onnxscript's list of torchlib functions for the process (module docstring).
    Returns whether it could; nothing changes in what is exported either way."""
    try:
        from torch.onnx._internal._lazy_import import onnxscript_apis

        mod = sys.modules.get(onnxscript_apis.__name__) or onnxscript_apis
        fn = getattr(mod, "get_torchlib_ops", None)
        if fn is None or getattr(fn, "_archir_cached", False):
            return fn is not None
        cached = functools.lru_cache(maxsize=1)(fn)
        cached._archir_cached = True  # type: ignore[attr-defined]
        mod.get_torchlib_ops = cached  # type: ignore[attr-defined]
        return True
    except Exception:  # noqa: BLE001 - private API of another project: an optimisation only
        return False


@contextlib.contextmanager
def captured_stderr() -> Iterator[Any]:
    """Capture everything written to stderr for the duration: file descriptor 2 (C++
    warnings), ``sys.stderr`` and the stream handlers of torch's loggers (which keep the
    stream they were created with; a failed torch.export logs whole FX graphs there).
    Yields a function returning the captured text."""
    py = io.StringIO()
    handlers = [
        h
        for name, lg in logging.root.manager.loggerDict.items()
        if name.startswith("torch") and isinstance(lg, logging.Logger)
        for h in lg.handlers
        if type(h) is logging.StreamHandler
    ]
    handlers += [h for h in logging.root.handlers if type(h) is logging.StreamHandler]
    streams = [h.setStream(py) for h in handlers]  # type: ignore[arg-type]
    try:
        saved: int | None = os.dup(2)
        sys.stderr.flush()
    except (AttributeError, OSError, ValueError, io.UnsupportedOperation):
        saved = None
    with tempfile.TemporaryFile(mode="w+b") as tmp, contextlib.redirect_stderr(py):
        if saved is not None:
            os.dup2(tmp.fileno(), 2)

        def text() -> str:
            tmp.seek(0)
            return tmp.read().decode("utf-8", "replace") + py.getvalue()

        try:
            yield text
        finally:
            if saved is not None:
                os.dup2(saved, 2)
                os.close(saved)
            for h, st in zip(handlers, streams):
                if st is not None:
                    h.setStream(st)


def _chain(exc: BaseException) -> list[BaseException]:
    """``exc`` and what it wraps (``__cause__`` or ``__context__``), outermost first, at
    most 16."""
    seen: list[BaseException] = [exc]
    cur: BaseException | None = exc
    while cur is not None and len(seen) < 16:
        cur = cur.__cause__ or cur.__context__
        if cur is not None and all(cur is not e for e in seen):
            seen.append(cur)
        else:
            break
    return seen


def failure_reason(exc: BaseException) -> str:
    """One line naming why an exporter failed: the innermost cause's type and first line
    (torch.onnx wraps the torch.export error in a generic 'Failed to export' message)."""
    inner = _chain(exc)[-1]
    lines = [ln.strip() for ln in str(inner).strip().splitlines() if ln.strip()]
    text = lines[0] if lines else ""
    for ln in lines:  # a data-dependent branch or a violated shape constraint says more
        if "data-dependent" in ln.lower() or "Not all values" in ln:
            text = ln
            break
    return f"{type(inner).__name__}: {text}"[:300]


def _scope_of(node: onnx.NodeProto) -> str | None:
    import json

    for p in node.metadata_props:
        if p.key == "pkg.torch.onnx.name_scopes":
            try:
                scopes = json.loads(p.value.replace("'", '"'))
            except ValueError:
                return None
            return scopes[1] if len(scopes) > 1 else None
    return None


def _owner(path: str | None, m2b: Mapping[str, str]) -> str | None:
    """The block of the longest key of ``m2b`` that is ``path`` or a dotted prefix of it
    (``model.blocks.3.fn.q`` -> the block of ``model.blocks.3``), else ``None``."""
    while path:
        if path in m2b:
            return m2b[path]
        path = path.rpartition(".")[0]
    return None


def tag_and_strip(
    proto: onnx.ModelProto, mod2block: Mapping[str, str] | None = None, every: str | None = None
) -> None:
    """Tag every node with its IR block (``archir.block``: from the module path it came from,
    through ``mod2block`` — the path itself or its longest dotted prefix among the keys, so
    a wrapper's paths such as the decode module's ``model.blocks.3.fn.q`` find
    ``model.blocks.3``; a node outside any module call takes the block owning a weight it
    reads, by the weight's name; or ``every`` for all of them — a part graph; the nodes of an
    ``If`` branch take the ``If``'s), drop torch's bulky per-node metadata (stack traces hold
    local paths), subgraphs included, and name unnamed nodes."""
    from exporters.quantize import BLOCK_KEY, subgraph_nodes

    m2b = mod2block or {}
    inits = {t.name for t in proto.graph.initializer} if m2b else set()
    for i, n in enumerate(proto.graph.node):
        scope = _scope_of(n)
        legacy = None
        if scope is None and n.name:
            # legacy exporter: node names like /blocks.0/fn/q/MatMul
            parts = n.name.strip("/").split("/")
            legacy = ".".join(parts[:-1])
            scope = parts[0] if parts and parts[0] in m2b else None
            if scope is None and len(parts) > 1 and parts[0] == "blocks":
                scope = f"blocks.{parts[1]}" if parts[1].isdigit() else None
        block = every or m2b.get(scope or "") or _owner(scope or legacy, m2b)
        if block is None and inits:
            # a weight used outside any module call (a block's step reading its own
            # parameter, the embedding's step): the parameter's name says whose it is
            block = next((b for w in n.input if w in inits if (b := _owner(w, m2b))), None)
        for j, m in enumerate([n, *subgraph_nodes(n)]):
            # an If branch's nodes (Hyena's convolution, the chunked attention) belong to
            # the If's block and carry torch's stack traces too (local paths, ~9 % of a
            # Hyena file)
            del m.metadata_props[:]
            if block:
                m.metadata_props.add(key=BLOCK_KEY, value=block)
            if not m.name:
                m.name = f"{m.op_type}_{i}" if j == 0 else f"{n.name}/{m.op_type}_{j}"


def _legacy_axes(
    names: Sequence[str], axes: Sequence[Mapping[int, Axis | str]]
) -> dict[str, dict[int, str]]:
    out: dict[str, dict[int, str]] = {}
    for name, ax in zip(names, axes):
        if ax:
            out[name] = {i: a.name if isinstance(a, Axis) else a for i, a in ax.items()}
    return out


def _fix_dim_names(
    values: Sequence[Any], axes: Sequence[Mapping[int, Axis | str]]
) -> dict[str, int]:
    """Give the dynamic axes their names on inputs/outputs; returns the declared dynamic
    axes that the exporter made constant (``{name: value}``)."""
    fixed: dict[str, int] = {}
    for v, ax in zip(values, axes):
        dims = v.type.tensor_type.shape.dim
        for i, a in ax.items():
            name = a.name if isinstance(a, Axis) else a
            if i >= len(dims):
                continue
            if dims[i].HasField("dim_value"):
                fixed.setdefault(name, dims[i].dim_value)
            else:
                dims[i].dim_param = name
    return fixed


def _torch_dims(in_axes: Sequence[Mapping[int, Axis]]) -> list[dict[int, Any]]:
    """torch.export ``Dim`` objects per input; one ``Dim`` per axis name."""
    dims: dict[str, Any] = {}
    out: list[dict[int, Any]] = []
    for ax in in_axes:
        d: dict[int, Any] = {}
        for i, a in ax.items():
            if a.name not in dims:
                dims[a.name] = torch.export.Dim(a.name, min=a.min, max=a.max)
            d[i] = dims[a.name]
        out.append(d)
    return out


def export_graph(
    module: torch.nn.Module,
    args: Sequence[torch.Tensor],
    *,
    input_names: Sequence[str],
    output_names: Sequence[str],
    input_axes: Sequence[Mapping[int, Axis]] = (),
    output_axes: Sequence[Mapping[int, str]] = (),
    leading: int | None = None,
    exporter: str = "auto",
    opset: int = DEFAULT_OPSET,
    mod2block: Mapping[str, str] | None = None,
    tag: str | None = None,
    fold: bool = True,
) -> Exported:
    """Export ``module(*args)`` to ONNX — the one ``torch.onnx.export`` call of archir.

    Args:
        module: the module, in eval mode (its forward is run under ``torch.no_grad``).
        args: example tensors, one per graph input. Sizes on dynamic axes must be neither
            0 nor 1 (torch.export specializes those) unless the axis's ``min`` is 0.
        input_names, output_names: graph input/output names, in order.
        input_axes: per input, ``{axis: Axis}`` of its dynamic axes (missing or empty:
            static). ``output_axes``: per output, ``{axis: name}`` (named on the graph; the
            legacy exporter needs them).
        leading: with a forward ``f(a, b, *rest)``, the number of named positional inputs
            (here 2); the rest are passed as one tuple (``None``: every input is named).
        exporter: ``dynamo`` (torch.export), ``legacy`` (TorchScript, deprecated) or
            ``auto`` (dynamo, then legacy).
        opset: ONNX opset (the legacy exporter caps it at 18).
        mod2block / tag: tag nodes with their IR block (:func:`tag_and_strip`).
        fold: fold weight ``Gather``/``Transpose`` into initializers
            (:func:`exporters.onnx_export.fold_constant_weights`) so the quantizers see
            plain MatMul weights.

    Returns:
        :class:`Exported` (the fp32 proto, the exporter used, why any before it failed).

    Raises:
        ExportError: every exporter failed (each one's reason in the message), or a dynamic
            axis was specialized to the example's size.
    """
    if exporter not in ("auto", "dynamo", "legacy"):
        raise ExportError(f"unknown exporter '{exporter}'", hint="dynamo, legacy or auto")
    _memoize_torchlib()
    from archir.blocks.attention import chunked_causal_attention
    from exporters import causal_attention
    from exporters.onnx_export import fold_constant_weights

    args = tuple(args)
    in_axes = list(input_axes) + [{}] * (len(args) - len(input_axes))
    errors: list[str] = []
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    for which in ["dynamo", "legacy"] if exporter == "auto" else [exporter]:
        try:
            with (
                contextlib.redirect_stdout(io.StringIO()),
                captured_stderr(),
                warnings.catch_warnings(),
                torch.no_grad(),
                # the chunked causal attention, which only this exporter can write
                chunked_causal_attention() if which == "dynamo" else contextlib.nullcontext(),
            ):
                warnings.simplefilter("ignore")
                if which == "dynamo":
                    per = _torch_dims(in_axes)
                    shapes: tuple[Any, ...] = tuple(per)
                    if leading is not None:
                        shapes = (*per[:leading], tuple(per[leading:]))
                    prog = torch.onnx.export(
                        module,
                        args,
                        None,
                        dynamo=True,
                        opset_version=opset,
                        input_names=list(input_names),
                        output_names=list(output_names),
                        dynamic_shapes=shapes,
                        optimize=True,
                        verbose=False,
                        custom_translation_table=causal_attention.translations(),
                    )
                    assert prog is not None
                    proto = prog.model_proto
                    causal_attention.expand(proto)
                else:
                    f = io.BytesIO()
                    torch.onnx.export(
                        module,
                        args,
                        f,
                        dynamo=False,
                        opset_version=min(opset, LEGACY_MAX_OPSET),
                        input_names=list(input_names),
                        output_names=list(output_names),
                        dynamic_axes=_legacy_axes(input_names, in_axes)
                        | _legacy_axes(output_names, list(output_axes)),
                    )
                    proto = onnx.load_from_string(f.getvalue())
            fixed = _fix_dim_names(proto.graph.input, in_axes)
            _fix_dim_names(proto.graph.output, list(output_axes))
            if fixed:
                raise ExportError(
                    "torch.export specialized the dynamic axes "
                    + ", ".join(f"{n}={v}" for n, v in fixed.items())
                    + " to the example input (a shape computation in forward() that "
                    "torch.export cannot prove for every length, e.g. padding to a chunk "
                    "multiple then reshaping by a computed count)"
                )
            tag_and_strip(proto, mod2block, tag)
            if fold:
                fold_constant_weights(proto)
            return Exported(proto, which, errors)
        except Exception as exc:  # noqa: BLE001 - exporter internals
            if (limit := _time_limit_in(exc)) is not None:
                # a time limit (the calibration's budget) stops the export: no fallback
                # (the legacy exporter ran on past the budget and printed its whole graph)
                raise limit from None
            errors.append(f"{which}: {failure_reason(exc)}")
    raise ExportError(
        "torch.onnx.export failed: " + " | ".join(errors),
        hint="a block's forward may use data-dependent shapes or a Python loop over time; "
        "the message names the operation",
    )


def _time_limit_in(exc: BaseException) -> TimeoutError | None:
    """The :class:`TimeoutError` (``exporters.latency.harness.time_limit``) that ``exc`` is
    or wraps (the exporters re-raise what they catch as their own errors), if any."""
    return next((e for e in _chain(exc) if isinstance(e, TimeoutError)), None)


def model_io(spec_model: Any) -> tuple[str, str, dict[int, Axis], dict[int, str]]:
    """``(input name, output name, input axes, output axes)`` of a spec's full-sequence
    graph: ``tokens [batch, seq] -> logits`` (images: ``images [batch, C, H, W]``)."""
    m = spec_model.model
    batch = Axis("batch")
    if m.task == "image_classification":
        return "images", "logits", {0: batch}, {0: "batch"}
    seq = Axis("seq", 1, m.max_seq_len)
    if m.task == "causal_lm":
        return "tokens", "logits", {0: batch, 1: seq}, {0: "batch", 1: "seq"}
    return "tokens", "logits", {0: batch, 1: seq}, {0: "batch"}


def model_graph(
    spec_model: Any,
    model: Any,
    example: torch.Tensor,
    *,
    exporter: str = "auto",
    opset: int = DEFAULT_OPSET,
) -> Exported:
    """The full-sequence graph of a compiled model (in eval mode; ``spec_model``: its
    spec's ``.model`` section) on ``example`` inputs (sizes 2+ on the dynamic axes), with
    dynamic ``batch`` and ``seq``, every node tagged with its IR block — what ``export_onnx`` ships, before
    metadata and precision.

    Raises:
        ExportError: the export failed.
    """
    from exporters.onnx_export import module_to_block

    in_name, out_name, in_axes, out_axes = model_io(spec_model)
    return export_graph(
        model,
        (example,),
        input_names=[in_name],
        output_names=[out_name],
        input_axes=[in_axes],
        output_axes=[out_axes],
        exporter=exporter,
        opset=opset,
        mod2block=module_to_block(model),
    )


def ship_precision(
    proto: onnx.ModelProto, bits: Mapping[str, float], precision: str = "auto"
) -> tuple[onnx.ModelProto, dict[str, str]]:
    """Reduce an fp32 graph to the precision that ships (``auto``: each block's ``bits``,
    :func:`exporters.quantize.plan_precision`). Returns ``(model, block -> precision)``.

    Raises:
        ExportError: a quantizer failed.
    """
    from exporters import quantize as qz

    return qz.quantize(proto, precision, dict(bits))


def part_graph(
    module: torch.nn.Module,
    example: torch.Tensor,
    *,
    bits: float = 16.0,
    max_seq: int | None = None,
    exporter: str = "auto",
) -> tuple[Exported, str]:
    """One part of a model alone — a residual block on ``[batch, seq, d_model]`` floats, or
    the embedding/head on ``[batch, seq]`` tokens, or any module of one input — exported
    like the shipped file (dynamic ``batch`` and ``seq``) and reduced to the precision its
    ``bits`` select. Returns ``(exported, precision label)``.

    Raises:
        ExportError: the export or the quantizer failed.
    """
    # an axis of size 1 in the example cannot be dynamic (torch.export specializes it): a
    # part measured at batch 1 is exported at batch 1, any length
    axes: dict[int, Axis] = {}
    if example.shape[0] >= 2:
        axes[0] = Axis("batch")
    if example.dim() >= 2 and example.shape[1] >= 2:
        axes[1] = Axis("seq", 1, max_seq)
    ex = export_graph(
        module,
        (example,),
        input_names=["input"],
        output_names=["output"],
        input_axes=[axes],
        output_axes=[{i: a.name for i, a in axes.items()}],
        exporter=exporter,
        tag="part",
    )
    proto, plan = ship_precision(ex.proto, {"part": bits})
    ex.proto = proto
    return ex, plan.get("part", "fp32")
