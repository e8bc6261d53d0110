"""Channel mixers: MLP and gated linear units. Shapes: ``[batch, seq, d_model] -> same``.

Hidden width ``h = d_ff`` or ``round(expansion · d_model)`` rounded up to ``multiple_of``.
FLOPs per token: ``2·d·h`` per projection (multiply-add = 2 FLOPs).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
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
