"""Per-part latency measurement: one residual block (or the fixed parts) in its own graph.

A spec's onnxruntime latency is, to a good approximation, the sum of the latencies of its
parts run one after another: every residual block (its norm, mixer and residual add) and the
fixed parts (token embedding, final norm and LM head). Measuring parts instead of whole specs
makes calibration cheap — a block graph exports in tens of milliseconds, and one block
configuration measured once is reused by every spec that contains it — and lets the
predictor (:mod:`.predictor`) fit a model per kind on clean, single-kind samples.

Every graph is exported **at the shape it is measured at** (static ``[batch, seq]``): some
mixers (chunked scans, length-T convolution kernels) trace to a graph that only holds for the
traced length, so a graph traced at one length and run at another measures the wrong thing.
"""

from __future__ import annotations

import tempfile
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
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


@contextmanager
def _quiet_stderr() -> Iterator[None]:
    """Silence file descriptors 1 and 2 (the TorchScript exporter prints whole graphs on
    failure, the dynamo exporter its progress)."""
    import os
    import sys

    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 1)
            os.dup2(null.fileno(), 2)
            yield
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        for fd, old in zip((1, 2), saved):
            os.dup2(old, fd)
            os.close(old)


def _export_torchscript(module: Any, example: Any, path: str | Path) -> None:
    import torch

    with warnings.catch_warnings(), torch.no_grad(), _quiet_stderr():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module,
            (example,),
            str(path),
            dynamo=False,
            opset_version=17,
            input_names=["input"],
            output_names=["output"],
        )


def export_chain(model: Any, tokens: Any, path: str | Path) -> None:
    """Export a chain-shaped compiled model part by part (TorchScript, static shapes) and
    join the graphs with ``onnx.compose`` into one model: embedding -> every block -> final
    norm and head. The graph onnxruntime runs is the whole model's, built from the same
    TorchScript kernels the parts were calibrated with — for specs whose one-piece
    TorchScript export fails (a Hyena block after a block whose output shape ONNX shape
    inference loses).

    Raises:
        ValueError: the model is not a chain (merges, multiple inputs).
    """
    import onnx
    import torch
    from torch import nn

    if not getattr(model, "_chain", False):
        raise ValueError("not a chain model")

    class Head(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.final_norm, self.head = model.final_norm, model.head

        def forward(self, x: Any) -> Any:
            return self.head(self.final_norm(x))

    mods = node_modules(model)
    order = [n.name for n in model.graph if n.op == "block"]
    stages: list[tuple[Any, Any]] = [(model.embed, tokens)]
    with torch.no_grad():
        h = model.embed(tokens)
        for name in order:
            stages.append((mods[name], h))
            h = mods[name](h)
    stages.append((Head(), h))
    acc: Any = None
    grads = [(q, q.requires_grad) for q in model.parameters()]
    for q, _ in grads:  # a tied head reads the embedding's weight as a traced constant
        q.requires_grad_(False)
    with tempfile.TemporaryDirectory(prefix="archir-chain-") as tmp:
        try:
            acc = _join(stages, tmp)
        finally:
            for q, g in grads:
                q.requires_grad_(g)
    onnx.save(acc, str(path))


def _join(stages: list[tuple[Any, Any]], tmp: str) -> Any:
    import onnx
    from onnx import compose

    acc: Any = None
    for i, (mod, x) in enumerate(stages):
        f = Path(tmp) / f"s{i}.onnx"
        _export_torchscript(mod, x, f)
        m = compose.add_prefix(onnx.load(str(f)), prefix=f"s{i}_")
        if acc is None:
            acc = m
        else:
            out = acc.graph.output[0].name
            acc = compose.merge_models(acc, m, io_map=[(out, f"s{i}_input")])
    return acc


def export_static(module: Any, example: Any, path: str | Path) -> str:
    """Export ``module`` at the example's exact shape; returns the exporter used.

    The TorchScript path (opset 17, fast) first; where it fails (e.g. a Hyena block after a
    block whose output shape ONNX shape inference loses) and the module is a chain-shaped
    compiled model, :func:`export_chain` (the same TorchScript kernels, joined); else
    ``torch.export`` (dynamo, opset 18, seconds slower, other kernels).

    Raises:
        RuntimeUnavailableError: every export fails.
    """
    import torch

    try:
        _export_torchscript(module, example, path)
        return "torchscript"
    except Exception as exc:
        first = exc
    if getattr(module, "_chain", False):
        try:
            export_chain(module, example, path)
            return "torchscript-chain"
        except Exception:
            pass
    try:
        with warnings.catch_warnings(), torch.no_grad(), _quiet_stderr():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                module,
                (example,),
                str(path),
                dynamo=True,
                opset_version=18,
                optimize=True,
                input_names=["input"],
                output_names=["output"],
            )
        return "dynamo"
    except Exception as exc:
        raise RuntimeUnavailableError(
            f"ONNX export failed: {type(first).__name__}: {str(first)[:160]}; "
            f"dynamo: {type(exc).__name__}: {str(exc)[:160]}"
        ) from exc


def module_callable(
    module: Any, example: Any, runtime: str, threads: int, tmpdir: str | Path
) -> Callable[[], Any]:
    """A no-argument callable running ``module`` on ``example``: onnxruntime — its graph
    exported at the example's static shape into ``tmpdir``, in a session with ``threads``
    intra-op threads; torch — eager under ``no_grad``.

    Raises:
        RuntimeUnavailableError: the export fails.
    """
    if runtime == "ort":
        path = Path(tmpdir) / f"m{len(list(Path(tmpdir).iterdir()))}.onnx"
        with torch_threads(threads):
            export_static(module, example, path)
        sess = ort_session(path, threads)
        feed = {sess.get_inputs()[0].name: example.numpy()}
        return lambda: sess.run(None, feed)
    import torch

    def run() -> Any:
        with torch.no_grad():
            return module(example)

    return run


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


def part_module_and_input(model: Any, part: Any) -> tuple[Any, Any]:
    """The module measuring one part (:class:`~.predictor.PartFeatures`) of a compiled model
    and its input: a residual block on ``[batch, seq, d]`` floats, or the fixed part on
    ``[batch, seq]`` tokens."""
    import torch

    if part.kind == "fixed":
        g = torch.Generator().manual_seed(0)
        vocab = max(1, int(model.spec.model.vocab_size))
        return fixed_module(model), torch.randint(0, vocab, (part.batch, part.seq), generator=g)
    return node_modules(model)[part.name], part_example(part.d_model, part.batch, part.seq)
