"""Embeddings (role ``embedding``): the graph's entry.

* ``token_embedding``: ``tokens [batch, seq] (int64) -> [batch, seq, d_model]``, with optional
  learned or sinusoidal absolute positions.
* ``patch_embedding``: ``images [batch, channels, H, W] -> [batch, n_patches (+1), d_model]``
  (ViT; Dosovitskiy et al., 2021); without a CLS token the patches are an
  ``(H/p) × (W/p)`` grid (row-major) that 2-D token mixers read.

The stem of a vision hierarchy (a strided convolution) is ``downsample`` in
:mod:`archir.blocks.vision`.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from pydantic import Field
from torch import nn

from archir.blocks.common import tracing
from archir.registry import MAX_DIM, BlockKind, BuildContext, KindParams, register


class TokenEmbeddingParams(KindParams):
    pos: Literal["none", "learned", "sinusoidal"] = "none"


def sinusoidal(positions: torch.Tensor, d: int) -> torch.Tensor:
    """Sinusoidal position codes (Vaswani et al., 2017). ``[T] -> [T, d]``."""
    half = d // 2
    freq = torch.exp(
        -math.log(10000.0) * torch.arange(half, dtype=torch.float32, device=positions.device) / half
    )
    ang = positions.float()[:, None] * freq[None, :]
    out = torch.cat([ang.sin(), ang.cos()], dim=-1)
    if d % 2:
        out = torch.cat([out, torch.zeros_like(out[:, :1])], dim=-1)
    return out


class TokenEmbedding(nn.Module):
    """Token lookup table, plus absolute positions when ``pos`` is learned/sinusoidal.

    ``[batch, seq] int64 -> [batch, seq, d_model]``.
    """

    def __init__(self, vocab: int, d: int, max_len: int, pos: str) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(vocab, d) * 0.02)
        self.pos = pos
        self.d = d
        if pos == "learned":
            self.pos_weight = nn.Parameter(torch.randn(max_len, d) * 0.02)
        #: the most positions :meth:`step` can go to (learned positions end), else None
        self.decode_limit = max_len if pos == "learned" else None
        self.state_names = ("position",)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = nn.functional.embedding(tokens, self.weight)
        if self.pos == "learned":
            x = x + self.pos_weight[: tokens.shape[1]]
        elif self.pos == "sinusoidal":
            x = x + sinusoidal(torch.arange(tokens.shape[1], device=tokens.device), self.d)
        return x

    def init_state(
        self, batch: int, device: torch.device | None = None, dtype: torch.dtype | None = None
    ) -> tuple[torch.Tensor]:
        """The position ``pos []`` int64 of the next token."""
        return (torch.zeros((), dtype=torch.long, device=device),)

    def step(
        self, tokens: torch.Tensor, state: tuple[torch.Tensor]
    ) -> tuple[torch.Tensor, tuple[torch.Tensor]]:
        """``tokens [batch] int64 -> [batch, d_model]`` at position ``pos``.

        Raises:
            ValueError: learned positions past ``max_seq_len`` (eager mode).
        """
        (pos,) = state
        x = nn.functional.embedding(tokens, self.weight)
        if self.pos == "learned":
            if not tracing() and int(pos) >= self.pos_weight.shape[0]:
                raise ValueError(f"learned positions end at max_seq_len {self.pos_weight.shape[0]}")
            x = x + self.pos_weight.index_select(0, pos.reshape(1))
        elif self.pos == "sinusoidal":
            x = x + sinusoidal(pos.reshape(1), self.d)
        return x, (pos + 1,)


class PatchEmbeddingParams(KindParams):
    patch_size: int = Field(2, ge=1, le=MAX_DIM)
    cls_token: bool = False
    pos: Literal["none", "learned"] = "learned"


class PatchEmbedding(nn.Module):
    """Non-overlapping patches projected to ``d_model`` (Dosovitskiy et al., 2021, "An Image
    is Worth 16x16 Words"). ``[batch, C, H, W] -> [batch, (H/p)·(W/p) (+1 CLS), d_model]``."""

    def __init__(self, channels: int, d: int, image: int, patch: int, cls: bool, pos: str):
        super().__init__()
        self.proj = nn.Conv2d(channels, d, kernel_size=patch, stride=patch)
        n = (image // patch) ** 2 + (1 if cls else 0)
        self.cls = nn.Parameter(torch.zeros(1, 1, d)) if cls else None
        self.pos_weight = nn.Parameter(torch.randn(1, n, d) * 0.02) if pos == "learned" else None

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.proj(images).flatten(2).transpose(1, 2)
        if self.cls is not None:
            x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], dim=1)
        if self.pos_weight is not None:
            x = x + self.pos_weight
        return x


def _check_token(p: TokenEmbeddingParams, c: BuildContext) -> None:
    if c.vocab_size <= 0:
        raise ValueError("token_embedding needs model.vocab_size > 0")


def _n_patches(p: PatchEmbeddingParams, c: BuildContext) -> int:
    return (c.image_size // p.patch_size) ** 2


def _check_patch(p: PatchEmbeddingParams, c: BuildContext) -> None:
    if c.image_size <= 0:
        raise ValueError("patch_embedding needs model.image_size > 0")
    if c.image_size % p.patch_size:
        raise ValueError(f"patch_size {p.patch_size} does not divide image_size {c.image_size}")


register(
    BlockKind(
        name="token_embedding",
        role="embedding",
        params=TokenEmbeddingParams,
        build=lambda p, c: TokenEmbedding(c.vocab_size, c.d_model, c.max_seq_len, p.pos),
        n_params=lambda p, c: (
            c.vocab_size * c.d_model + (c.max_seq_len * c.d_model if p.pos == "learned" else 0)
        ),
        flops=lambda p, c, L: 0.0,
        check=_check_token,
        paper="Vaswani et al., 2017, 'Attention Is All You Need' (positions: learned or sinusoidal)",
        summary="token lookup table [batch, seq] -> [batch, seq, d_model]; pos none/learned/sinusoidal",
    )
)
register(
    BlockKind(
        name="patch_embedding",
        role="embedding",
        params=PatchEmbeddingParams,
        build=lambda p, c: PatchEmbedding(
            c.channels, c.d_model, c.image_size, p.patch_size, p.cls_token, p.pos
        ),
        n_params=lambda p, c: (
            c.channels * p.patch_size**2 * c.d_model
            + c.d_model
            + (c.d_model if p.cls_token else 0)
            + (
                (_n_patches(p, c) + (1 if p.cls_token else 0)) * c.d_model
                if p.pos == "learned"
                else 0
            )
        ),
        flops=lambda p, c, L: 2.0 * c.channels * p.patch_size**2 * c.d_model,
        check=_check_patch,
        paper="Dosovitskiy et al., 2021, 'An Image is Worth 16x16 Words'",
        summary="image patches -> tokens [batch, C, H, W] -> [batch, n_patches(+CLS), d_model]",
        extra={
            "out_shape": lambda p, c, shape: (
                shape[0],
                _n_patches(p, c) + (1 if p.cls_token else 0),
                c.d_model,
            ),
            # the patches form an (H/p) x (W/p) grid that 2-D mixers read; a CLS token
            # makes the tokens a sequence
            "out_grid": lambda p, c: (0, 0) if p.cls_token else (c.image_size // p.patch_size,) * 2,
        },
    )
)
