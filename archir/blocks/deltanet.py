"""Gated delta rule (role ``token_mixer``): the Gated DeltaNet block, kind ``gated_deltanet``.

Yang, Kautz & Hatamizadeh, 2025, "Gated Delta Networks: Improving Mamba2 with Delta Rule"
(ICLR 2025, arXiv 2412.06464), with the chunked WY/UT form of Yang et al., 2024,
"Parallelizing Linear Transformers with the Delta Rule over Sequence Length". The layer
follows flash-linear-attention's ``GatedDeltaNet`` (short causal convolutions with SiLU on
q, k, v; L2-normalised q and k; ``β = sigmoid``; a Mamba-2 gate; output RMSNorm gated by
``silu(z)``; output projection).

Per head the state ``S [d_k, d_v]`` follows

    ``S_t = α_t (I − β_t k_t k_tᵀ) S_{t−1} + β_t k_t v_tᵀ``,   ``o_t = S_tᵀ q_t``

with ``α_t = exp(g_t)``, ``g_t = −exp(A_log)·softplus(a_t + dt_bias) ≤ 0`` (a scalar per head
and step, as Mamba-2), ``β_t = sigmoid(b_t)`` (times 2 with ``allow_neg_eigval``), unit-norm
``k_t``, and ``q_t`` of norm ``d_k^{−1/2}``. Equivalently (fla's order): decay the state,
read ``S_{t−1}ᵀ k_t``, write ``k_t·β_t(v_t − α_t S_{t−1}ᵀ k_t)ᵀ``.

``forward`` maps ``x [batch, seq, d_model] -> [batch, seq, d_model]`` with no loop over time
steps (:func:`gated_delta_rule`); under graph capture (``torch.onnx.export``,
``torch.export``, ``torch.compile``) it has no loop over chunks either, so it exports with a
dynamic sequence axis up to the model's ``max_seq_len``. ``init_state`` / ``step`` decode
with a fixed-size state and reproduce ``forward``.

Cost conventions: FLOPs per token at length ``L`` are the matmul-class work the eager
``forward`` does (projections, the depthwise convolution, the chunked form at the padded
length; a multiply-add is 2 FLOPs) — exactly what ``torch.utils.flop_counter`` counts; state
bytes are the fixed decode state in fp32 (convolution window and the ``d_k × d_v`` state per
head).
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


def chunking(T: int, chunk: int, capture: bool = False) -> tuple[int, int]:
    """``(Q, n_chunks)`` of the chunked form at length ``T`` with chunks of at most ``chunk``
    steps: eagerly ``⌈T/chunk⌉`` chunks of ``⌈T/n⌉`` steps (the least padding); under graph
    capture always ``chunk`` steps per chunk, whatever the (symbolic) length."""
    if capture:
        return chunk, (T + chunk - 1) // chunk
    nc = max(1, -(-T // chunk))
    return max(1, -(-T // nc)), nc


def scan_levels(max_seq_len: int, chunk: int) -> int:
    """Levels of the log-depth scan over chunks that covers ``max_seq_len`` steps:
    ``⌈log2 ⌈max_seq_len/chunk⌉⌉`` (it composes ``2^levels`` chunks at most)."""
    n = max(1, -(-max_seq_len // chunk))
    return max(0, (n - 1).bit_length())


def segsum(g: torch.Tensor) -> torch.Tensor:
    """``g [..., Q] -> [..., Q, Q]``: ``out[..., t, s] = Σ_{s<r≤t} g[r]`` for ``s ≤ t``, 0
    above the diagonal, as cumulative sums of same-sign terms (never a difference of prefix
    sums), so ``exp`` of it is exact to rounding for any decay."""
    Q = g.shape[-1]
    idx = torch.arange(Q, device=g.device)
    below = (idx[:, None] > idx[None, :]).to(g.dtype)
    return torch.cumsum(g[..., :, None] * below, dim=-2)


def unit_lower_inverse(M: torch.Tensor, size: int | None = None) -> torch.Tensor:
    """Inverse of unit lower-triangular ``M [..., Q, Q]`` by block doubling, no loop over
    rows: with ``T_b`` the inverses of the diagonal blocks of ``b`` rows, a diagonal block of
    ``2b`` rows ``[[A, 0], [E, D]]`` has inverse ``[[A⁻¹, 0], [−D⁻¹ E A⁻¹, D⁻¹]]``;
    ``⌈log2 Q⌉`` levels of two batched matmuls (``Q`` padded to a power of two with the
    identity). Every intermediate is the inverse of a diagonal block of ``M``, so nothing
    grows (unlike a Neumann series ``(I−N)(I+N²)…``, whose partial products do). Static
    indices only: it traces to a fixed graph (``size``: ``Q`` as a Python int, for tracers
    that report shapes as tensors)."""
    Q = size if size is not None else M.shape[-1]
    P2 = 1 << max(0, (Q - 1).bit_length())
    if P2 != Q:
        M = F.pad(M, (0, P2 - Q, 0, P2 - Q))
    flat = M.reshape(*M.shape[:-2], P2 * P2)
    T = torch.ones_like(M[..., :1]).unsqueeze(-1)  # [..., P2, 1, 1] (traced batch size)
    b = 1
    while b < P2:
        n = P2 // (2 * b)  # blocks of 2b rows
        j = torch.arange(n, device=M.device)[:, None, None]
        i = torch.arange(b, device=M.device)
        rows = j * 2 * b + b + i[None, :, None]
        cols = j * 2 * b + i[None, None, :]
        E = flat.index_select(-1, (rows * P2 + cols).flatten())
        E = E.reshape(*E.shape[:-1], n, b, b)  # (unflatten bakes the batch into a trace)
        T2 = T.reshape(*T.shape[:-3], n, 2, b, b)
        Ai, Di = T2.select(-3, 0), T2.select(-3, 1)  # [..., n, b, b]
        if b == 1:  # 1×1 blocks: a product (onnxruntime's MatMul takes 0.2 ms for these)
            low = -(Di * (E * Ai))
        else:
            low = -torch.matmul(Di, torch.matmul(E, Ai))
        top = torch.cat([Ai, torch.zeros_like(Ai)], dim=-1)
        T = torch.cat([top, torch.cat([low, Di], dim=-1)], dim=-2)  # [..., n, 2b, 2b]
        b *= 2
    T = T.squeeze(-3)
    return T[..., :Q, :Q] if P2 != Q else T


def _compose_scan(A: torch.Tensor, Bs: torch.Tensor, levels: int) -> torch.Tensor:
    """Inclusive prefix of the affine maps ``S ↦ A_c S + B_c`` over the chunk axis (dim 2),
    from ``S = 0``: the state at the end of every chunk, ``[B, H, n, d_k, d_v]``.

    Hillis–Steele: at level ``j`` every map is composed with the one ``2^j`` chunks before it
    (identity before the first), ``levels`` levels cover ``2^levels`` chunks. Compositions
    multiply transitions of norm ≤ 1 in order, so tiny gates underflow to 0 harmlessly.
    """
    n, dk, dv = A.shape[2], A.shape[-1], Bs.shape[-1]
    AB = torch.cat([A, Bs], dim=-1)  # [.., n, dk, dk + dv]
    eye = torch.zeros_like(AB[:, :, :1]) + torch.eye(dk, dk + dv, dtype=A.dtype, device=A.device)
    for j in range(levels):
        s = 1 << j
        prev = torch.cat([eye.expand(-1, -1, s, -1, -1), AB], dim=2)
        prev = prev.narrow(2, 0, n)
        AB = torch.matmul(AB[..., :dk], prev) + F.pad(AB[..., dk:], (dk, 0))
    return AB[..., dk:]


def gated_delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    chunk: int = 32,
    levels: int | None = None,
) -> torch.Tensor:
    """The gated delta rule ``S_t = exp(g_t)(I − β_t k_t k_tᵀ) S_{t−1} + β_t k_t v_tᵀ``,
    ``o_t = S_tᵀ q_t`` (``S_{−1} = 0``), in chunked WY form.

    Args:
        q, k: ``[B, T, H, d_k]`` (used as given: normalise and scale them first).
        v: ``[B, T, H, d_v]``.
        g: ``[B, T, H]`` log-decays (≤ 0).
        beta: ``[B, T, H]`` write strengths.
        chunk: longest chunk (under graph capture: every chunk).
        levels: levels of the log-depth scan over chunks under graph capture (see
            :func:`scan_levels`), raised to what a concrete length needs; a symbolic length
            (``torch.export``) gets exactly ``levels``, so the exported graph is exact up to
            ``chunk·2^levels`` steps (``None``: 0).

    Returns:
        ``o [B, T, H, d_v]``.

    Within a chunk of ``Q`` steps (``Γ_t``: log-decay from the chunk start, ``D_ts =
    exp(Σ_{s<r≤t} g_r)``) the writes ``u_t = β_t(v_t − α_t S_{t−1}ᵀ k_t)`` solve
    ``(I + N) U = βV − diag(β e^Γ) K S_0`` with ``N_ts = β_t D_ts k_tᵀ k_s`` (``s < t``);
    with ``T = (I + N)^{−1}`` (:func:`unit_lower_inverse`), ``W = T βV``,
    ``Y = T diag(β e^Γ) K``, the outputs are ``O = P W + (e^Γ Q − P Y) S_0`` with
    ``P = (Q Kᵀ) ⊙ D`` and the chunk maps ``S_0 ↦ A S_0 + B``, ``A = e^{Γ_Q} I − K̃ᵀ Y``,
    ``B = K̃ᵀ W``, ``K̃_s = D_{Q s} k_s``. Every exponent is a sum of log-decays ≤ 0 formed
    without subtraction, so any decay is exact. Between chunks: eagerly a loop over chunks
    (``S ← A S + B``); under capture the log-depth scan :func:`_compose_scan`.
    """
    Bsz, T, H, dk = q.shape
    dv = v.shape[-1]
    capture = tracing()
    Q, nc = chunking(T, chunk, capture)
    pad = nc * Q - T
    if capture or pad:  # padded steps: no decay, no write, no read-out
        q, k, v = (F.pad(t, (0, 0, 0, 0, 0, pad)) for t in (q, k, v))
        g, beta = F.pad(g, (0, 0, 0, pad)), F.pad(beta, (0, 0, 0, pad))
    # [B, H, nc, Q, ·]
    qc, kc, vc = (t.reshape(Bsz, nc, Q, H, -1).permute(0, 3, 1, 2, 4) for t in (q, k, v))
    gc = g.reshape(Bsz, nc, Q, H).permute(0, 3, 1, 2)  # [B, H, nc, Q]
    bc = beta.reshape(Bsz, nc, Q, H).permute(0, 3, 1, 2)
    D = torch.exp(segsum(gc))  # [B, H, nc, Q, Q]
    tril = torch.ones(Q, Q, dtype=q.dtype, device=q.device).tril()
    stril = tril - torch.eye(Q, dtype=q.dtype, device=q.device)
    cum = torch.cumsum(gc, dim=-1)  # Γ
    eG = torch.exp(cum)[..., None]  # [B, H, nc, Q, 1]
    M = (kc @ kc.transpose(-1, -2)) * D * stril * bc[..., None]
    Tinv = unit_lower_inverse(M + torch.eye(Q, dtype=q.dtype, device=q.device), Q)
    rhs = torch.cat([vc, kc * eG], dim=-1) * bc[..., None]  # [βV | β e^Γ K]
    WY = Tinv @ rhs  # [B, H, nc, Q, dv + dk]
    P = (qc @ kc.transpose(-1, -2)) * (D * tril)
    PWY = P @ WY
    o = PWY[..., :dv]  # within the chunk
    if capture or nc > 1:
        W, Y = WY[..., :dv], WY[..., dv:]
        Kt = kc * D[..., -1, :, None]  # K̃: keys decayed to the chunk end
        KtT = Kt.transpose(-1, -2)
        A = (
            torch.exp(cum[..., -1])[..., None, None] * torch.eye(dk, dtype=q.dtype, device=q.device)
            - KtT @ Y
        )  # [B, H, nc, dk, dk]
        Bs = KtT @ W  # [B, H, nc, dk, dv]
        if capture:
            lv = levels if levels is not None else 0
            if isinstance(nc, int):  # a concrete length (torch.compile, tracing) past levels
                lv = max(lv, (nc - 1).bit_length())
            ends = _compose_scan(A, Bs, lv)
            enter = F.pad(ends, (0, 0, 0, 0, 1, 0)).narrow(2, 0, nc)
        else:
            S = Bs[:, :, 0]
            states = [torch.zeros_like(S), S]
            for c in range(1, nc - 1):
                S = A[:, :, c] @ S + Bs[:, :, c]
                states.append(S)
            enter = torch.stack(states, dim=2)
        Qe = qc * eG - PWY[..., dv:]  # e^Γ Q − P Y
        o = o + Qe @ enter
    o = o.permute(0, 2, 3, 1, 4).reshape(Bsz, nc * Q, H, dv)
    return o[:, :T] if capture or pad else o


#: :func:`gated_delta_rule` run eagerly inside a ``torch.compile``d model (a graph break):
#: the loopless form's dynamic-length graph trips AOT autograd's backward (a view over the
#: padded, symbolic length) once a second length is compiled, as Mamba-2's SSD scan does.
#: ``torch.export`` and the ONNX exporters trace it.
_gated_delta_rule_eager = torch.compiler.disable(gated_delta_rule)


def _compiling_only() -> bool:
    """Under ``torch.compile`` but not exporting (``torch.export``, ``torch.onnx``)."""
    return torch.compiler.is_compiling() and not (
        torch.compiler.is_exporting() or torch.onnx.is_in_onnx_export()
    )


def gdr_flops(L: int, H: int, dk: int, dv: int, chunk: int) -> int:
    """Matmul FLOPs of :func:`gated_delta_rule` run eagerly over one sequence of length
    ``L`` (padding included). Per chunk of ``Q`` steps and head: ``K Kᵀ`` and ``Q Kᵀ``
    (2·Q²·d_k each), the block inverse (``Q`` padded to a power of two ``P``: at block size
    ``b`` two matmuls of ``b³`` per block of ``2b`` rows, 2·P·b²; ``b = 2, 4, … P/2``, as
    the 1×1 blocks are elementwise products), ``T [βV | βe^Γ K]`` and ``P [W | Y]``
    (2·Q²·(d_v + d_k) each); with more than one chunk also ``A``, ``B``
    (2·Q·d_k·(d_k + d_v)), the read-out of the entering state (2·Q·d_k·d_v) and the carry
    between chunks (2·d_k²·d_v per chunk after the first two)."""
    Q, nc = chunking(max(L, 1), chunk)
    P = 1 << max(0, (Q - 1).bit_length())
    inverse = sum(2 * P * b * b for b in (1 << i for i in range(1, P.bit_length() - 1)))
    per = 4 * Q * Q * dk + inverse + 4 * Q * Q * (dv + dk)
    total = nc * per
    if nc > 1:
        total += nc * (2 * Q * dk * (dk + dv) + 2 * Q * dk * dv)
        total += max(0, nc - 2) * 2 * dk * dk * dv
    return H * total


# --------------------------------------------------------------------------- Gated DeltaNet


class GatedDeltaNetParams(KindParams):
    """Parameters of ``gated_deltanet`` (fla's ``GatedDeltaNet`` names in brackets).

    ``n_heads`` [num_heads]; ``head_dim``: key/query width per head ``d_k`` (default
    ``d_model / n_heads``); ``expand_v``: value width per head ``d_v = expand_v·d_k``;
    ``d_conv`` [conv_size]: short causal convolution width on q, k, v; ``conv_bias``;
    ``use_gate``: output RMSNorm gated by ``silu(z)`` (else a plain RMSNorm);
    ``allow_neg_eigval``: ``β ∈ (0, 2)``; ``chunk``: steps per chunk of the chunked form;
    ``dt_min``/``dt_max``/``dt_init_floor``: initial ``softplus(dt_bias)`` range (Mamba-2's);
    ``bias``: biases of the projections; ``eps``: the output norm's epsilon [norm_eps].
    """

    n_heads: int = Field(4, ge=1, le=MAX_DIM)
    head_dim: int | None = Field(None, ge=1, le=MAX_DIM)
    expand_v: float = Field(2.0, gt=0, le=16)
    d_conv: int = Field(4, ge=1, le=1024)
    conv_bias: bool = False
    use_gate: bool = True
    allow_neg_eigval: bool = False
    chunk: int = Field(32, ge=1, le=256)
    dt_min: float = Field(0.001, gt=0)
    dt_max: float = Field(0.1, gt=0)
    dt_init_floor: float = Field(1e-4, gt=0)
    bias: bool = False
    eps: float = Field(1e-5, gt=0)


def _dims(p: GatedDeltaNetParams, d: int) -> tuple[int, int, int]:
    """``(d_k, d_v, conv_dim)`` per head / of the convolution."""
    dk = p.head_dim if p.head_dim is not None else d // p.n_heads
    dv = int(round(p.expand_v * dk))
    return dk, dv, p.n_heads * (2 * dk + dv)


def l2norm(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """``x / sqrt(Σx² + eps)`` over the last axis (fla's ``l2norm``)."""
    return x * torch.rsqrt(x.pow(2).sum(-1, keepdim=True) + eps)


class GatedOutputNorm(nn.Module):
    """``RMSNorm(o)·weight ⊙ silu(z)`` over each head's ``d_v`` channels (normalise, then
    gate: fla's ``FusedRMSNormGated``; Mamba-2's norm gates first); without ``gated`` a plain
    RMSNorm. ``o, z [..., d_v] -> [..., d_v]``; fp32 arithmetic under half precision."""

    def __init__(self, width: int, eps: float, gated: bool) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(width))
        self.eps, self.gated = eps, gated

    def forward(self, o: torch.Tensor, z: torch.Tensor | None) -> torch.Tensor:
        dtype = o.dtype
        if dtype not in (torch.float32, torch.float64):
            o = o.float()
        o = o * torch.rsqrt(o.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight
        if self.gated and z is not None:
            o = o * F.silu(z.to(o.dtype))
        return o.to(dtype)


class GatedDeltaNet(nn.Module):
    """Gated DeltaNet token mixer (Yang, Kautz & Hatamizadeh, 2025), fla's layer layout.

    ``in_proj(x) -> [q, k, v, z, b, a]`` (widths ``H·d_k`` twice, ``H·d_v``, ``H·d_v`` if
    ``use_gate``, ``H``, ``H``); a causal depthwise convolution of width ``d_conv`` and SiLU
    over ``[q, k, v]``; per head ``q ← l2norm(q)/√d_k``, ``k ← l2norm(k)``,
    ``β = sigmoid(b)`` (×2 with ``allow_neg_eigval``), ``g = −exp(A_log)·softplus(a +
    dt_bias)`` (``A`` initialised uniform in [0.01, 16], ``softplus(dt_bias)`` log-uniform in
    [dt_min, dt_max]); the gated delta rule (:func:`gated_delta_rule`); then
    ``out_proj(RMSNorm(o)·w ⊙ silu(z))`` per head.

    ``forward``: ``[B, T, d] -> [B, T, d]``. Under graph capture the scan between chunks
    covers ``max_seq_len`` steps (the exported graph's limit; archir's onnxruntime paths
    refuse longer inputs by name). State: convolution window ``[B, H·(2·d_k + d_v),
    d_conv−1]`` and ``S [B, H, d_k, d_v]``.
    """

    def __init__(self, d: int, p: GatedDeltaNetParams, max_seq_len: int = 2048) -> None:
        super().__init__()
        dk, dv, cd = _dims(p, d)
        H, K = p.n_heads, p.d_conv
        self.H, self.dk, self.dv, self.K, self.conv_dim = H, dk, dv, K, cd
        self.use_gate, self.neg, self.chunk = p.use_gate, p.allow_neg_eigval, p.chunk
        self.levels = scan_levels(max_seq_len, p.chunk)
        self.max_seq_len = max_seq_len
        self.splits = [cd, H * dv if p.use_gate else 0, H, H]
        self.in_proj = linear(d, sum(self.splits), bias=p.bias)
        self.conv1d = nn.Conv1d(cd, cd, K, groups=cd, bias=p.conv_bias)
        dt = torch.exp(
            torch.rand(H) * (math.log(p.dt_max) - math.log(p.dt_min)) + math.log(p.dt_min)
        ).clamp(min=p.dt_init_floor)
        self.dt_bias = nn.Parameter(dt + torch.log(-torch.expm1(-dt)))  # softplus⁻¹(dt)
        self.A_log = nn.Parameter(torch.log(torch.empty(H).uniform_(0.01, 16.0)))
        self.norm = GatedOutputNorm(dv, p.eps, p.use_gate)
        self.out_proj = linear(H * dv, d, bias=p.bias)

    def _gates(self, b: torch.Tensor, a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        beta = torch.sigmoid(b)
        if self.neg:
            beta = 2 * beta
        return -torch.exp(self.A_log) * F.softplus(a + self.dt_bias), beta

    def _qkv(self, qkv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``[..., conv_dim] -> q, k [..., H, d_k], v [..., H, d_v]`` (q, k normalised)."""
        H, dk = self.H, self.dk
        q, k, v = torch.split(qkv, [H * dk, H * dk, H * self.dv], dim=-1)
        lead = qkv.shape[:-1]  # reshape, not unflatten: TorchScript tracing keeps it symbolic
        q = l2norm(q.reshape(*lead, H, dk)) * dk**-0.5
        k = l2norm(k.reshape(*lead, H, dk))
        return q, k, v.reshape(*lead, H, self.dv)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        qkv, z, b, a = torch.split(self.in_proj(x), self.splits, dim=-1)
        qkv = self.conv1d(F.pad(qkv.transpose(1, 2), (self.K - 1, 0)))
        q, k, v = self._qkv(F.silu(qkv.transpose(1, 2)))
        g, beta = self._gates(b, a)
        rule = _gated_delta_rule_eager if _compiling_only() else gated_delta_rule
        o = rule(q, k, v, g, beta, self.chunk, self.levels)
        o = self.norm(o, z.reshape(*z.shape[:-1], self.H, self.dv) if self.use_gate else None)
        return self.out_proj(o.reshape(*o.shape[:-2], -1))

    def init_state(
        self, batch: int, device: torch.device | None = None, dtype: torch.dtype | None = None
    ) -> State:
        conv = torch.zeros(batch, self.conv_dim, self.K - 1, device=device, dtype=dtype)
        S = torch.zeros(batch, self.H, self.dk, self.dv, device=device, dtype=dtype)
        return (conv, S)

    def step(self, x: torch.Tensor, state: State) -> tuple[torch.Tensor, State]:
        """One token: ``x [B, d]`` and ``(conv, S)`` -> ``y [B, d]`` and the next state."""
        conv, S = state
        qkv, z, b, a = torch.split(self.in_proj(x), self.splits, dim=-1)
        window = torch.cat([conv, qkv[..., None]], dim=-1)  # [B, conv_dim, K]
        qkv = (window * self.conv1d.weight[:, 0, :]).sum(-1)
        if self.conv1d.bias is not None:
            qkv = qkv + self.conv1d.bias
        q, k, v = self._qkv(F.silu(qkv))
        g, beta = self._gates(b, a)
        S = torch.exp(g)[..., None, None] * S
        u = beta[..., None] * (v - (S * k[..., None]).sum(-2))  # [B, H, d_v]
        S = S + k[..., None] * u[..., None, :]
        o = (S * q[..., None]).sum(-2)
        o = self.norm(o, z.reshape(*z.shape[:-1], self.H, self.dv) if self.use_gate else None)
        return self.out_proj(o.reshape(*o.shape[:-2], -1)), (window[..., 1:], S)


def _check(p: GatedDeltaNetParams, c: BuildContext) -> None:
    if p.head_dim is None:
        check_heads(p.n_heads, d_model=c.d_model)
    dk = p.head_dim if p.head_dim is not None else c.d_model // p.n_heads
    dv = p.expand_v * dk
    if dv < 1 or abs(dv - round(dv)) > 1e-9:
        raise ValueError(
            f"expand_v {p.expand_v} times head_dim {dk} is not a whole value width ({dv:g})"
        )
    if p.dt_min > p.dt_max:
        raise ValueError(f"dt_min {p.dt_min} is larger than dt_max {p.dt_max}")


def _n_params(p: GatedDeltaNetParams, c: BuildContext) -> int:
    d = c.d_model
    dk, dv, cd = _dims(p, d)
    H = p.n_heads
    width = cd + (H * dv if p.use_gate else 0) + 2 * H
    return (
        d * width
        + (width if p.bias else 0)  # in_proj
        + cd * p.d_conv
        + (cd if p.conv_bias else 0)  # depthwise conv over [q, k, v]
        + 2 * H  # dt_bias, A_log
        + dv  # norm weight
        + H * dv * d
        + (d if p.bias else 0)  # out_proj
    )


def _flops(p: GatedDeltaNetParams, c: BuildContext, L: int) -> float:
    d = c.d_model
    dk, dv, cd = _dims(p, d)
    H = p.n_heads
    L = max(L, 1)
    width = cd + (H * dv if p.use_gate else 0) + 2 * H
    dense = 2 * d * width + 2 * cd * p.d_conv + 2 * H * dv * d
    return (dense * L + gdr_flops(L, H, dk, dv, p.chunk)) / L


def _state_bytes(p: GatedDeltaNetParams, c: BuildContext, L: int) -> int:
    dk, dv, cd = _dims(p, c.d_model)
    return 4 * (cd * (p.d_conv - 1) + p.n_heads * dk * dv)


register(
    BlockKind(
        name="gated_deltanet",
        role="token_mixer",
        params=GatedDeltaNetParams,
        build=lambda p, c: GatedDeltaNet(c.d_model, p, c.max_seq_len),
        n_params=_n_params,
        flops=_flops,
        state_bytes=_state_bytes,
        check=_check,
        paper=(
            "Yang, Kautz & Hatamizadeh, 2025, 'Gated Delta Networks: Improving Mamba2 with "
            "Delta Rule' (ICLR 2025); Yang et al., 2024, 'Parallelizing Linear Transformers "
            "with the Delta Rule over Sequence Length'"
        ),
        summary="Gated DeltaNet: gated delta rule, chunked WY form, log-depth chunk scan",
        recurrent=True,
        flops_exact=True,
    )
)
