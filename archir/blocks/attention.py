"""Multi-head softmax attention (role ``token_mixer``).

Vaswani et al., 2017, "Attention Is All You Need"; grouped-query heads from Ainslie et al.,
2023, "GQA"; RoPE from Su et al., 2021, "RoFormer"; ALiBi from Press et al., 2022, "Train
Short, Test Long"; sliding windows as in Beltagy et al., 2020, "Longformer".

Shapes: ``x [batch, seq, d_model] -> [batch, seq, d_model]``; ``head_dim`` defaults to
``d_model / n_heads`` (``q_dim = n_heads·head_dim``, ``kv_dim = n_kv_heads·head_dim``).
Cost: FLOPs per token at length L = projections ``2·d·(2·q_dim + 2·kv_dim)`` plus scores and
values ``4·L·q_dim`` (counted densely; a window masks but does not skip). The exported
graph of a causal attention scores only about half of the pairs past
:data:`CHUNK_MIN_LEN` positions (:func:`causal_attention`, :func:`exported_scores`), as
eager torch's fused kernel does.
Inference state: KV cache ``2 · n_kv_heads · head_dim · min(L, window) · 4`` bytes.

Options the published model families need (Hugging Face names in brackets):

* ``qkv_bias`` / ``out_bias``: biases on the q, k, v and on the output projection (GPT-2 has
  both; Qwen2 only the first) [``attention_bias``, ``c_attn``/``c_proj`` biases].
* ``head_dim`` independent of ``d_model / n_heads`` [``head_dim``].
* ``rotary_dim``: rotate only the first ``rotary_dim`` channels of each head, pass the rest
  through (GPT-NeoX ``rotary_pct``, Phi ``partial_rotary_factor``, GPT-J ``rotary_dim``).
* ``rope_interleaved``: rotate adjacent pairs ``(x₂ᵢ, x₂ᵢ₊₁)`` (GPT-J and Meta's original
  layout) instead of the two halves ``(xᵢ, xᵢ₊d/2)`` (GPT-NeoX, Hugging Face Llama).
* ``rope_scaling``: position interpolation (``linear``: frequencies ÷ ``factor``; Chen et
  al., 2023) or Llama 3's frequency-dependent rule (``llama3``: wavelengths longer than
  ``original_max_seq_len / low_freq_factor`` ÷ ``factor``, shorter than
  ``original_max_seq_len / high_freq_factor`` kept, a smooth blend between).
"""

from __future__ import annotations

import contextlib
import math
import threading
from collections.abc import Iterator
from typing import ClassVar, Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from archir.blocks.common import check_heads, linear
from archir.registry import MAX_DIM, MAX_HIDDEN, BlockKind, BuildContext, KindParams, register


class AttentionParams(KindParams):
    n_heads: int = Field(4, ge=1, le=MAX_DIM)
    n_kv_heads: int | None = Field(None, ge=1, le=MAX_DIM)
    pos: Literal["rope", "alibi", "none"] = "rope"
    rope_base: float = Field(10000.0, gt=1)
    window: int | None = Field(None, ge=1, le=MAX_HIDDEN)
    causal: bool | None = None
    qkv_bias: bool = False
    out_bias: bool = False
    head_dim: int | None = Field(None, ge=1, le=MAX_DIM)
    rotary_dim: int | None = Field(None, ge=2, le=MAX_DIM)
    rope_interleaved: bool = False
    rope_scaling: RopeScaling | None = None

    added_later: ClassVar[frozenset[str]] = frozenset(
        {"out_bias", "head_dim", "rotary_dim", "rope_interleaved", "rope_scaling"}
    )


class RopeScaling(KindParams):
    """Rotary frequency scaling for contexts longer than trained (see the module docstring).

    ``type``: ``linear`` (every frequency ÷ ``factor``) or ``llama3``; ``low_freq_factor``,
    ``high_freq_factor`` and ``original_max_seq_len`` (tokens) are Llama 3's.
    """

    type: Literal["linear", "llama3"]
    factor: float = Field(gt=0, le=1e6)
    low_freq_factor: float = Field(1.0, gt=0)
    high_freq_factor: float = Field(4.0, gt=0)
    original_max_seq_len: int = Field(8192, ge=1, le=1 << 30)


AttentionParams.model_rebuild()


def rope_inv_freq(
    rot_dim: int,
    base: float,
    scaling: RopeScaling | None = None,
    device: torch.device | None = None,
) -> torch.Tensor:
    """Rotary frequencies ``base^(−2i/rot_dim)``, ``i < rot_dim/2`` (radians per position),
    after ``scaling``. ``[rot_dim/2]`` float32."""
    half = rot_dim // 2
    inv = 1.0 / (base ** (torch.arange(half, dtype=torch.float32, device=device) / half))
    if scaling is None:
        return inv
    if scaling.type == "linear":
        return inv / scaling.factor
    # Llama 3 (Meta's reference apply_scaling): long wavelengths ÷ factor, short kept
    old = float(scaling.original_max_seq_len)
    lo, hi = scaling.low_freq_factor, scaling.high_freq_factor
    wavelen = 2 * math.pi / inv
    scaled = torch.where(wavelen > old / lo, inv / scaling.factor, inv)
    smooth = (old / wavelen - lo) / (hi - lo) if hi != lo else torch.zeros_like(inv)
    blended = (1 - smooth) * scaled / scaling.factor + smooth * scaled
    medium = (wavelen >= old / hi) & (wavelen <= old / lo)
    return torch.where(medium, blended, scaled)


def rope_cos_sin(
    positions: torch.Tensor | int,
    rot_dim: int,
    base: float,
    device: torch.device | None = None,
    scaling: RopeScaling | None = None,
    interleaved: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Real-valued rotary tables ``cos, sin: [seq, rot_dim]`` for ``positions`` (a ``[seq]``
    tensor, or a length ``seq`` — an int, or a 0-d tensor while tracing — for ``0..seq−1``):
    each frequency written twice, as ``(f₀..fₕ, f₀..fₕ)`` (rotate-half layout) or
    ``(f₀, f₀, f₁, f₁, …)`` (interleaved; a constant gather, so the graph keeps a dynamic
    sequence axis)."""
    # a length may also be a SymInt (torch.export's non-strict capture passes the symbolic
    # sequence length): without it that capture failed and torch.onnx fell back to the
    # slower strict one (~25 % of an attention block's export time)
    if isinstance(positions, (int, torch.SymInt)) or positions.dim() == 0:
        positions = torch.arange(positions, dtype=torch.float32, device=device)
    inv = rope_inv_freq(rot_dim, base, scaling, device)
    if interleaved:
        inv = inv[torch.tensor([i // 2 for i in range(rot_dim)], device=device)]
    else:
        inv = torch.cat([inv, inv])
    ang = positions.to(torch.float32)[:, None] * inv[None, :]
    return ang.cos(), ang.sin()


def apply_rope(
    x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool = False
) -> torch.Tensor:
    """Rotate ``x [batch, heads, seq, head_dim]`` by position (sin/cos, no complex numbers).
    With ``cos, sin [seq, rot_dim]`` narrower than ``head_dim`` only the first ``rot_dim``
    channels rotate (partial rotary); the rest pass through."""
    rd = cos.shape[-1]
    xr = x[..., :rd] if rd < x.shape[-1] else x
    if interleaved:  # pairs (x0, x1), (x2, x3) ... -> (-x1, x0), (-x3, x2) ...: one gather
        idx = torch.tensor([i ^ 1 for i in range(rd)], device=x.device)  # 1, 0, 3, 2, ...
        sign = torch.tensor([(-1.0) ** (i + 1) for i in range(rd)], dtype=x.dtype, device=x.device)
        rotated = xr.index_select(-1, idx) * sign
    else:
        half = rd // 2
        rotated = torch.cat([-xr[..., half:], xr[..., :half]], dim=-1)
    out = xr * cos + rotated * sin
    return torch.cat([out, x[..., rd:]], dim=-1) if rd < x.shape[-1] else out


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

    def __init__(self, d: int, p: AttentionParams, causal: bool, max_len: int = 2048) -> None:
        super().__init__()
        self.max_len = max_len
        self.n_heads = p.n_heads
        self.n_kv = p.n_kv_heads or p.n_heads
        self.hd = _head_dim(p, d)
        self.pos = p.pos
        self.base = p.rope_base
        self.rot = p.rotary_dim or self.hd
        self.interleaved = p.rope_interleaved
        self.scaling = p.rope_scaling
        self.window = p.window
        self.causal = causal if p.causal is None else p.causal
        q_dim = p.n_heads * self.hd
        self.q = linear(d, q_dim, bias=p.qkv_bias)
        self.k = linear(d, self.n_kv * self.hd, bias=p.qkv_bias)
        self.v = linear(d, self.n_kv * self.hd, bias=p.qkv_bias)
        self.o = linear(q_dim, d, bias=p.out_bias)
        if self.pos == "alibi":
            self.register_buffer("slopes", alibi_slopes(p.n_heads), persistent=False)

    def _rope(
        self, positions: torch.Tensor | int, device: torch.device
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return rope_cos_sin(positions, self.rot, self.base, device, self.scaling, self.interleaved)

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
            cos, sin = self._rope(T, x.device)
            q, k = (
                apply_rope(q, cos, sin, self.interleaved),
                apply_rope(k, cos, sin, self.interleaved),
            )
        if self.n_kv != self.n_heads:
            rep = self.n_heads // self.n_kv
            k = k.repeat_interleave(rep, dim=1)
            v = v.repeat_interleave(rep, dim=1)
        mask = self._mask(T, x.device)
        if self.causal and torch.compiler.is_exporting():
            # archir's exporter (chunked_causal_attention) knows how to write the operation
            if getattr(_CHUNKED, "on", False):
                return self.o(
                    causal_attention(q, k, v, mask, self.hd**-0.5, self.max_len, self.window or 0)
                )
            if mask is None:
                # a plain torch.onnx.export lowers is_causal to a Trilu of ones, an Equal, a
                # Where and an Expand per layer (2.1 ms of 16 per layer at T 1,024 in
                # onnxruntime); an additive -inf upper triangle is one Trilu
                mask = torch.full((T, T), float("-inf"), device=x.device).triu(1)
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
            cos, sin = self._rope(pos.reshape(1), x.device)  # [1, rot_dim]
            q, k = (
                apply_rope(q, cos, sin, self.interleaved),
                apply_rope(k, cos, sin, self.interleaved),
            )
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


_CHUNKED = threading.local()


@contextlib.contextmanager
def chunked_causal_attention() -> Iterator[None]:
    """While active (on this thread), a causal attention captured by ``torch.export``
    calls :func:`causal_attention`, which only an exporter given its translation can write
    (``exporters.graph.export_graph`` is: it enters this). Outside it, a plain
    ``torch.onnx.export`` of an archir model lowers SDPA itself, as before."""
    before = getattr(_CHUNKED, "on", False)
    _CHUNKED.on = True
    try:
        yield
    finally:
        _CHUNKED.on = before


#: Exported causal attention (:func:`causal_attention`): up to this many positions the
#: exported graph scores every query against every key; past it, in query chunks
#: (:data:`CHUNK_FORMS`), each against only the keys it may see (chosen by ONNX ``If``
#: nodes on the length).
CHUNK_MIN_LEN = 192
#: query chunks of the exported causal attention past :data:`CHUNK_MIN_LEN` positions
N_CHUNKS = 8
#: ``(past this many positions, chunks)``: the exported causal attention's chunk counts
#: (onnxruntime, 1 thread, one layer ``[1, 4, T, 16]``: 8 chunks 3.41 / 14.6 / 71.6 ms at T
#: 1,024 / 2,048 / 4,096, 16 chunks 3.19 / 13.0 / 65.0; at 256-512 8 are faster; 4 layers
#: at d_model 128 past 2,048 with each chunk's mask a slice of one band, 32 chunks 373 ms
#: at 4,096 against 16's 408 (eager 382), 64 no faster)
CHUNK_FORMS: tuple[tuple[int, int], ...] = ((CHUNK_MIN_LEN, N_CHUNKS), (1024, 16), (2048, 32))


def chunk_forms(max_len: int) -> list[tuple[int, int]]:
    """The ``(past this many positions, chunks)`` forms of :data:`CHUNK_FORMS` a model of
    ``max_seq_len`` ``max_len`` reaches (none: it never goes past :data:`CHUNK_MIN_LEN`)."""
    return [(lo, n) for lo, n in CHUNK_FORMS if max_len > lo]


def chunks_at(max_len: int, seq: int) -> int:
    """Query chunks of the exported causal attention at length ``seq`` (1: every score)."""
    return max([n for lo, n in chunk_forms(max_len) if seq > lo], default=1)


@torch.library.custom_op("archir::causal_attention", mutates_args=())
def causal_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None,
    scale: float,
    max_len: int,
    window: int = 0,
) -> torch.Tensor:
    """Causal softmax attention as one operation of an exported graph: ``q, k, v [batch,
    heads, seq, head_dim] -> [batch, seq, heads·head_dim]`` (heads merged); the values of
    ``scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)``, or with an
    additive ``mask [seq, seq]`` / ``[heads, seq, seq]`` (ALiBi, a window; ``-inf`` at least
    on every future key) ``..., attn_mask=mask``.

    Used under :func:`chunked_causal_attention` (archir's exporter). torch.export keeps it
    whole, and :mod:`exporters.causal_attention` writes it into ONNX: up to
    :data:`CHUNK_MIN_LEN` positions every score; past it (only when ``max_len``, the
    model's ``max_seq_len``, goes past it) the queries in ``n`` chunks (8; 16 past 1,024
    positions, 32 past 2,048: :data:`CHUNK_FORMS`), each scoring only the keys it may see —
    ``(n+1)/(2n)`` of the ``seq²`` scores (0.56 at 8) — and with a sliding ``window`` (0:
    none; ``mask`` then holds it) none before the window of its first query either.

    onnxruntime has no CPU attention kernel that skips the masked half (its ``Attention``,
    ``MultiHeadAttention`` and ``GroupQueryAttention`` compute them all); eager torch's SDPA
    does. One layer, 4 heads of 16, T 1,024, 1 thread: eager 3.8 ms, every score 6.6 ms,
    8 chunks 3.4 ms."""
    if mask is None:
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
    else:
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
    return y.transpose(1, 2).flatten(2)


@causal_attention.register_fake
def _(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None,
    scale: float,
    max_len: int,
    window: int = 0,
) -> torch.Tensor:
    B, H, T, hd = q.shape
    return q.new_empty(B, T, H * hd)


def exported_scores(p: AttentionParams, c: BuildContext, seq: int) -> int:
    """Score elements per head (query-key pairs) the exported graph computes at length
    ``seq``: ``seq²``, or in query chunks (:func:`chunks_at`, :func:`causal_attention`) for a
    causal attention (ALiBi and windows included; a window's chunks skip the keys before it)
    in a model whose ``max_seq_len`` goes past :data:`CHUNK_MIN_LEN`, at a length past it.
    ``c`` is the block's build context (``p.causal`` overrides its ``causal``)."""
    if not (c.causal if p.causal is None else p.causal):
        return seq * seq
    n = chunks_at(c.max_seq_len, seq)
    if n == 1:
        return seq * seq
    size = -(-seq // n)  # rows per chunk
    w = p.window or seq
    return sum(
        min(size, max(0, seq - i * size)) * (min((i + 1) * size, seq) - max(0, i * size - w + 1))
        for i in range(n)
    )


def _head_dim(p: AttentionParams, d_model: int) -> int:
    return p.head_dim or d_model // p.n_heads


def _kv_dim(p: AttentionParams, c: BuildContext) -> int:
    return (p.n_kv_heads or p.n_heads) * _head_dim(p, c.d_model)


def _check(p: AttentionParams, c: BuildContext) -> None:
    if p.head_dim is None:
        check_heads(p.n_heads, d_model=c.d_model)
    if p.n_kv_heads is not None and p.n_heads % p.n_kv_heads:
        raise ValueError(f"n_kv_heads {p.n_kv_heads} does not divide n_heads {p.n_heads}")
    hd = _head_dim(p, c.d_model)
    rot = p.rotary_dim or hd
    if p.rotary_dim is not None and (p.pos != "rope" or p.rotary_dim > hd):
        raise ValueError(f"rotary_dim {p.rotary_dim} needs pos: rope and at most head_dim {hd}")
    if p.pos == "rope" and rot % 2:
        what = "rotary_dim" if p.rotary_dim else "head_dim"
        raise ValueError(f"rope needs an even {what}, got {rot}")


def _params(p: AttentionParams, c: BuildContext) -> int:
    d, kv = c.d_model, _kv_dim(p, c)
    q = p.n_heads * _head_dim(p, d)
    n = d * q + 2 * d * kv + q * d
    if p.qkv_bias:
        n += q + 2 * kv
    if p.out_bias:
        n += d
    return n


def _flops(p: AttentionParams, c: BuildContext, L: int) -> float:
    d, kv = c.d_model, _kv_dim(p, c)
    q = p.n_heads * _head_dim(p, d)
    return 2.0 * d * (2 * q + 2 * kv) + 4.0 * L * q


def _state(p: AttentionParams, c: BuildContext, L: int) -> int:
    ctx = min(L, p.window) if p.window else L
    return 2 * _kv_dim(p, c) * ctx * 4


register(
    BlockKind(
        name="attention",
        role="token_mixer",
        params=AttentionParams,
        build=lambda p, c: Attention(c.d_model, p, c.causal, c.max_seq_len),
        n_params=_params,
        flops=_flops,
        state_bytes=_state,
        check=_check,
        paper="Vaswani et al., 2017, 'Attention Is All You Need' (+ GQA, RoPE, ALiBi, windows)",
        summary="multi-head softmax attention; causal/bidirectional, rope/alibi/none, GQA, window",
        state_grows=True,
        flops_exact=True,
    )
)
