"""Multi-head softmax attention (role ``token_mixer``).

Vaswani et al., 2017, "Attention Is All You Need"; grouped-query heads from Ainslie et al.,
2023, "GQA"; RoPE from Su et al., 2021, "RoFormer"; ALiBi from Press et al., 2022, "Train
Short, Test Long"; sliding windows as in Beltagy et al., 2020, "Longformer".

Shapes: ``x [batch, seq, d_model] -> [batch, seq, d_model]``; ``head_dim = d_model / n_heads``.
Cost: FLOPs per token at length L = projections ``2·d·(2d + 2·kv_dim)`` plus scores and
values ``4·L·d`` (computed densely, as the kernel does; a window masks but does not skip).
Inference state: KV cache ``2 · n_kv_heads · head_dim · min(L, window) · 4`` bytes.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from archir.blocks.common import linear
from archir.registry import MAX_DIM, MAX_HIDDEN, BlockKind, BuildContext, KindParams, register


class AttentionParams(KindParams):
    n_heads: int = Field(4, ge=1, le=MAX_DIM)
    n_kv_heads: int | None = Field(None, ge=1, le=MAX_DIM)
    pos: Literal["rope", "alibi", "none"] = "rope"
    rope_base: float = Field(10000.0, gt=1)
    window: int | None = Field(None, ge=1, le=MAX_HIDDEN)
    causal: bool | None = None
    qkv_bias: bool = False


def rope_cos_sin(
    seq: int, head_dim: int, base: float, device: torch.device | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Real-valued rotary tables ``cos, sin: [seq, head_dim]`` (rotate-half layout)."""
    half = head_dim // 2
    inv = 1.0 / (base ** (torch.arange(half, dtype=torch.float32, device=device) / half))
    ang = torch.arange(seq, dtype=torch.float32, device=device)[:, None] * inv[None, :]
    ang = torch.cat([ang, ang], dim=-1)
    return ang.cos(), ang.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x [batch, heads, seq, head_dim]`` by position (sin/cos, no complex numbers)."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    rotated = torch.cat([-x2, x1], dim=-1)
    return x * cos + rotated * sin


def alibi_slopes(n_heads: int) -> torch.Tensor:
    """Per-head ALiBi slopes (geometric sequence, Press et al., 2022). ``[n_heads]``."""

    def pow2(n: int) -> list[float]:
        start = 2 ** (-(2 ** -(math.log2(n) - 3)))
        return [start * start**i for i in range(n)]

    if math.log2(n_heads).is_integer():
        vals = pow2(n_heads)
    else:
        closest = 2 ** math.floor(math.log2(n_heads))
        vals = pow2(closest) + pow2(2 * closest)[0::2][: n_heads - closest]
    return torch.tensor(vals, dtype=torch.float32)


class Attention(nn.Module):
    """Multi-head / grouped-query attention with RoPE, ALiBi or no positions.

    ``[batch, seq, d_model] -> [batch, seq, d_model]``.
    """

    state_names = ("KV cache keys", "KV cache values", "position")

    def __init__(self, d: int, p: AttentionParams, causal: bool) -> None:
        super().__init__()
        self.n_heads = p.n_heads
        self.n_kv = p.n_kv_heads or p.n_heads
        self.hd = d // p.n_heads
        self.pos = p.pos
        self.base = p.rope_base
        self.window = p.window
        self.causal = causal if p.causal is None else p.causal
        self.q = linear(d, d, bias=p.qkv_bias)
        self.k = linear(d, self.n_kv * self.hd, bias=p.qkv_bias)
        self.v = linear(d, self.n_kv * self.hd, bias=p.qkv_bias)
        self.o = linear(d, d, bias=False)
        if self.pos == "alibi":
            self.register_buffer("slopes", alibi_slopes(p.n_heads), persistent=False)

    def _mask(self, T: int, device: torch.device) -> torch.Tensor | None:
        if self.pos != "alibi" and self.window is None:
            return None
        i = torch.arange(T, device=device)[:, None]
        j = torch.arange(T, device=device)[None, :]
        allowed = torch.ones(T, T, dtype=torch.bool, device=device)
        if self.causal:
            allowed = allowed & (j <= i)
        if self.window is not None:
            allowed = allowed & ((i - j).abs() < self.window)
        bias = torch.zeros(T, T, device=device).masked_fill(~allowed, float("-inf"))
        if self.pos == "alibi":
            dist = (i - j).abs().float()
            bias = bias[None] - self.slopes[:, None, None] * dist[None]
        return bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.q(x).view(B, T, self.n_heads, self.hd).transpose(1, 2)
        k = self.k(x).view(B, T, self.n_kv, self.hd).transpose(1, 2)
        v = self.v(x).view(B, T, self.n_kv, self.hd).transpose(1, 2)
        if self.pos == "rope":
            cos, sin = rope_cos_sin(T, self.hd, self.base, x.device)
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if self.n_kv != self.n_heads:
            rep = self.n_heads // self.n_kv
            k = k.repeat_interleave(rep, dim=1)
            v = v.repeat_interleave(rep, dim=1)
        mask = self._mask(T, x.device)
        if mask is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.o(y.transpose(1, 2).reshape(B, T, -1))

    def init_state(
        self, batch: int, device: torch.device | None = None, dtype: torch.dtype | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """An empty KV cache: ``k, v [batch, n_kv_heads, 0, head_dim]`` and the position
        ``pos []`` int64 (tokens seen so far)."""
        if not self.causal:
            raise ValueError("bidirectional attention cannot decode one token at a time")
        k = torch.zeros(batch, self.n_kv, 0, self.hd, device=device, dtype=dtype)
        return k, k.clone(), torch.zeros((), dtype=torch.long, device=device)

    def step(
        self, x: torch.Tensor, state: tuple[torch.Tensor, torch.Tensor, torch.Tensor]
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """One token ``x [batch, d_model]`` at position ``pos`` against the KV cache ``k, v
        [batch, n_kv_heads, past, head_dim]``; returns ``y [batch, d_model]`` and the cache
        with this token appended (only the last ``window`` entries kept with a window), so
        ``past`` grows by one per token up to ``window``. Agrees with ``forward``."""
        k_c, v_c, pos = state
        B = x.shape[0]
        q = self.q(x).view(B, self.n_heads, 1, self.hd)
        k = self.k(x).view(B, self.n_kv, 1, self.hd)
        v = self.v(x).view(B, self.n_kv, 1, self.hd)
        if self.pos == "rope":
            half = self.hd // 2
            inv = 1.0 / (
                self.base ** (torch.arange(half, dtype=torch.float32, device=x.device) / half)
            )
            ang = pos.to(torch.float32) * inv
            ang = torch.cat([ang, ang], dim=-1)[None, :]  # [1, head_dim]
            cos, sin = ang.cos(), ang.sin()
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        k_c = torch.cat([k_c, k.to(k_c.dtype)], dim=2)
        v_c = torch.cat([v_c, v.to(v_c.dtype)], dim=2)
        if self.window is not None:
            k_c, v_c = k_c[:, :, -self.window :], v_c[:, :, -self.window :]
        keys, values = k_c, v_c
        if self.n_kv != self.n_heads:
            rep = self.n_heads // self.n_kv
            keys = keys.repeat_interleave(rep, dim=1)
            values = values.repeat_interleave(rep, dim=1)
        mask = None
        if self.pos == "alibi":
            past = keys.shape[2]
            dist = (past - 1 - torch.arange(past, device=x.device)).to(torch.float32)
            mask = (-self.slopes[:, None] * dist[None, :])[None, :, None, :]  # [1, H, 1, past]
        y = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask)
        return self.o(y.reshape(B, -1)), (k_c, v_c, pos + 1)


def _kv_dim(p: AttentionParams, c: BuildContext) -> int:
    return (p.n_kv_heads or p.n_heads) * (c.d_model // p.n_heads)


def _check(p: AttentionParams, c: BuildContext) -> None:
    if c.d_model % p.n_heads:
        raise ValueError(f"n_heads {p.n_heads} does not divide d_model {c.d_model}")
    if p.n_kv_heads is not None and p.n_heads % p.n_kv_heads:
        raise ValueError(f"n_kv_heads {p.n_kv_heads} does not divide n_heads {p.n_heads}")
    if p.pos == "rope" and (c.d_model // p.n_heads) % 2:
        raise ValueError(f"rope needs an even head_dim, got {c.d_model // p.n_heads}")


def _params(p: AttentionParams, c: BuildContext) -> int:
    d, kv = c.d_model, _kv_dim(p, c)
    n = d * d + 2 * d * kv + d * d
    if p.qkv_bias:
        n += d + 2 * kv
    return n


def _flops(p: AttentionParams, c: BuildContext, L: int) -> float:
    d, kv = c.d_model, _kv_dim(p, c)
    return 2.0 * d * (2 * d + 2 * kv) + 4.0 * L * d


def _state(p: AttentionParams, c: BuildContext, L: int) -> int:
    ctx = min(L, p.window) if p.window else L
    return 2 * _kv_dim(p, c) * ctx * 4


register(
    BlockKind(
        name="attention",
        role="token_mixer",
        params=AttentionParams,
        build=lambda p, c: Attention(c.d_model, p, c.causal),
        n_params=_params,
        flops=_flops,
        state_bytes=_state,
        check=_check,
        paper="Vaswani et al., 2017, 'Attention Is All You Need' (+ GQA, RoPE, ALiBi, windows)",
        summary="multi-head softmax attention; causal/bidirectional, rope/alibi/none, GQA, window",
    )
)
