"""Parity between an exported ONNX file and the PyTorch model it came from.

The gate runs onnxruntime and PyTorch on the same *real* inputs — batches of the spec's task
when the task can feed this model, otherwise random tokens (language models) or random
images — at several batch sizes and sequence lengths, including ones the exporter never saw,
and reports the largest absolute difference and the first position beyond tolerance.

Tolerance (fp32): ``max |onnx - torch| <= rtol · max(1, max |torch|)`` with ``rtol = 1e-4``:
an absolute error relative to the output's scale.

Sequence length. A full-sequence graph is exported (``seq`` axis bounded by the spec's
``max_seq_len``) and parity-checked for ``seq <= max_seq_len`` only. archir's own
onnxruntime paths (:func:`compare`, :class:`OrtModule`, :func:`run_session`) refuse a longer
input with an :class:`~archir.errors.ExportError` naming the input, its length and
``max_seq_len`` (:func:`check_seq_len`). A plain onnxruntime user gets no such check: a model
with learned positions fails inside the graph with onnxruntime's ``Attempting to broadcast an
axis by a dimension other than 1. <max_seq_len> by <seq>`` (an ``Add`` node), and models
without a hard limit (RoPE, Mamba ...) run past it, outside what the parity gate covered. The
limit is in the file's metadata for them to check: ``archir.max_seq_len`` (when the exporter
wrote it) and always the input description ``archir.inputs`` / the input's ``doc_string``
(``seq <= N (max_seq_len)``), read with
``session.get_modelmeta().custom_metadata_map``.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch

FP32_RTOL = 1e-4


@dataclass
class ParityReport:
    """Outcome of comparing onnxruntime with PyTorch.

    Attributes:
        max_abs_err: largest ``|onnx - torch|`` over every input and output element.
        where: ``"output 'logits' input #2 [3, 64] at index (1, 40, 7)"`` for that maximum.
        first_divergence: the first (in input order, then C order) element beyond tolerance,
            ``None`` when none is.
        tolerance: the absolute tolerance used (``rtol · scale``).
        scale: ``max(1, max |torch output|)`` over the inputs.
        passed: ``max_abs_err <= tolerance`` and every output is finite.
        gated: whether a failure refuses the export (fp32), or is only reported (quantized).
        shapes: the input shapes checked.
        source: ``"task:<name>"`` or ``"random"`` — where the inputs came from.
    """

    max_abs_err: float
    where: str
    tolerance: float
    scale: float
    passed: bool
    gated: bool = True
    first_divergence: str | None = None
    shapes: list[list[int]] = field(default_factory=list)
    source: str = "random"
    rtol: float = FP32_RTOL

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> str:
        verdict = "ok" if self.passed else ("FAILED" if self.gated else "beyond fp32 tolerance")
        return (
            f"{verdict}: max |Δ| {self.max_abs_err:.3g} (tolerance {self.tolerance:.3g}) "
            f"at {self.where}; {len(self.shapes)} input(s) from {self.source}"
        )


def make_session(model: str | bytes, threads: int | None = 1) -> Any:
    """An onnxruntime CPU ``InferenceSession`` for a file path or serialized model bytes."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    if threads:
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
    so.log_severity_level = 3
    return ort.InferenceSession(model, so, providers=["CPUExecutionProvider"])


#: metadata key holding the spec's ``max_seq_len`` (written by the exporter; older files
#: carry it only in ``archir.inputs``)
MAX_SEQ_LEN_KEY = "archir.max_seq_len"
_SEQ_DESC = re.compile(r"seq <= (\d+) \(max_seq_len\)")


def max_seq_len_of(meta: Mapping[str, str]) -> int | None:
    """The longest ``seq`` an exported full-sequence graph takes, from its metadata
    (``custom_metadata_map`` / ``metadata_props``): ``archir.max_seq_len``, else the
    ``seq <= N (max_seq_len)`` of the input description in ``archir.inputs``; ``None`` when
    neither says (image models, files archir did not write)."""
    value = meta.get(MAX_SEQ_LEN_KEY)
    if value is not None and value.strip().isdigit():
        return int(value)
    try:
        descs = json.loads(meta.get("archir.inputs", "{}"))
    except ValueError:
        return None
    for text in descs.values() if isinstance(descs, dict) else ():
        m = _SEQ_DESC.search(str(text))
        if m:
            return int(m.group(1))
    return None


def _session_limit(session: Any) -> tuple[str, int | None, str]:
    """``(input name, max_seq_len or None, model name)`` of a session whose first input has
    a symbolic ``seq`` axis (dimension 1); ``None`` limit for any other graph (images, the
    one-token decode graph, or an object that only looks like a session, such as
    :class:`exporters.decode.OrtDecodeLoop`, which has no model metadata)."""
    inp = session.get_inputs()[0]
    shape = list(getattr(inp, "shape", []) or [])
    modelmeta = getattr(session, "get_modelmeta", None)
    meta = dict(modelmeta().custom_metadata_map) if modelmeta is not None else {}
    name = meta.get("archir.spec_name", "the model")
    if len(shape) < 2 or shape[1] != "seq":
        return inp.name, None, name
    return inp.name, max_seq_len_of(meta), name


def check_seq_len(
    length: int, limit: int | None, input_name: str = "tokens", model: str = "the model"
) -> None:
    """Refuse a sequence longer than the exported graph's ``max_seq_len``.

    Raises:
        ExportError: ``length > limit``; the message names the input, its length,
            ``max_seq_len`` and the model.
    """
    if limit is None or length <= limit:
        return
    from archir.errors import ExportError

    raise ExportError(
        f"input '{input_name}' has {length} positions, past max_seq_len {limit} of "
        f"'{model}' (the ONNX graph is exported and parity-checked for seq <= max_seq_len; "
        f"the limit is in its metadata, '{MAX_SEQ_LEN_KEY}' / 'archir.inputs')",
        hint=f"feed at most {limit} tokens (e.g. a sliding window), or export a spec with a "
        "larger max_seq_len",
    )


def run_session(session: Any, x: np.ndarray | torch.Tensor) -> list[np.ndarray]:
    """``session.run`` on one input ``x`` (tokens ``[batch, seq]`` or images), after
    :func:`check_seq_len` against the graph's ``max_seq_len``; returns every output.

    Raises:
        ExportError: ``seq`` is past ``max_seq_len``.
    """
    name, limit, model = _session_limit(session)
    arr = x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
    if arr.ndim >= 2:
        check_seq_len(int(arr.shape[1]), limit, name, model)
    return list(session.run(None, {name: arr}))


class OrtModule(torch.nn.Module):
    """Wrap an onnxruntime session as a PyTorch module (``forward(x) -> torch.Tensor``), so
    that a task's ``evaluate`` can score the exported file exactly as it scores the model.

    Raises (``forward``): ExportError for a ``seq`` past the graph's ``max_seq_len``.
    """

    def __init__(self, session: Any) -> None:
        super().__init__()
        self.session = session
        self.input_name, self.max_seq_len, self._model = _session_limit(session)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() >= 2:
            check_seq_len(int(x.shape[1]), self.max_seq_len, self.input_name, self._model)
        out = self.session.run(None, {self.input_name: x.detach().cpu().numpy()})[0]
        return torch.from_numpy(np.asarray(out, dtype=np.float32))


def is_image_model(spec_model: Any) -> bool:
    return spec_model.model.task == "image_classification"


def random_input(spec_model: Any, batch: int, seq: int, gen: torch.Generator) -> torch.Tensor:
    """A random model input: tokens ``[batch, seq]`` int64, or images ``[batch, C, H, W]``."""
    m = spec_model.model
    if is_image_model(spec_model):
        return torch.randn(batch, m.channels, m.image_size, m.image_size, generator=gen)
    return torch.randint(0, max(m.vocab_size, 1), (batch, seq), generator=gen)


def resolve_task(spec_model: Any, task: Any) -> Any:
    """The task whose data feeds parity/calibration, or ``None`` for random inputs.

    ``task`` may be a Task, a task name, ``"random"`` (force random inputs) or ``None``
    (the spec's ``train.task``). When the spec's own task cannot feed this model (wrong
    model kind, missing data) the gate falls back to random inputs; a task the caller named
    must work.

    Raises:
        TaskError: a named task is unknown, or cannot feed this model (wrong model kind,
            data that cannot be loaded).
    """
    from archir.errors import ArchirError, TaskError
    from archir.tasks import get_task

    if task == "random" or task is False:
        return None
    if task is None:
        try:
            the_task = get_task(spec_model.train.task, spec_model.train.task_options)
            the_task.check_model(spec_model.model)
        except (ArchirError, ValueError, OSError):
            return None
        return the_task
    try:
        the_task = get_task(task) if isinstance(task, str) else task
        the_task.check_model(spec_model.model)
    except ArchirError:
        raise
    except (ValueError, OSError) as exc:
        raise TaskError(
            f"task '{task}' cannot feed this model: {exc}",
            hint="name another task, or --task random for random inputs",
        ) from None
    return the_task


#: the longest input the gate feeds (positions): past every length at which an archir graph
#: switches forms (Hyena's last DFT form starts past 1,024), short enough that a long-context
#: attention model's ``[heads, T, T]`` scores stay small (8 heads: 134 MB at 2,048)
PARITY_LONG_MAX = 2048


def parity_inputs(
    spec_model: Any, task: Any, seed: int = 0, shapes: Sequence[tuple[int, int]] | None = None
) -> tuple[list[torch.Tensor], str]:
    """Inputs for the gate: ``(inputs, source)``.

    Token models get ``[batch, seq]`` for ``shapes`` (default ``(1, 1), (3, 17), (2, L)``
    with ``L = min(train.seq_len, max_seq_len)``, and ``(1, min(max_seq_len,``
    :data:`PARITY_LONG_MAX` ``))`` when that is longer: a graph may switch forms with the
    length, e.g. Hyena's long convolution); image models get batches 1 and 3. Each shape
    comes from ``task`` where the task can feed it, else random (``source`` says which:
    ``task:NAME``, ``random`` or ``task:NAME + random``).
    """
    m = spec_model.model
    image = is_image_model(spec_model)
    L = max(2, min(spec_model.train.seq_len, m.max_seq_len))
    if shapes is None:
        shapes = [(1, 1), (3, min(17, m.max_seq_len)), (2, L)]
        if min(m.max_seq_len, PARITY_LONG_MAX) > L:
            shapes.append((1, min(m.max_seq_len, PARITY_LONG_MAX)))
        if image:
            shapes = [(1, 0), (3, 0)]
    gen = torch.Generator().manual_seed(seed)
    out: list[torch.Tensor] = []
    fed = 0
    for b, t in shapes:
        x = None
        if task is not None:
            try:
                x = task.train_batch(b, max(t, 1), gen)[0]
                if not image:
                    x = x[:, : max(t, 1)]
                fed += 1
            except Exception:  # noqa: BLE001 - data too short for a shape etc.: random
                x = None
        out.append(x if x is not None else random_input(spec_model, b, max(t, 1), gen))
    name = f"task:{task.name}" if task is not None else ""
    source = "random" if not fed else name if fed == len(shapes) else f"{name} + random"
    return out, source


def _fmt_index(idx: tuple[int, ...]) -> str:
    return "(" + ", ".join(str(i) for i in idx) + ")"


def compare(
    session: Any,
    model: torch.nn.Module,
    inputs: Sequence[torch.Tensor],
    *,
    rtol: float = FP32_RTOL,
    gated: bool = True,
    source: str = "random",
    output_names: Sequence[str] | None = None,
) -> ParityReport:
    """Run ``session`` and ``model`` on every input and compare all outputs.

    Returns a :class:`ParityReport`; the caller decides whether a failure refuses.

    Raises:
        ExportError: an input's ``seq`` is past the graph's ``max_seq_len`` (checked for
            every input before anything runs).
    """
    names = list(output_names or [o.name for o in session.get_outputs()])
    in_name, limit, model_name = _session_limit(session)
    for x in inputs:
        if x.dim() >= 2:
            check_seq_len(int(x.shape[1]), limit, in_name, model_name)
    refs: list[list[np.ndarray]] = []
    outs: list[list[np.ndarray]] = []
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for x in inputs:
                r = model(x)
                rs = list(r) if isinstance(r, tuple | list) else [r]
                refs.append([t.detach().float().numpy() for t in rs])
                o = session.run(None, {in_name: x.numpy()})
                outs.append([np.asarray(a, dtype=np.float32) for a in o])
    finally:
        model.train(was_training)
    scale = 1.0
    for rs in refs:
        for r in rs:
            if r.size:
                scale = max(scale, float(np.abs(r).max()))
    tol = rtol * scale
    best, where, first = -1.0, "no output", None
    finite = True
    for i, (x, rs, os_) in enumerate(zip(inputs, refs, outs)):
        for j, (r, o) in enumerate(zip(rs, os_)):
            name = names[j] if j < len(names) else f"#{j}"
            label = f"output '{name}' input #{i} {list(x.shape)}"
            if r.shape != o.shape:
                return ParityReport(
                    math.inf,
                    f"{label}: shape {list(o.shape)} != torch {list(r.shape)}",
                    tol,
                    scale,
                    False,
                    gated,
                    f"{label}: shape {list(o.shape)} != torch {list(r.shape)}",
                    [list(t.shape) for t in inputs],
                    source,
                    rtol,
                )
            if not r.size:
                continue
            diff = np.abs(o.astype(np.float64) - r.astype(np.float64))
            bad_nan = ~np.isfinite(o) & np.isfinite(r)
            if bad_nan.any():
                finite = False
                diff = np.where(bad_nan, np.inf, diff)
            diff = np.nan_to_num(diff, nan=0.0)
            k = int(diff.argmax())
            m = float(diff.flat[k])
            if m > best:
                best = m
                where = f"{label} at index {_fmt_index(np.unravel_index(k, diff.shape))}"
            if first is None:
                over = np.flatnonzero(diff.reshape(-1) > tol)
                if over.size:
                    idx = np.unravel_index(int(over[0]), diff.shape)
                    first = (
                        f"{label} at index {_fmt_index(idx)}"
                        + (f" (batch {idx[0]}, position {idx[1]})" if len(idx) >= 3 else "")
                        + f": onnx {float(o[idx]):.6g} vs torch {float(r[idx]):.6g}"
                    )
    best = max(best, 0.0)
    return ParityReport(
        best,
        where,
        tol,
        scale,
        finite and best <= tol,
        gated,
        first,
        [list(t.shape) for t in inputs],
        source,
        rtol,
    )


class TaskCalibrationReader:
    """``onnxruntime.quantization.CalibrationDataReader`` over task batches (or random
    inputs): yields ``{input_name: array}`` dicts, ``n`` of them."""

    def __init__(self, input_name: str, batches: Sequence[torch.Tensor]) -> None:
        self.input_name = input_name
        self._batches = list(batches)
        self._it: Iterator[torch.Tensor] = iter(self._batches)

    def get_next(self) -> dict[str, np.ndarray] | None:
        x = next(self._it, None)
        return None if x is None else {self.input_name: x.numpy()}

    def rewind(self) -> None:
        self._it = iter(self._batches)


def calibration_batches(
    spec_model: Any, task: Any, n: int = 8, batch: int = 4, seed: int = 1234
) -> list[torch.Tensor]:
    """``n`` calibration inputs of the training shape (task data when known)."""
    L = max(2, min(spec_model.train.seq_len, spec_model.model.max_seq_len))
    xs, _ = parity_inputs(spec_model, task, seed, [(batch, L)] * n)
    return xs
