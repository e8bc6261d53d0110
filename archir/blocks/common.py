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


def carry_in(g: torch.Tensor, S: torch.Tensor) -> torch.Tensor:
    """The states entering each chunk, by the recurrence over chunks (eager: linear in the
    chunk count, where :func:`archir.blocks.ssm.carry_matrix` is quadratic).

    ``g, S [B, nc, ...]`` (each chunk's total log-decay, broadcastable to ``S``, and its end
    state from zero) -> ``H`` shaped like ``S``: ``H_0 = 0``, ``H_i = exp(g_{i−1}) H_{i−1} +
    S_{i−1}`` — the same as ``Σ_j carry_matrix(g)[:, i, j] S_j``. Out of place (autograd
    can run through it); not for graph capture (a loop over chunks)."""
    eg = torch.exp(g)
    H = [torch.zeros_like(S[:, 0])]
    for i in range(1, S.shape[1]):
        H.append(eg[:, i - 1] * H[-1] + S[:, i - 1])
    return torch.stack(H, 1)


def carry_back(g: torch.Tensor, R: torch.Tensor) -> torch.Tensor:
    """The adjoint of :func:`carry_in`: ``g, R [B, nc, X]`` (``R_i``: the gradient reaching
    the state entering chunk ``i``) -> ``F [B, nc, X]``, ``F_k = Σ_{i>k} exp(Σ_{k<r<i} g_r)
    R_i`` (the gradient of chunk ``k``'s end state; ``F_{nc−1} = 0``), by the recurrence
    ``F_k = R_{k+1} + exp(g_{k+1}) F_{k+1}`` backwards over chunks."""
    eg = torch.exp(g)
    nc = R.shape[1]
    F_ = [torch.zeros_like(R[:, 0])]
    for k in range(nc - 2, -1, -1):
        F_.append(R[:, k + 1] + eg[:, k + 1] * F_[-1])
    return torch.stack(F_[::-1], 1)
