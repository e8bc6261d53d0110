"""Recurrent token mixers with a parallel form and a step form (role ``token_mixer``, plus the
RWKV channel mixer).

Kinds: ``linear_attention`` (Katharopoulos et al., 2020), ``gla`` (Yang et al., 2024),
``retnet`` (Sun et al., 2023), ``rwkv`` time mixing and ``rwkv_cmix`` channel mixing
(Peng et al., 2023, RWKV-4).

Every module maps ``x [batch, seq, d_model] -> [batch, seq, d_model]`` in ``forward`` with a
fully parallel form: an ``L×L`` causally masked matrix, or for GLA and RWKV the chunked
equivalent (decays enter as ``exp`` of masked log-decay differences, so nothing overflows),
with no loop over time steps and no complex numbers, so ``torch.onnx.export`` with a dynamic
sequence axis works. Each also provides
``init_state(batch, device=None, dtype=None)`` and ``step(x_t [batch, d_model], state) ->
(y_t [batch, d_model], state)``; stepping through a sequence reproduces ``forward``.

Cost conventions: FLOPs per token at length ``L`` count the parallel form as ``forward``
computes it (dense ``L×L`` or chunked products; a multiply-add is 2 FLOPs, ``exp`` not
counted); state bytes are the fixed recurrent state of the step form in fp32 (independent
of ``L``).
"""

from __future__ import annotations

import math
from typing import ClassVar, Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from archir.blocks.common import carry_in, check_heads, hidden_size, init_linear, tracing
from archir.registry import MAX_DIM, MAX_HIDDEN, BlockKind, BuildContext, KindParams, register

State = tuple[torch.Tensor, ...]


def causal_mask(T: int, device: torch.device | None = None) -> torch.Tensor:
    """``[T, T]`` bool, True where key position ``s <= t`` (query position)."""
    i = torch.arange(T, device=device)
    return i[:, None] >= i[None, :]


def token_shift(x: torch.Tensor) -> torch.Tensor:
    """The previous token's features (zeros before the first). ``[B, T, d] -> [B, T, d]``."""
    return F.pad(x, (0, 0, 1, 0))[:, :-1]


def _heads(x: torch.Tensor, n: int) -> torch.Tensor:
    """``[B, T, n·e] -> [B, n, T, e]``."""
    B, T, _ = x.shape
    return x.view(B, T, n, -1).transpose(1, 2)


def _merge(x: torch.Tensor) -> torch.Tensor:
    """``[B, n, T, e] -> [B, T, n·e]``."""
    B, n, T, e = x.shape
    return x.transpose(1, 2).reshape(B, T, n * e)


# --------------------------------------------------------------------------- linear attention


class LinearAttentionParams(KindParams):
    n_heads: int = Field(4, ge=1, le=MAX_DIM)
    feature_map: Literal["elu", "relu"] = "elu"
    eps: float = Field(1e-6, gt=0)


class LinearAttention(nn.Module):
    """Causal linear attention (Katharopoulos et al., 2020, "Transformers are RNNs").

    ``y_t = φ(q_t)ᵀ S_t / (φ(q_t)ᵀ z_t + eps)`` with ``S_t = Σ_{s≤t} φ(k_s) v_sᵀ``,
    ``z_t = Σ_{s≤t} φ(k_s)``, ``φ = elu + 1`` (or ReLU), per head; then an output projection.
    ``forward``: ``[B, T, d] -> [B, T, d]`` via the masked ``T×T`` form.
    State: ``S [B, H, hd, hd]``, ``z [B, H, hd]``.
    """

    def __init__(self, d: int, p: LinearAttentionParams) -> None:
        super().__init__()
        self.h = p.n_heads
        self.hd = d // p.n_heads
        self.eps = p.eps
        self.elu = p.feature_map == "elu"
        self.q = nn.Linear(d, d, bias=False)
        self.k = nn.Linear(d, d, bias=False)
        self.v = nn.Linear(d, d, bias=False)
        self.o = nn.Linear(d, d, bias=False)
        for layer in (self.q, self.k, self.v, self.o):
            init_linear(layer)

    def _phi(self, x: torch.Tensor) -> torch.Tensor:
        return F.elu(x) + 1.0 if self.elu else F.relu(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        T = x.shape[1]
        q = self._phi(_heads(self.q(x), self.h))
        k = self._phi(_heads(self.k(x), self.h))
        v = _heads(self.v(x), self.h)
        a = (q @ k.transpose(-1, -2)) * causal_mask(T, x.device).to(q.dtype)
        y = (a @ v) / (a.sum(-1, keepdim=True) + self.eps)
        return self.o(_merge(y))

    def init_state(
        self, batch: int, device: torch.device | None = None, dtype: torch.dtype | None = None
    ) -> State:
        S = torch.zeros(batch, self.h, self.hd, self.hd, device=device, dtype=dtype)
        z = torch.zeros(batch, self.h, self.hd, device=device, dtype=dtype)
        return (S, z)

    def step(self, x: torch.Tensor, state: State) -> tuple[torch.Tensor, State]:
        B = x.shape[0]
        S, z = state
        q = self._phi(self.q(x).view(B, self.h, self.hd))
        k = self._phi(self.k(x).view(B, self.h, self.hd))
        v = self.v(x).view(B, self.h, self.hd)
        S = S + k[..., :, None] * v[..., None, :]
        z = z + k
        num = torch.einsum("bhi,bhij->bhj", q, S)
        den = (q * z).sum(-1, keepdim=True) + self.eps
        return self.o((num / den).reshape(B, -1)), (S, z)


def _check_heads(p: LinearAttentionParams, c: BuildContext) -> None:
    check_heads(p.n_heads, d_model=c.d_model)


register(
    BlockKind(
        name="linear_attention",
        role="token_mixer",
        params=LinearAttentionParams,
        build=lambda p, c: LinearAttention(c.d_model, p),
        n_params=lambda p, c: 4 * c.d_model * c.d_model,
        flops=lambda p, c, L: 8.0 * c.d_model**2 + 4.0 * L * c.d_model + 2.0 * L * p.n_heads,
        state_bytes=lambda p, c, L: 4 * (c.d_model * (c.d_model // p.n_heads) + c.d_model),
        check=_check_heads,
        paper=(
            "Katharopoulos et al., 2020, 'Transformers are RNNs: Fast Autoregressive "
            "Transformers with Linear Attention'"
        ),
        summary="causal linear attention, feature map elu+1 (or relu), normalized, per head",
        recurrent=True,
    )
)


# --------------------------------------------------------------------------- GLA

# GLA's parallel form works in chunks of GLA_CHUNK steps, exact for any per-step log-gate
# la ≤ 0 (no clamp: the recurrence is the paper's). Between chunks, each chunk's end state
# from zero, Σ_s exp(Σ_{r>s} la_r) k_s v_sᵀ, is carried by a masked exp(segsum) of the chunk
# totals, and a query reads the carried state through q_t·exp(G_t) (G_t = Σ_{r≤t} la_r within
# the chunk): every exponent there is a sum of log-gates ≤ 0. Within a chunk,
# A_ts = Σ_i q_ti k_si exp(G_ti − G_si) for s ≤ t takes one of two exact forms:
# * fast (eager, while every per-step log-gate ≥ −GLA_FAST_LOG_DECAY: a fresh model, gate
#   logits above −64 with the default normalizer 16): one matmul of queries and keys rescaled
#   around the chunk's middle step m, exp(G_t − G_m) and exp(G_m − G_s), each at most
#   exp(GLA_CHUNK/2 · GLA_FAST_LOG_DECAY) = e^32 (rescaling around the chunk's start reached
#   e^64, whose square overflows fp32 in the backward pass);
# * stable (any log-gate, e.g. −50 or −125 per step; always under graph capture, where the
#   data cannot choose): sub-chunks of GLA_SUB steps. Query t in sub-chunk i and key s in an
#   earlier sub-chunk j meet through the boundary b_i just before sub-chunk i, as a matmul of
#   q_t·exp(Σ_{b_i<r≤t} la_r) and k_s·exp(Σ_{s<r≤b_i} la_r), both factors ≤ 1; within a
#   sub-chunk the pairs s ≤ t are taken in log space, Σ_i q_ti k_si exp(Σ_{s<r≤t} la_ri)
#   (GLA_SUB·(GLA_SUB+1)/2 pairs × hk per sub-chunk). Every exponent is a direct sum of
#   log-gates (a matmul with a 0/1 matrix), never a difference of prefix sums, so a weak gate
#   next to strong ones keeps fp32 precision.
# Exponents are floored at GLA_EXP_FLOOR before exp where they can be far below it (the
# stable form, the decay between chunks): e^−80 ≈ 1.8e−35 is below any rounding of the result,
# while fp32 exp of arguments under −87 (results that underflow) ran ~40x slower (AMD EPYC).
GLA_CHUNK = 16
GLA_SUB = 4
GLA_FAST_LOG_DECAY = 4.0
GLA_EXP_FLOOR = -80.0


def _exp(x: torch.Tensor) -> torch.Tensor:
    """``exp`` of an exponent ``≤ 0`` floored at :data:`GLA_EXP_FLOOR`: below it fp32 ``exp``
    takes a slow path (~40x, AMD EPYC) for terms that no rounding of the result can see."""
    return torch.exp(torch.clamp(x, min=GLA_EXP_FLOOR))


def _chunk_decay(g: torch.Tensor) -> torch.Tensor:
    """Decay between chunks: ``g [..., n]`` (each chunk's total log-gate) -> ``[..., n, n]``
    with ``exp(Σ_{j<r≤i} g_r)`` for ``j ≤ i`` (sums of log-gates, a cumulative sum over a
    masked copy, not differences of prefix sums) and exactly 0 for ``j > i``."""
    n = g.shape[-1]
    idx = torch.arange(n, device=g.device)
    # a product with the 0/1 mask, not expand + masked_fill: one broadcast Mul in the
    # exported graph instead of Expand and Where over [..., n, n] (g is finite)
    x = g[..., :, None] * (idx[:, None] > idx[None, :]).to(g.dtype)
    return _exp(x.cumsum(-2)) * (idx[:, None] >= idx[None, :]).to(g.dtype)


def _gla_intra_fast(q: torch.Tensor, k: torch.Tensor, G: torch.Tensor) -> torch.Tensor:
    """Within-chunk scores, fast form (exact while every per-step log-gate is
    ``≥ −GLA_FAST_LOG_DECAY``; see :data:`GLA_CHUNK`).

    ``q, k [..., C, hk]``, ``G [..., C, hk]`` (log-gate since the chunk start, inclusive) ->
    ``A [..., C, C]`` with ``A_ts = Σ_i q_ti k_si exp(G_ti − G_si)`` for ``s ≤ t``, 0 above.
    """
    C = G.shape[-2]
    mid = G[..., C // 2 : C // 2 + 1, :]
    att = (q * torch.exp(G - mid)) @ (k * torch.exp(mid - G)).transpose(-1, -2)
    tril = torch.ones(C, C, dtype=torch.bool, device=q.device).tril()
    return att.masked_fill(~tril, 0.0)


def _gla_intra_stable(q: torch.Tensor, k: torch.Tensor, la: torch.Tensor) -> torch.Tensor:
    """Within-chunk scores, stable form: exact for any per-step log-gate ``la ≤ 0`` (every
    factor is ``exp`` of a sum of log-gates, so ``≤ 1``; see :data:`GLA_CHUNK`).

    ``q, k, la [..., C, hk]`` (``C`` a multiple of :data:`GLA_SUB`) -> ``A [..., C, C]`` with
    ``A_ts = Σ_i q_ti k_si exp(Σ_{s<r≤t} la_ri)`` for ``s ≤ t``, 0 above. Plain out-of-place
    ops with no data-dependent branch (autograd, torch.export and ONNX follow it).
    """
    *lead, C, hk = q.shape
    P = GLA_SUB
    M, L = C // P, C - P  # queries of sub-chunks 1.. meet keys of sub-chunks ..M−2
    dev, dty = q.device, q.dtype
    c = torch.arange(C, device=dev)
    sub, r = c // P, c[None, :]
    # every exponent is a sum of log-gates: one matmul of a constant 0/1 matrix with la
    pre = (sub[P:, None] * P <= r) & (r <= c[P:, None])  # [L, C]: Σ_{b_i<r≤t}
    i = torch.arange(1, M, device=dev)[:, None, None]
    upto = (c[None, :L, None] < r) & (r < i * P)  # [M−1, L, C]: Σ_{s<r≤b_i}
    tt, ss = torch.tril_indices(P, P, device=dev)  # the pairs s ≤ t of a sub-chunk
    n = tt.numel()
    tg = (torch.arange(M, device=dev)[:, None] * P + tt).reshape(-1)  # [M·n] in the chunk
    sg = (torch.arange(M, device=dev)[:, None] * P + ss).reshape(-1)
    seg = (sg[:, None] < r) & (r <= tg[:, None])  # [M·n, C]: Σ_{s<r≤t}
    rows = torch.cat([pre, upto.reshape(-1, C), seg]).to(dty)
    e = _exp(torch.matmul(rows, la))  # [..., L + (M−1)·L + M·n, hk], each ≤ 1
    e_pre, e_upto, e_seg = e.split([L, (M - 1) * L, M * n], dim=-2)
    # a key of an earlier sub-chunk through the boundary b_i before the query's sub-chunk i
    qo = (q[..., P:, :] * e_pre).reshape(*lead, M - 1, P, hk)
    kk = k[..., None, :L, :] * e_upto.reshape(*lead, M - 1, L, hk)  # [..., M−1, L, hk]
    off = torch.matmul(qo, kk.transpose(-1, -2)).reshape(*lead, L, L)
    earlier = (sub[P:, None] > sub[None, :L]).to(dty)  # s in a sub-chunk before t's
    att = F.pad(off * earlier, (0, P, P, 0))  # [..., C, C]
    # the pairs within a sub-chunk, in log space, then placed on the diagonal blocks
    pairs = (q[..., tg, :] * e_seg * k[..., sg, :]).sum(-1)  # [..., M·n]
    # one 0/1 matmul puts pair (t, s) at t·C + s (was: into [M, P·P] blocks, then a
    # broadcast product with eye(M): a 7-D Mul, 2.5 % of an exported GLA at 1,024)
    place = (torch.arange(C * C, device=dev)[None, :] == (tg * C + sg)[:, None]).to(dty)
    return att + torch.matmul(pairs, place).reshape(*lead, C, C)


class GLAParams(KindParams):
    n_heads: int = Field(4, ge=1, le=MAX_DIM)
    expand_k: float = Field(0.5, gt=0, le=8)
    expand_v: float = Field(1.0, gt=0, le=8)
    gate_rank: int = Field(16, ge=1, le=MAX_DIM)
    gate_normalizer: float = Field(16.0, gt=0)
    eps: float = Field(1e-5, gt=0)


def _gla_dims(p: GLAParams, d: int) -> tuple[int, int]:
    return int(round(p.expand_k * d)), int(round(p.expand_v * d))


class GLA(nn.Module):
    """Gated linear attention (Yang et al., 2024, "Gated Linear Attention Transformers with
    Hardware-Efficient Training").

    Per head: ``S_t = diag(α_t) S_{t-1} + k_t v_tᵀ``, ``o_t = S_tᵀ q_t`` with a data-dependent
    per-key-dimension forget gate ``log α_t = logsigmoid(W₂W₁x_t + b) / gate_normalizer``
    (low-rank ``gate_rank``); output ``W_o(swish(W_g x) ⊙ RMSNorm_head(o))``.
    Widths: keys ``dk = expand_k·d``, values ``dv = expand_v·d``, split over ``n_heads``.
    ``forward``: ``[B, T, d] -> [B, T, d]`` by the chunked form (see :data:`GLA_CHUNK`):
    within chunks of ``GLA_CHUNK`` steps ``A_ts = Σ_i q_ti k_si exp(G_ti − G_si)``, between
    chunks the end states through a masked ``exp(segsum)``. Exact for any gate (no clamp):
    the paper's recurrence to rounding in fp64, and in fp32 stable (finite values and
    gradients) for per-step log-gates down to −125 (gate logits of −2000) and beyond; the fast
    rescaled-matmul form runs while every log-gate is ``≥ −GLA_FAST_LOG_DECAY`` (eager only),
    the sub-chunked log-space form otherwise and always under graph capture.
    ``step``: ``x_t [B, d] -> y_t [B, d]`` by the recurrence itself.
    State: ``S [B, H, dk/H, dv/H]``.
    """

    def __init__(self, d: int, p: GLAParams) -> None:
        super().__init__()
        dk, dv = _gla_dims(p, d)
        self.h = p.n_heads
        self.hk, self.hv = dk // p.n_heads, dv // p.n_heads
        self.scale = self.hk**-0.5
        self.norm_gate = p.gate_normalizer
        self.eps = p.eps
        self.q = nn.Linear(d, dk, bias=False)
        self.k = nn.Linear(d, dk, bias=False)
        self.v = nn.Linear(d, dv, bias=False)
        self.g = nn.Linear(d, dv, bias=False)
        self.gk1 = nn.Linear(d, p.gate_rank, bias=False)
        self.gk2 = nn.Linear(p.gate_rank, dk, bias=True)
        self.o = nn.Linear(dv, d, bias=False)
        self.norm_weight = nn.Parameter(torch.ones(dv))
        for layer in (self.q, self.k, self.v, self.g, self.gk1, self.gk2, self.o):
            init_linear(layer)

    def _log_gate(self, x: torch.Tensor) -> torch.Tensor:
        """``x [..., d]`` -> per-step log-gate ``log α [..., dk]`` (≤ 0, no floor)."""
        z = self.gk2(self.gk1(x))
        # logsigmoid(z) = min(z, 0) − log1p(exp(−|z|)), written out: the exporters lower
        # F.logsigmoid to Log(Sigmoid(z)), and onnxruntime's Sigmoid returns 0 below
        # z ≈ −18, so a trained, firmly closed gate became log(0) = −inf in the exported
        # graph only: logits off by 0.01 on real text. log1p(e^−|z|) below e^GLA_EXP_FLOOR
        # is below the rounding of min(z, 0), and fp32 exp is slow there (see _exp)
        return (torch.clamp(z, max=0.0) - torch.log1p(_exp(-z.abs()))) / self.norm_gate

    def _out(self, o: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """``o [..., H, hv]`` -> normalized, gated, projected ``[..., d]``."""
        o = o * torch.rsqrt(o.pow(2).mean(-1, keepdim=True) + self.eps)
        o = o.flatten(-2) * self.norm_weight
        return self.o(F.silu(self.g(x)) * o)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.shape
        C, H, hk, hv = GLA_CHUNK, self.h, self.hk, self.hv
        pad = (C - T % C) % C
        xp = F.pad(x, (0, 0, 0, pad))
        nc = xp.shape[1] // C

        def chunks(t: torch.Tensor, e: int) -> torch.Tensor:  # [B, T', H·e] -> [B, H, nc, C, e]
            return t.view(B, nc, C, H, e).permute(0, 3, 1, 2, 4)

        q = chunks(self.q(xp), hk) * self.scale
        k = chunks(self.k(xp), hk)
        v = chunks(self.v(xp), hv)
        # padded steps get log-gate 0: their gate logits (the bias alone) may be strongly
        # closed while every real step's gate is open, and the fast form's rescaling around
        # a padded middle step then overflowed (inf·0 = NaN in the real rows)
        lg = F.pad(self._log_gate(x), (0, 0, 0, pad))
        # no data-dependent branch under capture (export, compile): the stable form there
        stable = tracing() or bool(lg.amin() < -GLA_FAST_LOG_DECAY)
        la = chunks(lg, hk)
        # log-gate since the chunk start (inclusive) and to its end (exclusive), as direct
        # sums of log-gates ≤ 0 (matmuls with 0/1 matrices): [B, H, nc, C, hk] each
        idx = torch.arange(C, device=x.device)
        sums = torch.cat([idx[:, None] >= idx[None, :], idx[:, None] < idx[None, :]])
        G, Gs = torch.matmul(sums.to(x.dtype), la).split(C, dim=-2)
        att = _gla_intra_stable(q, k, la) if stable else _gla_intra_fast(q, k, G)
        o = att @ v  # [B, H, nc, C, hv]
        # each chunk's own end state, then states carried across chunks
        exp = _exp if stable else torch.exp  # fast: G, Gs ≥ −C·GLA_FAST_LOG_DECAY
        S = (k * exp(Gs)).transpose(-1, -2) @ v  # [B, H, nc, hk, hv]
        if tracing():  # no loop over a (symbolic) chunk count: a masked decay matrix
            trans = _chunk_decay(G[..., -1, :].transpose(-1, -2))  # [B, H, hk, nc, nc]
            E = (trans @ S.transpose(2, 3)).transpose(2, 3)  # [B, H, nc, hk, hv]
            carry = F.pad(E, (0, 0, 0, 0, 1, 0))[:, :, :-1]  # state entering chunk i
        else:  # eager: the recurrence over chunks, linear in their count
            g = torch.clamp(G[..., -1, :, None], min=GLA_EXP_FLOOR)  # [B, H, nc, hk, 1]
            carry = carry_in(g.transpose(1, 2), S.transpose(1, 2)).transpose(1, 2)
        o = o + (q * exp(G)) @ carry
        o = o.permute(0, 2, 3, 1, 4).reshape(B, nc * C, H, hv)[:, :T]
        return self._out(o, x)

    def init_state(
        self, batch: int, device: torch.device | None = None, dtype: torch.dtype | None = None
    ) -> State:
        return (torch.zeros(batch, self.h, self.hk, self.hv, device=device, dtype=dtype),)

    def step(self, x: torch.Tensor, state: State) -> tuple[torch.Tensor, State]:
        """One token: ``x [B, d]``, ``S [B, H, hk, hv]`` -> ``y [B, d]`` and the new state,
        ``S_t = diag(α_t) S_{t−1} + k_t v_tᵀ``, ``o_t = S_tᵀ q_t``."""
        B = x.shape[0]
        (S,) = state
        q = self.q(x).view(B, self.h, self.hk) * self.scale
        k = self.k(x).view(B, self.h, self.hk)
        v = self.v(x).view(B, self.h, self.hv)
        a = self._log_gate(x).view(B, self.h, self.hk).exp()
        S = a[..., None] * S + k[..., :, None] * v[..., None, :]
        o = torch.einsum("bhi,bhij->bhj", q, S)
        return self._out(o, x), (S,)


def _gla_check(p: GLAParams, c: BuildContext) -> None:
    dk, dv = _gla_dims(p, c.d_model)
    check_heads(p.n_heads, **{"the key width expand_k·d_model =": dk})
    check_heads(p.n_heads, **{"the value width expand_v·d_model =": dv})


def _gla_params(p: GLAParams, c: BuildContext) -> int:
    d = c.d_model
    dk, dv = _gla_dims(p, d)
    return 2 * d * dk + 2 * d * dv + d * p.gate_rank + p.gate_rank * dk + dk + dv * d + dv


def _gla_flops(p: GLAParams, c: BuildContext, L: int) -> float:
    """FLOPs per token of the chunked form as the exported graph computes it: the stable form
    (see :data:`GLA_CHUNK`), which eager ``forward`` also runs once a log-gate is below
    ``−GLA_FAST_LOG_DECAY``; the fast form computes ``QKᵀ`` as one ``C×C`` matmul per chunk
    instead (about 6 % fewer FLOPs for a default block at d_model 128). A multiply-add is
    2 FLOPs, a 0/1 matrix counts as dense, ``exp`` is not counted."""
    d = c.d_model
    dk, dv = _gla_dims(p, d)
    proj = 2.0 * d * (2 * dk + 2 * dv) + 2.0 * (d * p.gate_rank + p.gate_rank * dk) + 2.0 * dv * d
    # chunked form: intra-chunk AV (C×C per chunk), chunk end states, inter-chunk transfer
    # (nc×nc per key/value pair) and the carried-state read-out, the log-gate sums from and
    # to the chunk's ends (a [2C, C] 0/1 matmul)
    C, P = GLA_CHUNK, GLA_SUB
    nc = math.ceil(max(L, 1) / C)
    hv = dv // p.n_heads
    av = 2.0 * C * dv
    states = 2.0 * dk * hv + 2.0 * dk * hv  # end states per token + carried read-out
    inter = 2.0 * nc * dk * hv / C
    sums = 4.0 * C * dk
    # QKᵀ in the stable form: the sub-chunk log-gate sums (a [rows, C] 0/1 matmul), queries
    # and keys scaled, the matmul of sub-chunks with the keys before them, the pairs within a
    # sub-chunk in log space (q·e·k summed: 3 per pair and key dim) and their placement (a
    # [M·n, C·C] 0/1 matmul per chunk)
    M, Lq, n = C // P, C - P, P * (P + 1) // 2
    rows = Lq + (M - 1) * Lq + M * n
    per_dk = 2.0 * rows + (Lq + (M - 1) * Lq + 2.0 * (M - 1) * P * Lq + 3.0 * M * n) / C
    qk = per_dk * dk + 2.0 * M * n * C * p.n_heads
    return proj + av + qk + states + inter + sums


register(
    BlockKind(
        name="gla",
        role="token_mixer",
        params=GLAParams,
        build=lambda p, c: GLA(c.d_model, p),
        n_params=_gla_params,
        flops=_gla_flops,
        state_bytes=lambda p, c, L: (
            4 * _gla_dims(p, c.d_model)[0] * (_gla_dims(p, c.d_model)[1] // p.n_heads)
        ),
        check=_gla_check,
        paper=(
            "Yang et al., 2024, 'Gated Linear Attention Transformers with Hardware-Efficient "
            "Training'"
        ),
        summary="gated linear attention: data-dependent per-key forget gate, swish output gate",
        recurrent=True,
    )
)


# --------------------------------------------------------------------------- RetNet


class RetNetParams(KindParams):
    """Parameters of ``retnet``.

    Attributes:
        n_heads: retention heads ``H`` (head ``h`` decays at ``γ_h = 1 − 2^(−5−h)``).
        expand_v: value width ``dv = round(expand_v·d_model)`` (the paper uses 2).
        pos: ``rope``: rotary positions on queries and keys (no xPos scale); ``none``.
        rope_base: the rotary base (torchscale fixes it at 10000).
        eps: epsilon of the per-head norm (fla's default 1e-5; torchscale's
            ``layernorm_eps`` is 1e-6: write ``eps: 1.0e-6`` to port a torchscale model).
        convention: which reference implementation the block follows, for everything the
            paper leaves open (all else is shared):

            * ``fla`` (default; fla-org/flash-linear-attention ``fla/layers/
              multiscale_retention.py``): rotary frequencies ``base^(−2i/hk)`` in the
              rotate-half layout; no retention normalisation; per-head GroupNorm (mean and
              variance over the head, weight and bias of width ``dv``; fla's current layer
              uses an RMSNorm with a weight instead). Projections initialised N(0, 0.02²).
            * ``torchscale`` (microsoft/torchscale as of Nov 2023, ``torchscale/component/
              multiscale_retention.py`` and ``RetNetRelPos`` in ``architecture/retnet.py``):
              rotary angles ``base^(−linspace(0, 1, hk/2)_i)`` in the interleaved
              "rotate every two" layout; the decay matrix divided by the square root of its
              row sum, ``D_ts = γ^(t−s) / sqrt(Σ_{s'≤t} γ^(t−s'))`` (torchscale's
              recurrent form; its parallel form's extra score-row division by
              ``clamp(Σ_s |(QKᵀ ⊙ D)_ts|, 1, 5e4)`` is left out, see :class:`RetNet`);
              the current per-head RMSNorm without affine
              weights (the July 2023 release had a LayerNorm without affine weights and
              biases on every projection: not offered). Projections initialised as
              torchscale does (Xavier uniform, gain 2^−2.5 for q, k, v, g and 2^−1 for the
              output).
    """

    n_heads: int = Field(4, ge=1, le=MAX_DIM)
    expand_v: float = Field(2.0, gt=0, le=8)
    pos: Literal["rope", "none"] = "rope"
    rope_base: float = Field(10000.0, gt=1)
    eps: float = Field(1e-5, gt=0)
    convention: Literal["fla", "torchscale"] = "fla"

    added_later: ClassVar[frozenset[str]] = frozenset({"convention"})


def _retnet_dv(p: RetNetParams, d: int) -> int:
    return int(round(p.expand_v * d))


def _rope_at(pos: torch.Tensor, hd: int, base: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotary tables at positions ``pos [...]`` -> ``cos, sin [..., hd]`` (rotate-half)."""
    half = hd // 2
    inv = 1.0 / (base ** (torch.arange(half, dtype=torch.float32, device=pos.device) / half))
    ang = pos.to(torch.float32)[..., None] * inv
    ang = torch.cat([ang, ang], dim=-1)
    return ang.cos(), ang.sin()


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos.to(x.dtype) + rotated * sin.to(x.dtype)


def torchscale_angles(hd: int, base: float = 10000.0) -> torch.Tensor:
    """torchscale's rotary angles per channel, ``[hd]`` fp32: ``θ_i = base^(−linspace(0, 1,
    hd/2)_i)`` written twice in a row, ``(θ₀, θ₀, θ₁, θ₁, …)`` (``RetNetRelPos.angle``)."""
    theta = 1.0 / (base ** torch.linspace(0, 1, hd // 2))
    return theta.repeat_interleave(2)


def _rotate_pairs(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """``x·cos + rot(x)·sin`` with adjacent pairs rotated, ``(x₀, x₁, x₂, x₃, …) ->
    (−x₁, x₀, −x₃, x₂, …)`` (torchscale's ``rotate_every_two``; a constant gather and a
    sign, so the graph keeps a dynamic sequence axis). ``x [..., hd]``, ``cos, sin``
    broadcastable to it."""
    hd = x.shape[-1]
    idx = torch.tensor([i ^ 1 for i in range(hd)], device=x.device)
    sign = torch.tensor([(-1.0) ** (i + 1) for i in range(hd)], dtype=x.dtype, device=x.device)
    return x * cos + x.index_select(-1, idx) * sign * sin


class RetNet(nn.Module):
    """Multi-scale retention (Sun et al., 2023, "Retentive Network: A Successor to
    Transformer for Large Language Models").

    Per head ``h`` a fixed decay ``γ_h = 1 − 2^(−5−h)``: ``S_t = γ_h S_{t-1} + k_t v_tᵀ``,
    ``o_t = S_tᵀ q_t`` (keys scaled by ``hd^-½``; optional rotary positions on q, k — the
    xPos length-extrapolation scale is omitted); then the per-head norm, swish gate and output
    projection: ``W_o(swish(W_g x) ⊙ norm(o))``. Values have width ``dv = expand_v·d``.
    ``forward``: ``[B, T, d] -> [B, T, d]`` via ``(QKᵀ ⊙ D) V``, ``D_ts = γ^(t−s)`` for
    ``s ≤ t``. State: ``S [B, H, d/H, dv/H]`` and the position ``[B]``.

    ``convention`` (see :class:`RetNetParams`) picks fla's or torchscale's rotary layout,
    normalisations and norm. ``fla``: GroupNorm with weight and bias, no retention
    normalisation (GroupNorm is invariant to a per-head, per-token scale up to its ``eps``).
    ``torchscale``: ``D`` divided by ``sqrt`` of its row sum in both forms (the step divides
    ``S_tᵀ q_t`` by ``sqrt((1 − γ^(t+1)) / (1 − γ))``: torchscale's recurrent form, which
    carries ``S_t`` already divided), RMSNorm without weights. ``forward`` and ``step`` both
    compute torchscale's *recurrent* form, so they agree exactly (the decode export's
    token-by-token gate holds for a trained model). torchscale's parallel (training) form
    also divides each score row by ``a_t = clamp(Σ_s |score_ts|, 1, 5e4)``, which a
    fixed-size state cannot carry; archir leaves it out. It changes the output only through
    the RMSNorm's ``eps`` — ``o / sqrt(mean(o²) + a²·eps)`` against ``o / sqrt(mean(o²) +
    eps)``, exactly as torchscale's own two forms differ: 0 at torchscale's initial weights,
    1.3e-3 of the output's largest entry with q, k weights 4× or 16× those (fp64, eps 1e-6,
    T 256, d 128, 4 heads). A torchscale checkpoint therefore gives here what torchscale's
    recurrent inference gives.
    """

    angle: torch.Tensor  # torchscale's rotary angles [hk] (buffer; torchscale convention)

    def __init__(self, d: int, p: RetNetParams) -> None:
        super().__init__()
        dv = _retnet_dv(p, d)
        self.h = p.n_heads
        self.hk, self.hv = d // p.n_heads, dv // p.n_heads
        self.rope = p.pos == "rope"
        self.base = p.rope_base
        self.eps = p.eps
        self.torchscale = p.convention == "torchscale"
        self.q = nn.Linear(d, d, bias=False)
        self.k = nn.Linear(d, d, bias=False)
        self.v = nn.Linear(d, dv, bias=False)
        self.g = nn.Linear(d, dv, bias=False)
        self.o = nn.Linear(dv, d, bias=False)
        if self.torchscale:
            for layer in (self.q, self.k, self.v, self.g):
                nn.init.xavier_uniform_(layer.weight, gain=2**-2.5)
            nn.init.xavier_uniform_(self.o.weight, gain=2**-1)
            self.register_buffer("angle", torchscale_angles(self.hk, p.rope_base), persistent=False)
        else:
            self.gn_weight = nn.Parameter(torch.ones(dv))
            self.gn_bias = nn.Parameter(torch.zeros(dv))
            for layer in (self.q, self.k, self.v, self.g, self.o):
                init_linear(layer)
        log_gamma = torch.log1p(-(2.0 ** (-5.0 - torch.arange(p.n_heads, dtype=torch.float64))))
        self.register_buffer("log_gamma", log_gamma.float(), persistent=False)

    def _norm(self, o: torch.Tensor) -> torch.Tensor:
        """``o [..., H, hv]`` -> the per-head norm, flattened ``[..., dv]``."""
        if self.torchscale:
            return (o * torch.rsqrt(o.pow(2).mean(-1, keepdim=True) + self.eps)).flatten(-2)
        mu = o.mean(-1, keepdim=True)
        var = (o - mu).pow(2).mean(-1, keepdim=True)
        return ((o - mu) * torch.rsqrt(var + self.eps)).flatten(-2) * self.gn_weight + self.gn_bias

    def _out(self, o: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """``o [..., H, hv]`` -> norm, swish gate, output projection ``[..., d]``."""
        return self.o(F.silu(self.g(x)) * self._norm(o))

    def _positions(
        self, q: torch.Tensor, k: torch.Tensor, pos: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Rotate ``q, k [..., hk]`` by the positions ``pos`` (broadcast over heads by the
        caller's layout: ``[T]`` for ``[B, H, T, hk]``, ``[B, 1]`` for ``[B, H, hk]``)."""
        if not self.rope:
            return q, k
        if self.torchscale:
            ang = pos.to(self.angle.dtype)[..., None] * self.angle
            cos, sin = ang.cos().to(q.dtype), ang.sin().to(q.dtype)
            return _rotate_pairs(q, cos, sin), _rotate_pairs(k, cos, sin)
        cos, sin = _rope_at(pos, self.hk, self.base)
        return _rotate(q, cos, sin), _rotate(k, cos, sin)

    def _decay_sum(self, n: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """``Σ_{j<n} γ^j = (1 − γ^n) / (1 − γ)`` per head, for counts ``n [...]`` ->
        ``[..., H]`` (torchscale's normaliser: the row sum of its decay matrix)."""
        lg = self.log_gamma.to(dtype)
        return (1 - torch.exp(n.to(dtype)[..., None] * lg)) / (1 - torch.exp(lg))

    def decay(self, pos: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """The decay matrix ``D [H, T, T]`` for positions ``pos [T]`` (``arange(T)``):
        ``γ_h^(t−s)`` for ``s ≤ t``, 0 above the diagonal (torchscale: each row scaled by
        ``1 / sqrt(Σ_s γ^(t−s))``). It depends on the length, the heads and the
        convention only, not on the weights: in a whole exported model every RetNet layer
        with the same ``n_heads`` and convention computes the same subgraph, and
        onnxruntime builds it once (the latency predictor counts it once,
        :func:`exporters.latency.predictor.graph_features`)."""
        # t - s clamped at 0 (no overflow) and the upper triangle zeroed by ``tril`` (one
        # Trilu in the graph), the same values as masking the exponent with -inf; the
        # exported masked_fill (a broadcast Where over [H, T, T]) took 4.4 of the 7 ms
        # building the decay at d_model 64, H 4, length 768
        posf = pos.to(dtype)
        rel = (posf[:, None] - posf[None, :]).clamp_min(0.0)  # max(t - s, 0)
        d = torch.tril((rel[None] * self.log_gamma.to(dtype)[:, None, None]).exp())
        if self.torchscale:
            rows = self._decay_sum(pos + 1, dtype).transpose(0, 1)  # [H, T]
            d = d * torch.rsqrt(rows)[..., None]
        return d

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        T = x.shape[1]
        q = _heads(self.q(x), self.h)
        k = _heads(self.k(x), self.h) * self.hk**-0.5
        v = _heads(self.v(x), self.h)
        pos = torch.arange(T, device=x.device)
        q, k = self._positions(q, k, pos)
        o = ((q @ k.transpose(-1, -2)) * self.decay(pos, x.dtype)) @ v  # [B, H, T, hv]
        return self._out(o.transpose(1, 2), x)

    def init_state(
        self, batch: int, device: torch.device | None = None, dtype: torch.dtype | None = None
    ) -> State:
        S = torch.zeros(batch, self.h, self.hk, self.hv, device=device, dtype=dtype)
        return (S, torch.zeros(batch, dtype=torch.long, device=device))

    def step(self, x: torch.Tensor, state: State) -> tuple[torch.Tensor, State]:
        B = x.shape[0]
        S, pos = state
        q = self.q(x).view(B, self.h, self.hk)
        k = self.k(x).view(B, self.h, self.hk) * self.hk**-0.5
        v = self.v(x).view(B, self.h, self.hv)
        q, k = self._positions(q, k, pos[:, None])
        gamma = self.log_gamma.to(x.dtype).exp()[None, :, None, None]
        S = gamma * S + k[..., :, None] * v[..., None, :]
        o = torch.einsum("bhi,bhij->bhj", q, S)
        if self.torchscale:
            o = o * torch.rsqrt(self._decay_sum(pos + 1, x.dtype))[..., None]
        return self._out(o, x), (S, pos + 1)


def _retnet_check(p: RetNetParams, c: BuildContext) -> None:
    dv = _retnet_dv(p, c.d_model)
    check_heads(p.n_heads, d_model=c.d_model)
    check_heads(p.n_heads, **{"the value width expand_v·d_model =": dv})
    if p.pos == "rope" and (c.d_model // p.n_heads) % 2:
        raise ValueError(f"rope needs an even head_dim, got {c.d_model // p.n_heads}")


def _retnet_params(p: RetNetParams, c: BuildContext) -> int:
    d, dv = c.d_model, _retnet_dv(p, c.d_model)
    norm = 0 if p.convention == "torchscale" else 2 * dv  # RMSNorm without weights
    return 2 * d * d + 2 * d * dv + dv * d + norm


def _retnet_flops(p: RetNetParams, c: BuildContext, L: int) -> float:
    """Per token: the projections, ``QKᵀ`` (``L`` keys per query), the decay product, ``·V``
    (both conventions: torchscale's decay normalisation scales the batch-independent decay
    matrix, not the scores)."""
    d, dv = c.d_model, _retnet_dv(p, c.d_model)
    proj = 2.0 * d * (2 * d + 2 * dv) + 2.0 * dv * d
    scores = 1.0 * L * p.n_heads
    return proj + 2.0 * L * d + scores + 2.0 * L * dv


register(
    BlockKind(
        name="retnet",
        role="token_mixer",
        params=RetNetParams,
        build=lambda p, c: RetNet(c.d_model, p),
        n_params=_retnet_params,
        flops=_retnet_flops,
        state_bytes=lambda p, c, L: 4 * c.d_model * (_retnet_dv(p, c.d_model) // p.n_heads),
        check=_retnet_check,
        paper=(
            "Sun et al., 2023, 'Retentive Network: A Successor to Transformer for Large "
            "Language Models'"
        ),
        summary=(
            "multi-scale retention: per-head decay 1-2^(-5-h), rotary, per-head norm, swish "
            "gate (fla's or torchscale's convention)"
        ),
        recurrent=True,
    )
)


# --------------------------------------------------------------------------- RWKV


# RWKV's wkv works in chunks of RWKV_CHUNK steps: within a chunk a [C+1, C] decay matrix per
# channel (shared by the batch and the chunks), between chunks the chunk end states carried
# through an [nc, nc] decay matrix. Keys enter as e^{k − R} with R a per-(sequence, chunk,
# channel) reference (the chunk's largest key, or the largest decayed key carried in from
# earlier chunks if that is larger), so every exponent is ≤ 0 apart from the bonus u: nothing
# overflows, and underflow (0/0) needs keys of one channel spanning ~80 nats within about two
# consecutive chunks (fp32); keys drifting over any range across the sequence are fine.
RWKV_CHUNK = 32


def rwkv_wkv(w: torch.Tensor, u: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """RWKV-4 ``wkv`` (Peng et al., 2023), chunked parallel form.

    ``w [d]`` per-step log-decay (< 0), ``u [d]`` bonus, ``k, v [B, T, d]`` ->
    ``wkv [B, T, d]``: ``wkv_t = (Σ_{s<t} e^{(t−1−s)w + k_s} v_s + e^{u + k_t} v_t) /
    (same with v = 1)``. Cost ``O(T·RWKV_CHUNK·d)`` per sequence plus ``O((T/RWKV_CHUNK)²·d)``;
    no loop over time (exports to ONNX with a dynamic sequence axis).
    """
    B, T, d = k.shape
    C = RWKV_CHUNK
    pad = (C - T % C) % C
    # padded keys are −inf: e^{k} = 0, so padding adds nothing and leaves the chunk max alone
    kp = F.pad(k, (0, 0, 0, pad), value=float("-inf"))
    nc = kp.shape[1] // C
    kc = kp.view(B, nc, C, d)
    vc = F.pad(v, (0, 0, 0, pad)).view(B, nc, C, d)
    m = kc.detach().amax(2)  # [B, nc, d]: largest key of each chunk
    # within a chunk, rows t = 0..C (row C: the chunk's end state, as seen from the next step)
    it = torch.arange(C + 1, device=k.device)
    rel = (it[:, None] - 1 - it[None, :C]).to(k.dtype)  # t − 1 − s   [C+1, C]
    logw = torch.where((rel == -1)[..., None], u, rel[..., None] * w)  # [C+1, C, d]
    logw = logw.masked_fill((rel < -1)[..., None], float("-inf"))
    D = torch.exp(logw.permute(2, 0, 1))  # [d, C+1, C]
    ek = torch.exp(kc - m[:, :, None])  # ≤ 1
    rhs = torch.stack([ek * vc, ek], dim=-1)  # [B, nc, C, d, 2]
    intra = torch.matmul(D, rhs.permute(3, 2, 0, 1, 4).reshape(d, C, B * nc * 2))
    intra = intra.view(d, C + 1, B, nc, 2).permute(2, 3, 1, 0, 4)  # [B, nc, C+1, d, 2]
    S = intra[:, :, C]  # [B, nc, d, 2]: each chunk's end state (from zero), scale e^{m}
    # carried state entering chunk n: Σ_{j<n} e^{(n−1−j)·C·w + m_j} S_j, relative to R_n
    ic = torch.arange(nc, device=k.device)
    gap = (ic[:, None] - 1 - ic[None, :]).to(k.dtype)  # [nc, nc]
    expo = (gap[..., None] * (C * w)) + m[:, None]  # [B, nc, nc, d]
    expo = expo.masked_fill((gap < 0)[..., None], float("-inf"))
    R = torch.maximum(m, expo.detach().amax(2))  # [B, nc, d]
    carry = torch.einsum("bnjc,bjcz->bncz", torch.exp(expo - R[:, :, None]), S)
    # within chunk n, the carried state decays by e^{(t − nC)·w} before step t
    into = torch.exp(it[:C, None].to(k.dtype) * w)  # [C, d]
    nd = intra[:, :, :C] * torch.exp(m - R)[:, :, None, :, None]
    nd = nd + into[..., None] * carry[:, :, None]  # [B, nc, C, d, 2]
    nd = nd.reshape(B, nc * C, d, 2)[:, :T]
    return nd[..., 0] / nd[..., 1]


class RWKVParams(KindParams):
    """RWKV time mixing has no hyperparameters besides ``d_model``."""


def _ramp(d: int) -> torch.Tensor:
    return torch.arange(d, dtype=torch.float32) / max(1, d - 1)


class RWKVTimeMix(nn.Module):
    """RWKV-4 time mixing (Peng et al., 2023, "RWKV: Reinventing RNNs for the Transformer
    Era").

    Token shift ``x'_t = μ⊙x_t + (1−μ)⊙x_{t−1}`` (separate μ for k, v, r); per channel ``c``
    ``wkv_t = (Σ_{s<t} e^{(t−1−s)w + k_s} v_s + e^{u + k_t} v_t) / (same with v = 1)`` with
    decay ``w = −exp(decay) < 0`` and bonus ``u``; output ``W_o(σ(r_t) ⊙ wkv_t)``.
    ``forward``: ``[B, T, d] -> [B, T, d]`` by the chunked form ``rwkv_wkv`` (chunks of
    ``RWKV_CHUNK`` steps; ``e^{k}`` taken relative to a per-chunk reference, which cancels in
    the ratio). Only keys of one channel spanning more than ~80 nats within about two chunks
    (fp32) would underflow; no clamp, so ``forward`` and ``step`` compute the same function.
    State: previous ``x``, and the running numerator, denominator and max exponent ``[B, d]``.
    """

    def __init__(self, d: int) -> None:
        super().__init__()
        r = _ramp(d)
        self.mu_k = nn.Parameter(r.pow(0.5))
        self.mu_v = nn.Parameter(r.pow(0.5) * 0.9 + 0.05)
        self.mu_r = nn.Parameter(r.pow(0.25))
        self.decay = nn.Parameter(-5.0 + 8.0 * r.pow(1.5))
        zigzag = (torch.arange(d) % 3 - 1).float() * 0.5
        self.bonus = nn.Parameter(torch.full((d,), math.log(0.3)) + zigzag)
        self.key = nn.Linear(d, d, bias=False)
        self.value = nn.Linear(d, d, bias=False)
        self.receptance = nn.Linear(d, d, bias=False)
        self.output = nn.Linear(d, d, bias=False)
        for layer in (self.key, self.value, self.receptance, self.output):
            init_linear(layer)

    def _mix(
        self, x: torch.Tensor, prev: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        k = self.key(x * self.mu_k + prev * (1 - self.mu_k))
        v = self.value(x * self.mu_v + prev * (1 - self.mu_v))
        r = self.receptance(x * self.mu_r + prev * (1 - self.mu_r))
        return k, v, r

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        k, v, r = self._mix(x, token_shift(x))
        wkv = rwkv_wkv(-torch.exp(self.decay), self.bonus, k, v)
        return self.output(torch.sigmoid(r) * wkv)

    def init_state(
        self, batch: int, device: torch.device | None = None, dtype: torch.dtype | None = None
    ) -> State:
        d = self.key.in_features
        z = torch.zeros(batch, d, device=device, dtype=dtype)
        return (z, z.clone(), z.clone(), torch.full_like(z, -1e38))

    def step(self, x: torch.Tensor, state: State) -> tuple[torch.Tensor, State]:
        prev, aa, bb, pp = state
        k, v, r = self._mix(x, prev)
        w = -torch.exp(self.decay)
        ww = self.bonus + k
        p = torch.maximum(pp, ww)
        e1, e2 = torch.exp(pp - p), torch.exp(ww - p)
        wkv = (e1 * aa + e2 * v) / (e1 * bb + e2)
        ww = pp + w
        p = torch.maximum(ww, k)
        e1, e2 = torch.exp(ww - p), torch.exp(k - p)
        state = (x, e1 * aa + e2 * v, e1 * bb + e2, p)
        return self.output(torch.sigmoid(r) * wkv), state


def _rwkv_flops(d: int, L: int) -> float:
    """Projections, then per channel and token (numerator and denominator): ``C+1`` within-chunk
    multiply-adds (chunk end states included) and ``⌈L/C⌉/C`` for the carried states."""
    C = RWKV_CHUNK
    nc = math.ceil(max(L, 1) / C)
    return 8.0 * d**2 + 4.0 * (C + 1) * d + 4.0 * nc * d / C


register(
    BlockKind(
        name="rwkv",
        role="token_mixer",
        params=RWKVParams,
        build=lambda p, c: RWKVTimeMix(c.d_model),
        n_params=lambda p, c: 4 * c.d_model * c.d_model + 5 * c.d_model,
        flops=lambda p, c, L: _rwkv_flops(c.d_model, L),
        state_bytes=lambda p, c, L: 4 * 4 * c.d_model,
        paper="Peng et al., 2023, 'RWKV: Reinventing RNNs for the Transformer Era' (RWKV-4)",
        summary="RWKV-4 time mixing: token shift, per-channel decay w and bonus u, receptance",
        recurrent=True,
    )
)


class RWKVChannelMixParams(KindParams):
    expansion: float = Field(4.0, gt=0, le=64)
    d_ff: int | None = Field(None, gt=0, le=MAX_HIDDEN)
    multiple_of: int = Field(1, ge=1, le=MAX_DIM)


def _cmix_h(p: RWKVChannelMixParams, c: BuildContext) -> int:
    return hidden_size(c.d_model, p.expansion, p.d_ff, p.multiple_of)


class RWKVChannelMix(nn.Module):
    """RWKV channel mixing (Peng et al., 2023): token shift, then
    ``σ(W_r x'_r) ⊙ W_v(relu(W_k x'_k)²)``; hidden width ``h``.

    ``forward``: ``[B, T, d] -> [B, T, d]``. State: the previous token ``[B, d]``.
    """

    def __init__(self, d: int, h: int) -> None:
        super().__init__()
        r = _ramp(d)
        self.mu_k = nn.Parameter(r.pow(0.5))
        self.mu_r = nn.Parameter(r.pow(0.5))
        self.key = nn.Linear(d, h, bias=False)
        self.value = nn.Linear(h, d, bias=False)
        self.receptance = nn.Linear(d, d, bias=False)
        for layer in (self.key, self.value, self.receptance):
            init_linear(layer)

    def _ffn(self, x: torch.Tensor, prev: torch.Tensor) -> torch.Tensor:
        k = F.relu(self.key(x * self.mu_k + prev * (1 - self.mu_k))).square()
        r = torch.sigmoid(self.receptance(x * self.mu_r + prev * (1 - self.mu_r)))
        return r * self.value(k)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._ffn(x, token_shift(x))

    def init_state(
        self, batch: int, device: torch.device | None = None, dtype: torch.dtype | None = None
    ) -> State:
        return (torch.zeros(batch, self.key.in_features, device=device, dtype=dtype),)

    def step(self, x: torch.Tensor, state: State) -> tuple[torch.Tensor, State]:
        return self._ffn(x, state[0]), (x,)


register(
    BlockKind(
        name="rwkv_cmix",
        role="channel_mixer",
        params=RWKVChannelMixParams,
        build=lambda p, c: RWKVChannelMix(c.d_model, _cmix_h(p, c)),
        n_params=lambda p, c: 2 * c.d_model + 2 * c.d_model * _cmix_h(p, c) + c.d_model**2,
        flops=lambda p, c, L: 4.0 * c.d_model * _cmix_h(p, c) + 2.0 * c.d_model**2,
        state_bytes=lambda p, c, L: 4 * c.d_model,
        paper="Peng et al., 2023, 'RWKV: Reinventing RNNs for the Transformer Era' (RWKV-4)",
        summary="RWKV channel mixing: token shift, squared-ReLU FFN, receptance gate",
        recurrent=True,
        flops_exact=True,
    )
)
