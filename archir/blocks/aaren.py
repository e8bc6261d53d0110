"""Attention as an RNN (role ``token_mixer``): the Aaren block, kind ``aaren``.

Feng, Tung, Hajimirsadeghi, Bengio & Ahmed, 2024, "Attention as an RNN" (arXiv 2405.13956).
Aaren is softmax attention whose query is a *learned token* ``q`` (input-independent), read
out at every prefix: per head, with scores ``s_i = q·k_i / sqrt(head_dim)``,

    ``o_t = Σ_{i≤t} exp(s_i) v_i / Σ_{i≤t} exp(s_i)``.

The paper computes it as a many-to-many RNN over ``(m_t, u_t, w_t)`` = (running maximum of
the scores, ``Σ_{i≤t} exp(s_i − m_t)``, ``Σ_{i≤t} exp(s_i − m_t) v_i``) whose combination
``(m_a, u_a, w_a) ⊕ (m_b, u_b, w_b) = (m, u_a e^{m_a−m} + u_b e^{m_b−m}, w_a e^{m_a−m} +
w_b e^{m_b−m})``, ``m = max(m_a, m_b)``, is associative, so ``o_t = w_t / u_t`` for every
prefix comes from a parallel prefix scan (training) and decoding carries a constant-size state
(:meth:`Aaren.step`).

``forward`` evaluates the same prefix combination in chunks (:func:`aaren_scan`): within a
chunk of ``Q`` steps the combination of every prefix is a masked ``[Q, Q]`` matrix of
``exp(s_i − m_t) ≤ 1`` times the values (matmuls), and the chunk totals are combined between
chunks through an ``[n_chunks, n_chunks]`` matrix of the same form. Every exponent is a score
minus a running maximum that covers it, so nothing overflows for any score (±80 and beyond in
fp32); the maxima are masked reductions (``ReduceMax``), not ``cummax`` (which the ONNX
exporters do not express), and there is no loop over time steps: the ONNX export keeps a
dynamic sequence axis.

Layout and simplifications (the paper specifies Aaren as a drop-in replacement of a
Transformer's attention, keeping the rest of the stack): ``n_heads`` heads of ``head_dim``
channels, one learned query token per head (``[n_heads, head_dim]``, initialized N(0, 1)),
linear key and value projections ``d_model -> n_heads·head_dim`` and an output projection
back to ``d_model`` as in multi-head attention; no normalisation inside the block (the
model's pre-norm and residual wrap it), no positional encoding (the paper uses none for
Aaren's scores). Causal only, as in the paper.

Cost conventions: FLOPs per token at length ``L`` are the matmul-class work ``forward`` does
(key/value/output projections, the score ``k·q``, the chunked prefix matmuls at the padded
length with the denominator carried as an extra value column; a multiply-add is 2 FLOPs) —
exactly what ``torch.utils.flop_counter`` counts; state bytes are the fixed decode state
``(m, u, w)`` in fp32: ``n_heads·(head_dim + 2)`` numbers.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from archir.blocks.common import check_heads, linear, tracing
from archir.registry import MAX_DIM, BlockKind, BuildContext, KindParams, register

State = tuple[torch.Tensor, ...]

#: Longest chunk of the chunked form. Eagerly a length ``T`` is cut into ``⌈T/CHUNK⌉``
#: chunks of ``⌈T/⌈T/CHUNK⌉⌉`` steps (the least padding); under graph capture
#: (``torch.export``, the ONNX exporters) every chunk has CHUNK steps, whatever the
#: (symbolic) length.
CHUNK = 64


def chunking(T: int, capture: bool = False) -> tuple[int, int]:
    """``(chunk, n_chunks)`` the chunked form uses at length ``T`` (see :data:`CHUNK`)."""
    if capture:
        return CHUNK, (T + CHUNK - 1) // CHUNK
    nc = max(1, -(-T // CHUNK))
    return max(1, -(-T // nc)), nc


def _masked_max(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``out[..., t] = max_{i: mask[t, i]} x[..., i]`` for ``x [..., n]``, ``mask [n, n]``
    (every row of ``mask`` selects at least one entry)."""
    return torch.where(mask, x[..., None, :], -math.inf).amax(-1)


def aaren_scan(s: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Softmax over every prefix: ``o_t = Σ_{i≤t} exp(s_i) v_i / Σ_{i≤t} exp(s_i)``.

    Args:
        s: ``[B, T, H]`` scores per head (any finite values).
        v: ``[B, T, H, P]`` values per head.

    Returns:
        ``o [B, T, H, P]``.

    Within each chunk of ``Q`` steps: the local running maximum ``l_t = max_{i≤t} s_i``
    (masked max) and ``(w, u)_t = Σ_{i≤t} exp(s_i − l_t)·(v_i, 1)`` (a masked ``[Q, Q]``
    matrix times the values with a column of ones); chunk totals ``(w, u)`` at the chunk
    maximum ``c_j`` are combined for every chunk end against the running maximum over chunks
    ``M_c`` (``[n_chunks, n_chunks]`` matrix ``exp(c_j − M_c)``, ``j ≤ c``); step ``t`` of
    chunk ``c`` adds the state that entered it: with ``m_t = max(M_{c−1}, l_t)``,
    ``(w, u)_t ← exp(l_t − m_t)(w, u)_t + exp(M_{c−1} − m_t)(W, U)_{c−1}``. Every exponent is
    ≤ 0. The maxima are treated as constants by autograd (the ratio does not depend on them),
    so gradients are those of the exact softmax.
    """
    T, P = v.shape[1], v.shape[-1]
    capture = tracing()
    Q, nc = chunking(T, capture)
    pad = nc * Q - T
    # [s, v, 1] per step and head: the score, the values and a column of ones that carries
    # the softmax denominator through the same matmuls
    sv = torch.cat([s[..., None], v, torch.ones_like(v[..., :1])], dim=-1)
    if capture or pad:  # padded steps come after every real one: causal, never read
        sv = F.pad(sv, (0, 0, 0, 0, 0, pad))
    sv = sv.unflatten(1, (nc, Q)).permute(0, 3, 1, 2, 4)  # [B, H, nc, Q, P+2]
    s, vv = sv[..., 0], sv[..., 1:]  # [B, H, nc, Q], [B, H, nc, Q, P+1]
    idx = torch.arange(Q, device=s.device)
    causal = idx[:, None] >= idx[None, :]  # [t, i]: i ≤ t
    lm = _masked_max(s.detach(), causal)  # [B, H, nc, Q]: running max within the chunk
    logits = torch.where(causal, s[..., None, :] - lm[..., None], -math.inf)
    acc = torch.matmul(torch.exp(logits), vv)  # [B, H, nc, Q, P+1] relative to lm
    if capture or nc > 1:
        cm = lm[..., -1]  # [B, H, nc]: chunk maxima
        cidx = torch.arange(nc, device=s.device)
        ctril = cidx[:, None] >= cidx[None, :]
        M = _masked_max(cm, ctril)  # [B, H, nc]: running max over chunks (inclusive)
        E = torch.exp(torch.where(ctril, cm[..., None, :] - M[..., None], -math.inf))
        ends = torch.matmul(E, acc[..., -1, :])  # [B, H, nc, P+1]: totals relative to M
        # the state entering chunk c is chunk c−1's end (none enters the first chunk)
        M_in = F.pad(M, (1, 0), value=-math.inf)[..., :nc]
        W_in = F.pad(ends, (0, 0, 1, 0))[..., :nc, :]
        m = torch.maximum(M_in[..., None], lm)  # [B, H, nc, Q]
        acc = (
            torch.exp(lm - m)[..., None] * acc
            + torch.exp(M_in[..., None] - m)[..., None] * W_in[..., None, :]
        )
    o = acc[..., :P] / acc[..., P:]
    o = o.permute(0, 2, 3, 1, 4).flatten(1, 2)  # [B, nc·Q, H, P]
    return o[:, :T] if capture or pad else o


def aaren_scan_flops(L: int, H: int, P: int) -> int:
    """Matmul FLOPs of :func:`aaren_scan` over one sequence of length ``L`` (eager chunking,
    padding included): the masked in-chunk matrix times ``[v, 1]`` (2·Q·(P+1) per step and
    head) and, with more than one chunk, the combination of chunk totals (2·nc·(P+1) per
    chunk and head)."""
    Q, nc = chunking(max(L, 1))
    total = 2 * H * nc * Q * Q * (P + 1)
    if nc > 1:
        total += 2 * H * nc * nc * (P + 1)
    return total


class AarenParams(KindParams):
    n_heads: int = Field(4, ge=1, le=MAX_DIM)
    head_dim: int | None = Field(None, ge=1, le=MAX_DIM)
    bias: bool = False


def _dims(p: AarenParams, d: int) -> tuple[int, int]:
    """``(n_heads, head_dim)``."""
    return p.n_heads, p.head_dim if p.head_dim is not None else d // p.n_heads


class Aaren(nn.Module):
    """Aaren token mixer (Feng et al., 2024, "Attention as an RNN"): ``[B, T, d] -> [B, T, d]``.

    Per head ``h``: keys ``k = W_k x`` and values ``v = W_v x`` (``[B, T, H, P]``), scores
    ``s_t = q_h·k_t / sqrt(P)`` against the learned query token ``q_h``, the causal softmax
    over every prefix (:func:`aaren_scan`), then ``out_proj`` over the ``H·P`` concatenated
    heads. Decoding state ``(m [B, H], u [B, H], w [B, H, P])``: the running maximum, the
    softmax denominator and the numerator relative to it; all zeros is the empty state
    (``u = 0`` marks it, as the ONNX decode graph starts every state from zeros).
    """

    def __init__(self, d: int, p: AarenParams) -> None:
        super().__init__()
        H, P = _dims(p, d)
        self.H, self.P, self.scale = H, P, 1.0 / math.sqrt(P)
        self.q = nn.Parameter(torch.randn(H, P, 1))
        self.k_proj = linear(d, H * P, bias=p.bias)
        self.v_proj = linear(d, H * P, bias=p.bias)
        self.out_proj = linear(H * P, d, bias=p.bias)

    def _scores(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``x [..., d] -> (s [..., H], v [..., H, P])``."""
        lead = x.shape[:-1]  # (not unflatten: TorchScript would fix the batch size)
        k = self.k_proj(x).reshape(*lead, self.H, 1, self.P)
        s = torch.matmul(k, self.q)[..., 0, 0] * self.scale
        return s, self.v_proj(x).reshape(*lead, self.H, self.P)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s, v = self._scores(x)
        return self.out_proj(aaren_scan(s, v).flatten(-2))

    def init_state(
        self, batch: int, device: torch.device | None = None, dtype: torch.dtype | None = None
    ) -> State:
        m = torch.zeros(batch, self.H, device=device, dtype=dtype)
        u = torch.zeros(batch, self.H, device=device, dtype=dtype)
        w = torch.zeros(batch, self.H, self.P, device=device, dtype=dtype)
        return (m, u, w)

    def step(self, x: torch.Tensor, state: State) -> tuple[torch.Tensor, State]:
        """One token: ``x [B, d]`` and ``(m, u, w)`` -> ``y [B, d]`` and the next state (the
        paper's RNN cell: ``m' = max(m, s)``, ``u' = u e^{m−m'} + e^{s−m'}``,
        ``w' = w e^{m−m'} + e^{s−m'} v``, ``o = w'/u'``)."""
        m, u, w = state
        s, v = self._scores(x)
        m = torch.where(u > 0, m, s)  # empty state: its maximum is the first score
        mn = torch.maximum(m, s)
        a, b = torch.exp(m - mn), torch.exp(s - mn)
        u = u * a + b
        w = w * a[..., None] + b[..., None] * v
        y = self.out_proj((w / u[..., None]).flatten(-2))
        return y, (mn, u, w)


def _check(p: AarenParams, c: BuildContext) -> None:
    if p.head_dim is None:
        check_heads(p.n_heads, d_model=c.d_model)


def _n_params(p: AarenParams, c: BuildContext) -> int:
    d = c.d_model
    H, P = _dims(p, d)
    hp = H * P
    return H * P + 3 * d * hp + (2 * hp + d if p.bias else 0)


def _flops(p: AarenParams, c: BuildContext, L: int) -> float:
    d = c.d_model
    H, P = _dims(p, d)
    L = max(L, 1)
    dense = 2 * d * 2 * H * P + 2 * H * P + 2 * H * P * d  # k, v; k·q; out_proj
    return (dense * L + aaren_scan_flops(L, H, P)) / L


def _state_bytes(p: AarenParams, c: BuildContext, L: int) -> int:
    H, P = _dims(p, c.d_model)
    return 4 * H * (P + 2)


register(
    BlockKind(
        name="aaren",
        role="token_mixer",
        params=AarenParams,
        build=lambda p, c: Aaren(c.d_model, p),
        n_params=_n_params,
        flops=_flops,
        state_bytes=_state_bytes,
        check=_check,
        paper=(
            "Feng, Tung, Hajimirsadeghi, Bengio & Ahmed, 2024, 'Attention as an RNN' "
            "(arXiv 2405.13956, Aaren)"
        ),
        summary="Aaren: softmax attention of a learned query over every prefix, as an RNN",
        recurrent=True,
        flops_exact=True,
    )
)
