"""Channel mixers: MLP and gated linear units. Shapes: ``[batch, seq, d_model] -> same``.

Hidden width ``h = d_ff`` or ``round(expansion · d_model)`` rounded up to ``multiple_of``.
FLOPs per token: ``2·d·h`` per projection (multiply-add = 2 FLOPs).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field, field_validator
from torch import nn

from archir.blocks.common import hidden_size, linear, linear_params
from archir.registry import MAX_DIM, MAX_HIDDEN, BlockKind, BuildContext, KindParams, register

Activation = Literal["gelu", "gelu_tanh", "relu", "silu", "relu2"]

_ACT = {
    "gelu": F.gelu,
    # the tanh approximation of GELU (Hendrycks & Gimpel, 2016), GPT-2's ``gelu_new``
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
    "silu": F.silu,
    "relu2": lambda x: F.relu(x).square(),
}


class MLPParams(KindParams):
    expansion: float = Field(4.0, gt=0, le=64)
    d_ff: int | None = Field(None, gt=0, le=MAX_HIDDEN)
    multiple_of: int = Field(1, ge=1, le=MAX_DIM)
    activation: Activation = "gelu"
    bias: bool = False


class GLUParams(KindParams):
    expansion: float = Field(8 / 3, gt=0, le=64)
    d_ff: int | None = Field(None, gt=0, le=MAX_HIDDEN)
    multiple_of: int = Field(1, ge=1, le=MAX_DIM)
    bias: bool = False


class MLP(nn.Module):
    """Two-layer feed-forward network ``W2·act(W1·x)`` (Vaswani et al., 2017).

    ``[batch, seq, d] -> [batch, seq, d]``.
    """

    def __init__(self, d: int, h: int, activation: str = "gelu", bias: bool = False) -> None:
        super().__init__()
        self.fc1 = linear(d, h, bias=bias)
        self.fc2 = linear(h, d, bias=bias)
        self.act = _ACT[activation]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class GLU(nn.Module):
    """Gated linear unit FFN ``W2·(act(W1·x) ⊙ W3·x)`` (Shazeer, 2020, "GLU Variants
    Improve Transformer"): SwiGLU with SiLU, GeGLU with GELU.

    ``[batch, seq, d] -> [batch, seq, d]``.
    """

    def __init__(self, d: int, h: int, activation: str, bias: bool = False) -> None:
        super().__init__()
        self.w_gate = linear(d, h, bias=bias)
        self.w_up = linear(d, h, bias=bias)
        self.w_down = linear(h, d, bias=bias)
        self.act = _ACT[activation]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w_down(self.act(self.w_gate(x)) * self.w_up(x))


def _h(p: MLPParams | GLUParams, c: BuildContext) -> int:
    return hidden_size(c.d_model, p.expansion, p.d_ff, p.multiple_of)


register(
    BlockKind(
        name="mlp",
        role="channel_mixer",
        params=MLPParams,
        build=lambda p, c: MLP(c.d_model, _h(p, c), p.activation, p.bias),
        n_params=lambda p, c: (
            linear_params(c.d_model, _h(p, c), p.bias) + linear_params(_h(p, c), c.d_model, p.bias)
        ),
        flops=lambda p, c, L: 4.0 * c.d_model * _h(p, c),
        paper="Vaswani et al., 2017, 'Attention Is All You Need'",
        summary="feed-forward MLP: fc2(act(fc1(x))), act in gelu/gelu_tanh/relu/silu/relu2",
        extra={"flops_exact": True},
    )
)


def _glu_builder(act: str) -> Callable[[GLUParams, BuildContext], nn.Module]:
    return lambda p, c: GLU(c.d_model, _h(p, c), act, p.bias)


for _name, _act in (("swiglu", "silu"), ("geglu", "gelu")):
    register(
        BlockKind(
            name=_name,
            role="channel_mixer",
            params=GLUParams,
            build=_glu_builder(_act),
            n_params=lambda p, c: (
                2 * linear_params(c.d_model, _h(p, c), p.bias)
                + linear_params(_h(p, c), c.d_model, p.bias)
            ),
            flops=lambda p, c, L: 6.0 * c.d_model * _h(p, c),
            paper="Shazeer, 2020, 'GLU Variants Improve Transformer'",
            summary=f"gated FFN: down({_act}(gate(x)) * up(x))",
            extra={"flops_exact": True},
        )
    )


# -- MatFormer: nested (elastic) FFN -------------------------------------------------------

#: the plain kind a gated MatFormer FFN is extracted to, by activation
MATFORMER_GLU_KINDS = {"silu": "swiglu", "gelu": "geglu"}


class MatFormerParams(KindParams):
    """``expansion``/``d_ff``/``multiple_of``: the full hidden width ``h`` (as ``mlp``);
    ``granularities``: the nested widths as fractions of ``h``, sorted, in ``(0, 1]``, the
    last 1.0, each a whole number of hidden units (checked against ``d_model``);
    ``gated``: a GLU (``swiglu`` with ``silu``, ``geglu`` with ``gelu``) or a plain MLP."""

    expansion: float = Field(4.0, gt=0, le=64)
    d_ff: int | None = Field(None, gt=0, le=MAX_HIDDEN)
    multiple_of: int = Field(1, ge=1, le=MAX_DIM)
    activation: Activation = "silu"
    gated: bool = True
    bias: bool = False
    granularities: list[float] = Field(
        default_factory=lambda: [0.125, 0.25, 0.5, 1.0], min_length=1, max_length=16
    )

    @field_validator("granularities")
    @classmethod
    def _nested(cls, v: list[float]) -> list[float]:
        if any(not 0 < g <= 1 for g in v):
            raise ValueError("every granularity must be a fraction in (0, 1]")
        if any(b <= a for a, b in zip(v, v[1:])):
            raise ValueError("granularities must be sorted and distinct, smallest first")
        if v[-1] != 1.0:
            raise ValueError("the last granularity must be 1.0 (the full width)")
        return v


def matformer_widths(p: MatFormerParams, d_model: int) -> list[int]:
    """Hidden units ``round(g·h)`` of each granularity ``g`` (``h``: the full width).

    Raises:
        ValueError: a granularity does not give a whole number of units (``g·h`` not an
            integer), or gives the same width as another.
    """
    h = hidden_size(d_model, p.expansion, p.d_ff, p.multiple_of)
    out = []
    for g in p.granularities:
        units = g * h
        if abs(units - round(units)) > 1e-9 or round(units) < 1:
            raise ValueError(
                f"granularities: {g:g} of the full width {h} is {units:g} hidden units, "
                "not a whole number (pick fractions whose multiple of the width is whole)"
            )
        out.append(int(round(units)))
    if len(set(out)) != len(out):
        raise ValueError(f"granularities give repeated widths {out} of the full width {h}")
    return out


def _matformer_check(p: MatFormerParams, c: BuildContext) -> None:
    if p.gated and p.activation not in MATFORMER_GLU_KINDS:
        raise ValueError(
            f"activation '{p.activation}' with gated: true has no plain kind to extract to: "
            "use silu (swiglu) or gelu (geglu), or gated: false (mlp)"
        )
    matformer_widths(p, c.d_model)


class MatFormerFFN(nn.Module):
    """MatFormer's nested FFN (Devvrit, Kudugunta et al., 2023, "MatFormer: Nested
    Transformer for Elastic Inference"): the sub-network at granularity ``g`` uses the first
    ``g·h`` hidden units of the full FFN, so every smaller FFN is a prefix of the larger.

    ``[batch, seq, d_model] -> [batch, seq, d_model]``. The width in use is the attribute
    :attr:`granularity` (a fraction out of :attr:`granularities`, default 1.0 = the full
    width), set by the trainer or :func:`use_granularity` — not a ``forward`` argument, so a
    compiled model stays ``forward(tokens)``. Weights are named as in the plain kinds
    (``w_gate``/``w_up``/``w_down`` gated, ``fc1``/``fc2`` not), so an extracted model's
    weights are prefixes of these under the same names.
    """

    def __init__(
        self,
        d: int,
        widths: list[int],
        granularities: list[float],
        activation: str,
        gated: bool,
        bias: bool = False,
    ) -> None:
        super().__init__()
        h = widths[-1]
        self.gated = gated
        if gated:
            self.w_gate = linear(d, h, bias=bias)
            self.w_up = linear(d, h, bias=bias)
            self.w_down = linear(h, d, bias=bias)
        else:
            self.fc1 = linear(d, h, bias=bias)
            self.fc2 = linear(h, d, bias=bias)
        self.act = _ACT[activation]
        self.granularities = list(granularities)
        self.widths = dict(zip(granularities, widths))
        self.granularity = 1.0

    @property
    def width(self) -> int:
        """Hidden units in use at the current :attr:`granularity`.

        Raises:
            ValueError: the granularity is not one of :attr:`granularities`.
        """
        try:
            return self.widths[self.granularity]
        except KeyError:
            raise ValueError(
                f"granularity {self.granularity:g} is not one of {self.granularities}"
            ) from None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = self.width
        if n == self.widths[1.0]:  # the full width: exactly the plain kind's ops
            if self.gated:
                return self.w_down(self.act(self.w_gate(x)) * self.w_up(x))
            return self.fc2(self.act(self.fc1(x)))
        up, down = (self.w_up, self.w_down) if self.gated else (self.fc1, self.fc2)
        first = self.w_gate if self.gated else self.fc1

        def part(lin: nn.Linear) -> torch.Tensor:
            b = lin.bias[:n] if lin.bias is not None else None
            return F.linear(x, lin.weight[:n], b)

        hidden = self.act(part(first))
        if self.gated:
            hidden = hidden * part(up)
        return F.linear(hidden, down.weight[:, :n], down.bias)


def matformer_modules(model: nn.Module) -> list[MatFormerFFN]:
    """The distinct :class:`MatFormerFFN` modules of ``model`` in model order (a block
    whose weights are shared by several layers is listed once)."""
    return [m for m in model.modules() if isinstance(m, MatFormerFFN)]


@contextmanager
def use_granularity(model: nn.Module, granularity: float | Sequence[float]) -> Iterator[None]:
    """Run ``model``'s MatFormer FFNs at ``granularity`` inside the ``with`` block: one
    fraction for every FFN, or one per FFN of :func:`matformer_modules` (Mix'n'Match).
    The previous granularities come back on exit.

    Raises:
        ValueError: the model has no MatFormer FFN, a per-FFN list of the wrong length, or a
            granularity that an FFN was not built with.
    """
    mods = matformer_modules(model)
    if not mods:
        raise ValueError("the model has no matformer blocks")
    if isinstance(granularity, int | float):
        gs = [float(granularity)] * len(mods)
    else:
        gs = [float(g) for g in granularity]
        if len(gs) != len(mods):
            raise ValueError(
                f"{len(gs)} granularities given for {len(mods)} matformer blocks "
                "(one per block, in model order)"
            )
    for i, (m, g) in enumerate(zip(mods, gs)):
        if g not in m.widths:
            raise ValueError(
                f"granularity {g:g} of matformer block {i} is not one it was trained "
                f"with: {m.granularities}"
            )
    before = [m.granularity for m in mods]
    try:
        for m, g in zip(mods, gs):
            m.granularity = g
        yield
    finally:
        for m, g in zip(mods, before):
            m.granularity = g


def _mf_h(p: MatFormerParams, c: BuildContext) -> int:
    return hidden_size(c.d_model, p.expansion, p.d_ff, p.multiple_of)


def _mf_params(p: MatFormerParams, c: BuildContext) -> int:
    h = _mf_h(p, c)
    ins = 2 if p.gated else 1
    return ins * linear_params(c.d_model, h, p.bias) + linear_params(h, c.d_model, p.bias)


register(
    BlockKind(
        name="matformer",
        role="channel_mixer",
        params=MatFormerParams,
        build=lambda p, c: MatFormerFFN(
            c.d_model,
            matformer_widths(p, c.d_model),
            p.granularities,
            p.activation,
            p.gated,
            p.bias,
        ),
        n_params=_mf_params,
        flops=lambda p, c, L: (6.0 if p.gated else 4.0) * c.d_model * _mf_h(p, c),
        check=_matformer_check,
        paper=(
            "Devvrit, Kudugunta et al., 2023, 'MatFormer: Nested Transformer for Elastic Inference'"
        ),
        summary="nested (elastic) FFN: granularity g uses the first g·d_ff hidden units; "
        "extract any width or per-layer mix with `archir extract`",
        extra={"flops_exact": True, "flops_counts": "the full width (granularity 1.0)"},
    )
)
