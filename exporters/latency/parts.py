"""Per-part latency measurement: one residual block (or the fixed parts) in its own graph.

A spec's onnxruntime latency is, to a good approximation, the sum of the latencies of its
parts run one after another: every residual block (its norm, mixer and residual add) and the
fixed parts (token embedding, final norm and LM head). Measuring parts instead of whole specs
makes calibration cheap — one block configuration measured once is reused by every spec that
contains it — and lets the predictor (:mod:`.predictor`) fit a model per kind and precision
on clean, single-kind samples.

Every part graph comes from the one export path (:func:`exporters.graph.part_graph`): the
exporter, dynamic length, clean-up and quantizer of the file ``archir export`` ships, at the
precision the part's ``bits`` select (``auto``: 16+ fp32, 8 int8, 4 and below int4), so a
part is timed with the kernels it ships with.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from exporters.latency.harness import (
    RuntimeUnavailableError,
    ort_session,
    torch_threads,
)


def fixed_module(model: Any) -> Any:
    """Embedding -> final norm -> head of a compiled LM, as one module (tokens in)."""
    from torch import nn

    class Fixed(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed, self.final_norm, self.head = model.embed, model.final_norm, model.head

        def forward(self, x: Any) -> Any:
            return self.head(self.final_norm(self.embed(x)))

    return Fixed()


def export_module(
    module: Any,
    example: Any,
    path: str | Path,
    *,
    threads: int = 1,
    bits: float = 16.0,
    max_seq: int | None = None,
) -> None:
    """Write ``module``'s graph to ``path`` by the one export path
    (:func:`exporters.graph.part_graph`: the shipped file's exporter, dynamic length, the
    precision ``bits`` select), exported at ``example`` (its size-1 axes stay static).

    Raises:
        RuntimeUnavailableError: the export fails.
    """
    import onnx

    from archir.errors import ExportError
    from exporters.graph import part_graph

    with torch_threads(threads):
        try:
            ex, _ = part_graph(module, example, bits=bits, max_seq=max_seq)
        except ExportError as exc:
            raise RuntimeUnavailableError(f"ONNX export failed: {exc}") from exc
    onnx.save(ex.proto, str(path))


def export_part(model: Any, part: Any, path: str | Path, *, threads: int = 1) -> None:
    """Write one part (:class:`~.predictor.PartFeatures`, or anything with its ``name``,
    ``kind``, ``batch``, ``seq`` and ``d_model``) of a compiled model alone to ``path``:
    :func:`export_module` at the part's shape, the precision its bits ship as
    (:func:`part_bits`), dynamic length up to the model's ``max_seq_len``.

    Raises:
        RuntimeUnavailableError: the export fails.
    """
    module, x = part_module_and_input(model, part)
    export_module(
        module,
        x,
        path,
        threads=threads,
        bits=part_bits(model, part),
        max_seq=int(model.spec.model.max_seq_len),
    )


def session_callables(
    path: str | Path, examples: list[Any], threads: int
) -> list[Callable[[], Any]]:
    """No-argument callables running the one-input ONNX file ``path`` on each of
    ``examples`` (torch tensors), one onnxruntime session with ``threads`` intra-op threads
    serving them all."""
    sess = ort_session(path, threads)
    name = sess.get_inputs()[0].name

    def ort_run(feed: dict[str, Any]) -> Callable[[], Any]:
        return lambda: sess.run(None, feed)

    return [ort_run({name: x.numpy()}) for x in examples]


def module_callables(
    module: Any,
    examples: list[Any],
    runtime: str,
    threads: int,
    tmpdir: str | Path,
    *,
    bits: float = 16.0,
    max_seq: int | None = None,
) -> list[Callable[[], Any]]:
    """No-argument callables running ``module`` on each of ``examples`` (the same module at
    several lengths): onnxruntime — one graph made by :func:`export_module` (exported at
    the first example) saved into ``tmpdir``, one session with ``threads`` intra-op threads
    serving every example (:func:`session_callables`); torch — eager under ``no_grad``.

    Raises:
        RuntimeUnavailableError: the export fails.
    """
    if runtime == "ort":
        path = Path(tmpdir) / f"m{len(list(Path(tmpdir).iterdir()))}.onnx"
        export_module(module, examples[0], path, threads=threads, bits=bits, max_seq=max_seq)
        return session_callables(path, examples, threads)
    import torch

    def eager(x: Any) -> Callable[[], Any]:
        def run() -> Any:
            with torch.no_grad():
                return module(x)

        return run

    return [eager(x) for x in examples]


def module_callable(
    module: Any,
    example: Any,
    runtime: str,
    threads: int,
    tmpdir: str | Path,
    *,
    bits: float = 16.0,
    max_seq: int | None = None,
) -> Callable[[], Any]:
    """:func:`module_callables` for one example.

    Raises:
        RuntimeUnavailableError: the export fails.
    """
    return module_callables(
        module, [example], runtime, threads, tmpdir, bits=bits, max_seq=max_seq
    )[0]


def node_modules(model: Any) -> dict[str, Any]:
    """IR block node name -> its residual-block module in a compiled model (nodes sharing
    another's weights map to the owner's module)."""
    out: dict[str, Any] = {}
    owners: dict[str, Any] = {}
    it = iter(model.blocks)
    for n in model.graph:
        if n.op != "block":
            continue
        if n.weights_of is not None:
            out[n.name] = owners[n.weights_of]
        else:
            owners[n.name] = out[n.name] = next(it)
    return out


def part_example(d_model: int, batch: int, seq: int) -> Any:
    """A deterministic ``[batch, seq, d_model]`` float input."""
    import torch

    g = torch.Generator().manual_seed(0)
    return torch.randn(batch, seq, d_model, generator=g)


def part_bits(model: Any, part: Any) -> float:
    """The weight bits that decide a part's precision: its IR node's (a shared node: its
    owner's); the fixed part: the lowest of the embedding's and head's."""
    graph = model.graph
    if part.kind == "fixed":
        fixed = [n.bits for n in graph if n.op in ("embed", "head") and n.weights_of is None]
        return float(min(fixed, default=16.0))
    node = graph[part.name]
    if node.weights_of is not None:
        node = graph[node.weights_of]
    return float(node.bits)


def part_input(vocab_size: int, part: Any) -> Any:
    """The input a part (:class:`~.predictor.PartFeatures`) is measured on: ``[batch, seq,
    d_model]`` floats for a residual block, ``[batch, seq]`` tokens below ``vocab_size``
    for the fixed part (both deterministic)."""
    import torch

    if part.kind == "fixed":
        g = torch.Generator().manual_seed(0)
        return torch.randint(0, max(1, int(vocab_size)), (part.batch, part.seq), generator=g)
    return part_example(part.d_model, part.batch, part.seq)


def part_module_and_input(model: Any, part: Any) -> tuple[Any, Any]:
    """The module measuring one part (:class:`~.predictor.PartFeatures`) of a compiled model
    and its input (:func:`part_input`): a residual block, or the fixed part."""
    x = part_input(model.spec.model.vocab_size, part)
    if part.kind == "fixed":
        return fixed_module(model), x
    return node_modules(model)[part.name], x
