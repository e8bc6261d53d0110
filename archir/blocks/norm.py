"""Normalization layers (role ``norm``). Shapes: ``[batch, seq, d_model] -> same``.

Norms cost no FLOPs in archir's count (only matmul-class operations are counted, as in
``torch.utils.flop_counter``); their parameters are counted exactly.
"""

from __future__ import annotations

import torch
from pydantic import Field
from torch import nn

from archir.registry import BlockKind, BuildContext, KindParams, register


class NormParams(KindParams):
    eps: float = Field(1e-5, gt=0)


class RMSNorm(nn.Module):
    """Root-mean-square norm: ``x / rms(x) * g`` (Zhang & Sennrich, 2019, "Root Mean Square
    Layer Normalization"). ``[..., d] -> [..., d]``. Under fp16/bf16 the normalization is
    computed in fp32 and cast back before the gain, as Llama's reference does."""

    def __init__(self, d: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype in (torch.float16, torch.bfloat16):
            h = x.float()
            h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
            return h.to(x.dtype) * self.weight
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


class DyT(nn.Module):
    """Dynamic Tanh: ``γ·tanh(α·x) + β`` with a learned scalar α (Zhu et al., 2025,
    "Transformers without Normalization"). ``[..., d] -> [..., d]``."""

    def __init__(self, d: int, alpha0: float = 0.5) -> None:
        super().__init__()
        self.alpha = nn.Parameter(torch.full((1,), alpha0))
        self.weight = nn.Parameter(torch.ones(d))
        self.bias = nn.Parameter(torch.zeros(d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.alpha * x) * self.weight + self.bias


class SeqBatchNorm(nn.Module):
    """BatchNorm over the channel axis of ``[batch, seq, d]`` (Ioffe & Szegedy, 2015;
    used in token-mixing nets such as PoolFormer variants)."""

    def __init__(self, d: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.bn = nn.BatchNorm1d(d, eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(x.transpose(1, 2)).transpose(1, 2)


class DyTParams(KindParams):
    alpha0: float = 0.5


def _zero_flops(p: KindParams, c: BuildContext, L: int) -> float:
    return 0.0


register(
    BlockKind(
        name="layernorm",
        role="norm",
        params=NormParams,
        build=lambda p, c: nn.LayerNorm(c.d_model, eps=p.eps),
        n_params=lambda p, c: 2 * c.d_model,
        flops=_zero_flops,
        paper="Ba, Kiros & Hinton, 2016, 'Layer Normalization'",
        summary="LayerNorm: (x - mean) / std * g + b",
    )
)
register(
    BlockKind(
        name="rmsnorm",
        role="norm",
        params=NormParams,
        build=lambda p, c: RMSNorm(c.d_model, p.eps),
        n_params=lambda p, c: c.d_model,
        flops=_zero_flops,
        paper="Zhang & Sennrich, 2019, 'Root Mean Square Layer Normalization'",
        summary="RMSNorm: x / rms(x) * g",
    )
)
register(
    BlockKind(
        name="dyt",
        role="norm",
        params=DyTParams,
        build=lambda p, c: DyT(c.d_model, p.alpha0),
        n_params=lambda p, c: 2 * c.d_model + 1,
        flops=_zero_flops,
        paper="Zhu, Chen, He, LeCun & Liu, 2025, 'Transformers without Normalization'",
        summary="Dynamic Tanh: g * tanh(alpha * x) + b, a normalization-free replacement",
    )
)
register(
    BlockKind(
        name="batchnorm",
        role="norm",
        params=NormParams,
        build=lambda p, c: SeqBatchNorm(c.d_model, p.eps),
        n_params=lambda p, c: 2 * c.d_model,
        flops=_zero_flops,
        paper="Ioffe & Szegedy, 2015, 'Batch Normalization'",
        summary="BatchNorm over channels of [batch, seq, d] (running statistics at eval)",
    )
)
