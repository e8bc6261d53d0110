"""Vision hierarchies: the layers that change an image model's token grid and width.

A hierarchical image model (PoolFormer, ConvFormer, CAFormer, EdgeNeXt) runs its blocks in
**stages**: each stage sees a token grid ``H × W`` at its own width ``d_model``, and a
downsampling layer between stages shrinks the grid and changes the width. In a spec the
stem is the model's ``embed`` and each later stage is a layer group with ``d_model`` and
``downsample``::

    embed: {kind: downsample, kernel_size: 3, stride: 1, norm: post}    # 8x8 -> 8x8, d 16
    layers:
      - {repeat: 2, blocks: [...]}                                       # stage 1
      - {d_model: 32, downsample: {kind: downsample, stride: 2}, ...}    # 8x8 -> 4x4, d 32

Tokens stay ``[batch, H·W, d]`` (row-major over the grid) between blocks; a mixer that is a
2-D operation on images (``pooling``, ``sepconv``) reads the grid from its build context
(:class:`archir.ir.GridContext`).

Kinds (role ``embedding``: each one makes tokens, from an image or from coarser tokens):

* ``downsample``: a strided convolution with an optional LayerNorm before (``pre``) or after
  (``post``) it — MetaFormer's ``Downsampling`` (Yu et al., 2022/2024: stem 7×7 stride 4
  with the norm after; between stages 3×3 stride 2 with the norm before) and EdgeNeXt's
  (Maaz et al., 2022: 4×4 stride 4 stem, 2×2 stride 2 between stages, norm before).
  Images ``[batch, C, H, W]`` or tokens ``[batch, H·W, d_in]`` ->
  ``[batch, H'·W', d_model]`` with ``H' = (H + 2·padding - kernel_size) // stride + 1``.
* ``patch_merging``: Swin's merge of each 2×2 neighbourhood (Liu et al., 2021, "Swin
  Transformer"): concatenate the four tokens (``4·d_in`` features), LayerNorm, a linear map
  to ``d_model`` without bias. Tokens ``[batch, H·W, d_in] -> [batch, (H/2)·(W/2), d_model]``
  (``H``, ``W`` even). Between stages only.

Norms are LayerNorm over channels; ``downsample``'s has no bias (MetaFormer's "LayerNorm
w/o bias"), ``patch_merging``'s has one (Swin). Their epsilon is ``model.norm_eps`` when
set, else 1e-6 (MetaFormer) for ``downsample`` and 1e-5 for ``patch_merging`` (Swin).

Cost units: FLOPs per output token (a multiply-add is 2 FLOPs; the convolution and the
linear map as ``torch.utils.flop_counter`` counts them, norms not counted); the cost pass
turns them into FLOPs per image (see :mod:`archir.cost`).
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from torch import nn

from archir.registry import BlockKind, BuildContext, KindParams, register

#: the largest kernel / stride / padding a downsampling layer takes
MAX_KERNEL = 64


def grid_of(c: BuildContext) -> tuple[int, int] | None:
    """The token grid ``(H, W)`` a node reads (``None``: its tokens are a sequence)."""
    return getattr(c, "grid", None)


def _in_grid(c: BuildContext) -> tuple[int, int]:
    g = grid_of(c)
    return g if g is not None else (c.image_size, c.image_size)


def _d_in(c: BuildContext) -> int:
    d = int(getattr(c, "d_in", 0) or 0)
    return d if d > 0 else c.channels


def _eps(c: BuildContext, default: float) -> float:
    return c.norm_eps if c.norm_eps is not None else default


# --------------------------------------------------------------------------- downsample


class DownsampleParams(KindParams):
    """``kernel_size``, ``stride`` and ``padding`` of the convolution (default padding:
    ``kernel_size // 2``, or 0 when ``kernel_size == stride``, a patchify layer); ``norm``: a LayerNorm before the convolution (``pre``, MetaFormer between stages),
    after it (``post``, MetaFormer's stem) or none."""

    kernel_size: int = Field(3, ge=1, le=MAX_KERNEL)
    stride: int = Field(2, ge=1, le=MAX_KERNEL)
    padding: int | None = Field(None, ge=0, le=MAX_KERNEL)
    norm: Literal["pre", "post", "none"] = "pre"

    def pad(self) -> int:
        if self.padding is not None:
            return self.padding
        return 0 if self.kernel_size == self.stride else self.kernel_size // 2


def conv_out(size: int, p: DownsampleParams) -> int:
    """Output side of the strided convolution on a side of ``size`` (may be < 1: invalid)."""
    return (size + 2 * p.pad() - p.kernel_size) // p.stride + 1


class Downsample(nn.Module):
    """Strided convolution between LayerNorms (MetaFormer's ``Downsampling``; Yu et al.,
    2024, "MetaFormer Baselines for Vision").

    ``forward``: images ``[batch, d_in, H, W]`` or tokens ``[batch, H·W, d_in]`` (row-major
    over ``grid = (H, W)``) -> tokens ``[batch, H'·W', d_out]``.
    """

    def __init__(
        self, d_in: int, d_out: int, grid: tuple[int, int], p: DownsampleParams, eps: float
    ) -> None:
        super().__init__()
        self.grid = grid
        self.d_in = d_in
        self.pre_norm = nn.LayerNorm(d_in, eps=eps, bias=False) if p.norm == "pre" else None
        self.conv = nn.Conv2d(d_in, d_out, p.kernel_size, stride=p.stride, padding=p.pad())
        self.post_norm = nn.LayerNorm(d_out, eps=eps, bias=False) if p.norm == "post" else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        H, W = self.grid
        if x.dim() == 4:  # an image: channels first
            if self.pre_norm is not None:
                x = self.pre_norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        else:
            if self.pre_norm is not None:
                x = self.pre_norm(x)
            x = x.transpose(1, 2).reshape(-1, self.d_in, H, W)
        y = self.conv(x).flatten(2).transpose(1, 2)
        return self.post_norm(y) if self.post_norm is not None else y


def _down_params(p: DownsampleParams, c: BuildContext) -> int:
    d_in, d = _d_in(c), c.d_model
    n = d_in * d * p.kernel_size**2 + d
    return n + (d_in if p.norm == "pre" else 0) + (d if p.norm == "post" else 0)


def _down_check(p: DownsampleParams, c: BuildContext) -> None:
    H, W = _in_grid(c)
    if H <= 0:
        raise ValueError("downsample needs an image: model.image_size > 0")
    if p.pad() >= p.kernel_size:
        raise ValueError(f"padding {p.pad()} must be smaller than kernel_size {p.kernel_size}")
    h, w = conv_out(H, p), conv_out(W, p)
    if h < 1 or w < 1:
        raise ValueError(
            f"kernel_size {p.kernel_size} (stride {p.stride}, padding {p.pad()}) does not fit "
            f"the {H}x{W} token grid it reads"
        )


def _down_grid(p: DownsampleParams, c: BuildContext) -> tuple[int, int]:
    H, W = _in_grid(c)
    return conv_out(H, p), conv_out(W, p)


register(
    BlockKind(
        name="downsample",
        role="embedding",
        params=DownsampleParams,
        build=lambda p, c: Downsample(_d_in(c), c.d_model, _in_grid(c), p, _eps(c, 1e-6)),
        n_params=_down_params,
        flops=lambda p, c, L: 2.0 * _d_in(c) * p.kernel_size**2 * c.d_model,
        check=_down_check,
        paper=(
            "Yu et al., 2024, 'MetaFormer Baselines for Vision' (Downsampling); "
            "Maaz et al., 2022, 'EdgeNeXt'"
        ),
        summary="strided conv (+LayerNorm before/after): image or token grid -> coarser grid",
        extra={
            "flops_counts": "per output token",
            "out_grid": _down_grid,
            "out_shape": lambda p, c, shape: (
                shape[0],
                _down_grid(p, c)[0] * _down_grid(p, c)[1],
                c.d_model,
            ),
            "downsample": True,
        },
    )
)


# --------------------------------------------------------------------------- patch_merging


class PatchMergingParams(KindParams):
    """No options: the merge is always of 2×2 neighbourhoods (Swin)."""


class PatchMerging(nn.Module):
    """Swin's patch merging (Liu et al., 2021): the 2×2 neighbours ``x0 = (2i, 2j)``,
    ``x1 = (2i+1, 2j)``, ``x2 = (2i, 2j+1)``, ``x3 = (2i+1, 2j+1)`` concatenated in that order,
    LayerNorm over the ``4·d_in`` features, a bias-free linear map to ``d_out``.

    ``[batch, H·W, d_in] -> [batch, (H/2)·(W/2), d_out]`` (row-major over ``grid = (H, W)``).
    """

    def __init__(self, d_in: int, d_out: int, grid: tuple[int, int], eps: float) -> None:
        super().__init__()
        self.grid, self.d_in = grid, d_in
        self.norm = nn.LayerNorm(4 * d_in, eps=eps)
        self.reduction = nn.Linear(4 * d_in, d_out, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        H, W = self.grid
        g = x.reshape(-1, H, W, self.d_in)
        g = torch.cat([g[:, 0::2, 0::2], g[:, 1::2, 0::2], g[:, 0::2, 1::2], g[:, 1::2, 1::2]], -1)
        g = g.reshape(-1, (H // 2) * (W // 2), 4 * self.d_in)
        return self.reduction(self.norm(g))


def _merge_check(p: PatchMergingParams, c: BuildContext) -> None:
    g = grid_of(c)
    if g is None or getattr(c, "d_in", 0) <= 0:
        raise ValueError(
            "patch_merging merges tokens of a grid: use it as a layer group's downsample"
        )
    if g[0] % 2 or g[1] % 2:
        raise ValueError(f"patch_merging needs an even token grid, got {g[0]}x{g[1]}")


def _merge_grid(p: PatchMergingParams, c: BuildContext) -> tuple[int, int]:
    H, W = _in_grid(c)
    return H // 2, W // 2


register(
    BlockKind(
        name="patch_merging",
        role="embedding",
        params=PatchMergingParams,
        build=lambda p, c: PatchMerging(_d_in(c), c.d_model, _in_grid(c), _eps(c, 1e-5)),
        n_params=lambda p, c: 4 * _d_in(c) * 2 + 4 * _d_in(c) * c.d_model,
        flops=lambda p, c, L: 2.0 * 4 * _d_in(c) * c.d_model,
        check=_merge_check,
        paper="Liu et al., 2021, 'Swin Transformer: Hierarchical Vision Transformer using Shifted Windows'",
        summary="Swin patch merging: 2x2 tokens concatenated, LayerNorm, linear -> half the grid",
        extra={
            "flops_counts": "per output token",
            "out_grid": _merge_grid,
            "out_shape": lambda p, c, shape: (
                shape[0],
                _merge_grid(p, c)[0] * _merge_grid(p, c)[1],
                c.d_model,
            ),
            "downsample": True,
        },
    )
)
