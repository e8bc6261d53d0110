"""Small helpers shared by block families."""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn.utils import skip_init


def hidden_size(d_model: int, expansion: float, d_ff: int | None, multiple_of: int = 1) -> int:
    """Hidden width of a channel mixer: ``d_ff`` if given, else ``expansion·d_model`` rounded
    up to a multiple of ``multiple_of``."""
    if d_ff is not None:
        return d_ff
    h = int(round(expansion * d_model))
    return max(multiple_of, int(math.ceil(h / multiple_of) * multiple_of))


def linear_params(d_in: int, d_out: int, bias: bool) -> int:
    return d_in * d_out + (d_out if bias else 0)


def linear(d_in: int, d_out: int, bias: bool = False, std: float = 0.02) -> nn.Linear:
    """``nn.Linear`` initialized once: weights N(0, std²), zero bias.

    Skips PyTorch's default Kaiming init (which would be drawn and then overwritten), which
    halves model build time.
    """
    layer = skip_init(nn.Linear, d_in, d_out, bias=bias)
    init_linear(layer, std)
    return layer


def init_linear(layer: nn.Linear, std: float = 0.02) -> None:
    nn.init.normal_(layer.weight, mean=0.0, std=std)
    if layer.bias is not None:
        nn.init.zeros_(layer.bias)


def tracing(*, compiling: bool = True) -> bool:
    """Whether a block's ``forward`` runs under graph capture rather than eagerly: TorchScript
    tracing, ``torch.onnx.export`` (either exporter) or ``torch.export`` — and, with
    ``compiling`` (the default), ``torch.compile``. Blocks then take their capture-friendly
    path: static shapes, no data-dependent Python branches, no ``out=`` scratch buffers.
    ``compiling=False`` is for a choice that only an exported graph needs (an op the ONNX
    exporters cannot express), where ``torch.compile`` keeps the eager path."""
    return bool(
        torch.jit.is_tracing()
        or torch.onnx.is_in_onnx_export()
        or torch.compiler.is_exporting()
        or (compiling and torch.compiler.is_compiling())
    )


def check_heads(n_heads: int, **widths: int) -> None:
    """Raise ``ValueError("n_heads H does not divide <name> <width>")`` for the first width
    that ``n_heads`` does not divide (every multi-head kind's check; the message starts with
    the field name, so the spec error points at ``n_heads``)."""
    for name, width in widths.items():
        if width % n_heads:
            raise ValueError(f"n_heads {n_heads} does not divide {name} {width}")
