"""Heads (role ``head``): the graph's exit.

* ``lm_head``: ``[batch, seq, d_model] -> logits [batch, seq, vocab_size]``; with
  ``tie_embeddings`` it reuses the token embedding matrix (Press & Wolf, 2017).
* ``classifier``: ``[batch, seq, d_model] -> logits [batch, n_classes]`` after mean, CLS
  (first position) or last-position pooling.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from archir.blocks.common import linear
from archir.registry import BlockKind, BuildContext, KindParams, register


class LMHeadParams(KindParams):
    tie_embeddings: bool = False


class LMHead(nn.Module):
    """Unembedding to vocabulary logits; tied to the embedding when ``tie`` is called."""

    def __init__(self, d: int, vocab: int, tied: bool) -> None:
        super().__init__()
        self.weight = None if tied else nn.Parameter(torch.randn(vocab, d) * 0.02)
        self._tied: list[nn.Module] = []  # plain list: not a registered submodule

    def tie(self, embedding: nn.Module) -> None:
        self._tied = [embedding]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self._tied[0].weight if self._tied else self.weight
        return nn.functional.linear(x, w)


class ClassifierParams(KindParams):
    pool: Literal["mean", "cls", "last"] = "mean"
    bias: bool = True


class Classifier(nn.Module):
    """Pool over the sequence, then a linear layer. ``[b, s, d] -> [b, n_classes]``."""

    def __init__(self, d: int, n_classes: int, pool: str, bias: bool) -> None:
        super().__init__()
        self.pool = pool
        self.fc = linear(d, n_classes, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.pool == "mean":
            h = x.mean(dim=1)
        elif self.pool == "cls":
            h = x[:, 0]
        else:
            h = x[:, -1]
        return self.fc(h)


def _check_lm(p: LMHeadParams, c: BuildContext) -> None:
    if c.vocab_size <= 0:
        raise ValueError("lm_head needs model.vocab_size > 0")


def _check_cls(p: ClassifierParams, c: BuildContext) -> None:
    if c.n_classes <= 0:
        raise ValueError("classifier needs model.n_classes > 0")


register(
    BlockKind(
        name="lm_head",
        role="head",
        params=LMHeadParams,
        build=lambda p, c: LMHead(c.d_model, c.vocab_size, p.tie_embeddings),
        n_params=lambda p, c: 0 if p.tie_embeddings else c.vocab_size * c.d_model,
        flops=lambda p, c, L: 2.0 * c.d_model * c.vocab_size,
        check=_check_lm,
        paper="Press & Wolf, 2017, 'Using the Output Embedding to Improve Language Models'",
        summary="logits over the vocabulary [b, s, d] -> [b, s, vocab]; optional tied embeddings",
        extra={"out_shape": lambda p, c, shape: (*shape[:2], c.vocab_size)},
    )
)
register(
    BlockKind(
        name="classifier",
        role="head",
        params=ClassifierParams,
        build=lambda p, c: Classifier(c.d_model, c.n_classes, p.pool, p.bias),
        n_params=lambda p, c: c.d_model * c.n_classes + (c.n_classes if p.bias else 0),
        flops=lambda p, c, L: 2.0 * c.d_model * c.n_classes / max(L, 1),
        check=_check_cls,
        paper="Dosovitskiy et al., 2021 (CLS pooling); Lin et al., 2014 (global average pooling)",
        summary="pooled classification logits [b, s, d] -> [b, n_classes]; pool mean/cls/last",
        extra={"out_shape": lambda p, c, shape: (shape[0], c.n_classes)},
    )
)
