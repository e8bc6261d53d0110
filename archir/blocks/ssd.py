"""Structured state-space duality (role ``token_mixer``): the Mamba-2 block, kind ``mamba2``.

Dao & Gu, 2024, "Transformers are SSMs: Generalized Models and Efficient Algorithms Through
Structured State Space Duality" (SSD). Per head ``h`` (``n_heads`` heads of ``head_dim`` P
channels) the state ``S [P, d_state]`` follows

    ``S_t = exp(Δ_t·A_h) S_{t−1} + (Δ_t x_t) ⊗ B_t``,   ``y_t = S_t C_t + D_h x_t``

with a *scalar* decay per head and step (``A_h = −exp(A_log_h)``, ``Δ_t = softplus(dt_t +
dt_bias_h)``) and ``B_t, C_t [d_state]`` shared by the heads of one of ``n_groups`` groups.
A scalar decay makes the sequence map a masked matrix, ``y = (L ⊙ C Bᵀ)(Δ·x)`` with
``L_ts = exp(Σ_{s<r≤t} Δ_r A)``, which the chunked form below evaluates with matmuls.

``forward`` maps ``x [batch, seq, d_model] -> [batch, seq, d_model]`` with no loop over time
steps (``torch.onnx.export`` with a dynamic sequence axis works); ``init_state`` / ``step``
decode with a fixed-size state and reproduce ``forward``.

Cost conventions: FLOPs per token at length ``L`` are the matmul-class work ``forward`` does
(projections, depthwise convolution, the chunked SSD matmuls at the padded length; a
multiply-add is 2 FLOPs) — exactly what ``torch.utils.flop_counter`` counts; state bytes are
the fixed decode state in fp32 (convolution window and SSM state).
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

#: Longest chunk of the chunked form. Within a chunk the sequence map is the masked matrix
#: ``L ⊙ C Bᵀ`` (``[CHUNK, CHUNK]`` per head); between chunks the chunk end states are carried
#: through a ``[n_chunks, n_chunks]`` decay matrix. Eagerly a length ``T`` is cut into
#: ``⌈T/CHUNK⌉`` chunks of ``⌈T/⌈T/CHUNK⌉⌉`` steps (the least padding); under graph capture
#: (``torch.export``, the ONNX exporters) every chunk has CHUNK steps, whatever the
#: (symbolic) length.
CHUNK = 32


def chunking(T: int, capture: bool = False) -> tuple[int, int]:
    """``(chunk, n_chunks)`` the chunked form uses at length ``T`` (see :data:`CHUNK`)."""
    if capture:
        return CHUNK, (T + CHUNK - 1) // CHUNK
    nc = max(1, -(-T // CHUNK))
    Q = max(1, -(-T // nc))
    return Q, nc


def segsum(la: torch.Tensor) -> torch.Tensor:
    """Segment sums of log-decays: ``la [..., Q] -> [..., Q, Q]`` with
    ``out[..., t, s] = Σ_{s<r≤t} la[r]`` for ``s ≤ t`` and 0 above the diagonal.

    Each entry is a cumulative sum of same-sign terms (never a difference of two prefix
    sums, which loses every digit once the prefix sums are large), so ``exp`` of it is exact
    to rounding for any decay: the SSD paper's stable "segsum" in log space.
    """
    Q = la.shape[-1]
    idx = torch.arange(Q, device=la.device)
    below = (idx[:, None] > idx[None, :]).to(la.dtype)  # [r, s]: r > s
    return torch.cumsum(la[..., :, None] * below, dim=-2)


def ssd_scan(
    x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, Bm: torch.Tensor, Cm: torch.Tensor
) -> torch.Tensor:
    """The SSD recurrence ``S_t = exp(Δ_t A) S_{t−1} + (Δ_t x_t) ⊗ B_t``, ``y_t = S_t C_t``
    (``S_{−1} = 0``), in chunked form, exact for any ``Δ·A ≤ 0`` (no clamp).

    Args:
        x: ``[B, T, H, P]`` inputs per head.
        dt: ``[B, T, H]`` step sizes ``Δ`` (≥ 0).
        A: ``[H]`` decay rates (≤ 0).
        Bm, Cm: ``[B, T, G, N]``, ``G`` groups dividing ``H`` (head ``h`` reads group
            ``h // (H/G)``).

    Returns:
        ``y [B, T, H, P]``.

    Within a chunk: ``y_diag = (exp(segsum(Δ·A)) ⊙ C Bᵀ)(Δ·x)``; each chunk's end state
    from zero ``Σ_s exp(Σ_{s<r} Δ_r A)(Δ_s x_s) ⊗ B_s``; the state entering chunk ``i``
    ``Σ_{j<i} exp(Σ_{j<r<i} g_r) S_j`` (``g``: chunk total log-decays, segment sums over
    chunks); read out as ``exp(Σ_{r≤t} Δ_r A)·(state C_t)``. Every exponent is a sum of
    log-decays ≤ 0 computed without subtraction (:func:`segsum`), so nothing overflows and
    strong decays (``Δ·A`` of −50 and below) lose no precision. No loop over time; autograd
    and ``torch.export`` follow it (a symbolic length pads symbolically).
    """
    Bsz, T, H, P = x.shape
    G, N = Bm.shape[-2:]
    R = H // G  # heads per group
    capture = tracing()
    Q, nc = chunking(T, capture)
    pad = nc * Q - T
    if capture or pad:  # padded steps: Δ = 0 (no decay), no input, no read-out
        x, dt = F.pad(x, (0, 0, 0, 0, 0, pad)), F.pad(dt, (0, 0, 0, pad))
        Bm, Cm = F.pad(Bm, (0, 0, 0, 0, 0, pad)), F.pad(Cm, (0, 0, 0, 0, 0, pad))
    # chunked layouts: per-head [B, nc, G, R, Q, ·], per-group [B, nc, G, Q, N]
    la = (dt * A).reshape(Bsz, nc, Q, G, R).permute(0, 1, 3, 4, 2)  # [B, nc, G, R, Q]
    xd = (x * dt[..., None]).reshape(Bsz, nc, Q, G, R, P).permute(0, 1, 3, 4, 2, 5)
    Bc = Bm.reshape(Bsz, nc, Q, G, N).transpose(2, 3)  # [B, nc, G, Q, N]
    Cc = Cm.reshape(Bsz, nc, Q, G, N).transpose(2, 3)
    tril = torch.ones(Q, Q, dtype=x.dtype, device=x.device).tril()
    Lm = torch.exp(segsum(la)) * tril  # [B, nc, G, R, Q, Q]: decay from step s to t
    Gc = torch.cumsum(la, dim=-1)  # [B, nc, G, R, Q]: log-decay from the chunk start
    # 1. within each chunk: the masked "attention" form
    CB = torch.matmul(Cc, Bc.transpose(-1, -2))  # [B, nc, G, Q, Q]
    y = torch.matmul(CB[:, :, :, None] * Lm, xd)  # [B, nc, G, R, Q, P]
    if not capture and nc == 1:  # one chunk (T ≤ CHUNK, eagerly): no state enters it
        return y.permute(0, 1, 4, 2, 3, 5).reshape(Bsz, Q, H, P)
    # 2. each chunk's end state started from zero: Σ_s exp(Σ_{s<r≤Q−1} la_r) xd_s ⊗ B_s
    xe = (xd * Lm[..., -1, :, None]).transpose(-1, -2).reshape(Bsz, nc, G, R * P, Q)
    S = torch.matmul(xe, Bc)  # [B, nc, G, R·P, N]
    # 3. states carried between chunks: E[i, j] = exp(Σ_{j<r≤i} g_r) (segment sums of the
    # chunk totals g), end state of chunk i = Σ_{j≤i} E[i, j] S_j, entering chunk i+1
    g = Gc[..., -1].permute(0, 2, 3, 1)  # [B, G, R, nc]
    ntril = torch.ones(nc, nc, dtype=x.dtype, device=x.device).tril()
    E = torch.exp(segsum(g)) * ntril  # [B, G, R, nc, nc]
    Sh = S.reshape(Bsz, nc, G, R, P * N).permute(0, 2, 3, 1, 4)  # [B, G, R, nc, P·N]
    ends = torch.matmul(E, Sh)  # [B, G, R, nc, P·N]: state at each chunk's end
    enter = F.pad(ends, (0, 0, 1, 0))[:, :, :, :nc]  # the state entering each chunk
    enter = enter.reshape(Bsz, G, R, nc, P, N).permute(0, 3, 1, 5, 2, 4)  # [B,nc,G,N,R,P]
    # 4. read-out of the entering state, decayed to each step: exp(Gc_t)·(C_t·state)
    off = torch.matmul(Cc, enter.reshape(Bsz, nc, G, N, R * P)).reshape(Bsz, nc, G, Q, R, P)
    y = y + off.transpose(3, 4) * torch.exp(Gc)[..., None]  # [B, nc, G, R, Q, P]
    y = y.permute(0, 1, 4, 2, 3, 5).reshape(Bsz, nc * Q, H, P)
    return y[:, :T] if capture or pad else y


#: :func:`ssd_scan` run eagerly inside a ``torch.compile``d model (a graph break): its
#: dynamic-length chunked graph trips torch 2.13's compilers (a view in AOT autograd's
#: backward once a length of one chunk follows longer ones; Inductor's stride ordering of
#: the padded, symbolic length). ``torch.export`` and the ONNX exporters trace it.
_ssd_scan_eager = torch.compiler.disable(ssd_scan)


def ssd_flops(L: int, H: int, P: int, G: int, N: int) -> int:
    """Matmul FLOPs of :func:`ssd_scan` over one sequence of length ``L`` (eager chunking,
    padding included): ``C Bᵀ`` (2·Q·N per step and group) and the masked map times ``Δx``
    (2·Q·P per step and head); with more than one chunk also the chunk end states and the
    entering states' read-out (2·P·N each per step and head) and the carry between chunks
    (2·nc·P·N per chunk and head)."""
    Q, nc = chunking(max(L, 1))
    total = 2 * nc * Q * Q * (G * N + H * P)
    if nc > 1:
        total += 4 * nc * Q * H * P * N + 2 * H * nc * nc * P * N
    return total


# --------------------------------------------------------------------------- Mamba-2


class Mamba2Params(KindParams):
    d_state: int = Field(64, ge=1, le=MAX_DIM)
    d_conv: int = Field(4, ge=1, le=1024)
    expansion: float = Field(2.0, gt=0, le=16)
    n_heads: int = Field(4, ge=1, le=MAX_DIM)
    n_groups: int = Field(1, ge=1, le=MAX_DIM)
    dt_min: float = Field(0.001, gt=0)
    dt_max: float = Field(0.1, gt=0)
    conv_bias: bool = True
    bias: bool = False
    eps: float = Field(1e-5, gt=0)


def _dims(p: Mamba2Params, d: int) -> tuple[int, int, int]:
    """``(d_inner, head_dim, conv_dim)``."""
    di = int(round(p.expansion * d))
    return di, di // p.n_heads, di + 2 * p.n_groups * p.d_state


class GatedRMSNorm(nn.Module):
    """``RMSNorm(y ⊙ silu(z))·weight`` over groups of ``group_size`` channels (Mamba-2's
    norm before the output projection; fp32 arithmetic under half precision).
    ``y, z [..., width] -> [..., width]``."""

    def __init__(self, width: int, group_size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(width))
        self.group_size, self.eps = group_size, eps

    def forward(self, y: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        dtype = y.dtype
        if dtype not in (torch.float32, torch.float64):
            y, z = y.float(), z.float()
        y = y * F.silu(z)
        g = y.unflatten(-1, (-1, self.group_size))
        g = g * torch.rsqrt(g.pow(2).mean(-1, keepdim=True) + self.eps)
        return (g.flatten(-2) * self.weight).to(dtype)


class Mamba2(nn.Module):
    """Mamba-2 block (Dao & Gu, 2024, SSD), the layout of the reference implementation.

    ``in_proj(x) -> [z, x, B, C, dt]`` (widths ``d_inner = expansion·d``, ``d_inner``,
    ``n_groups·d_state`` twice, ``n_heads``); a causal depthwise convolution of width
    ``d_conv`` and SiLU over ``[x, B, C]``; per head the SSD recurrence (:func:`ssd_scan`)
    with ``Δ = softplus(dt + dt_bias)``, ``A = −exp(A_log)`` (a scalar per head, initialized
    uniform in [1, 16]), skip ``D`` per head; then ``out_proj(RMSNorm(y ⊙ silu(z)))``
    (normalized per group). ``head_dim = d_inner / n_heads``.

    ``forward``: ``[B, T, d] -> [B, T, d]`` by the chunked form (no clamp: exact for any
    ``Δ·A``). State: convolution window ``[B, d_inner + 2·n_groups·d_state, d_conv−1]`` and
    SSM state ``[B, n_heads, head_dim, d_state]``.
    """

    def __init__(self, d: int, p: Mamba2Params) -> None:
        super().__init__()
        di, P, cd = _dims(p, d)
        H, G, N, K = p.n_heads, p.n_groups, p.d_state, p.d_conv
        self.di, self.P, self.H, self.G, self.N, self.K, self.conv_dim = di, P, H, G, N, K, cd
        self.in_proj = linear(d, di + cd + H, bias=p.bias)
        self.conv1d = nn.Conv1d(cd, cd, K, groups=cd, bias=p.conv_bias)
        dt = torch.exp(
            torch.rand(H) * (math.log(p.dt_max) - math.log(p.dt_min)) + math.log(p.dt_min)
        ).clamp(min=1e-4)
        self.dt_bias = nn.Parameter(dt + torch.log(-torch.expm1(-dt)))  # softplus⁻¹(dt)
        self.A_log = nn.Parameter(torch.log(torch.empty(H).uniform_(1.0, 16.0)))
        self.D = nn.Parameter(torch.ones(H))
        self.norm = GatedRMSNorm(di, di // G, p.eps)
        self.out_proj = linear(di, d, bias=p.bias)

    def _split(self, zxbcdt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        z, xbc, dt = torch.split(zxbcdt, [self.di, self.conv_dim, self.H], dim=-1)
        return z, xbc, F.softplus(dt + self.dt_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        Bsz, T, _ = x.shape
        z, xbc, dt = self._split(self.in_proj(x))
        xbc = self.conv1d(F.pad(xbc.transpose(1, 2), (self.K - 1, 0)))
        xbc = F.silu(xbc.transpose(1, 2))
        xs, Bm, Cm = torch.split(xbc, [self.di, self.G * self.N, self.G * self.N], dim=-1)
        xs = xs.reshape(Bsz, T, self.H, self.P)
        Bm, Cm = Bm.reshape(Bsz, T, self.G, self.N), Cm.reshape(Bsz, T, self.G, self.N)
        # under torch.compile but not exporting: captured, yet not by an exporter
        scan = _ssd_scan_eager if tracing() and not tracing(compiling=False) else ssd_scan
        y = scan(xs, dt, -torch.exp(self.A_log), Bm, Cm) + xs * self.D[:, None]
        return self.out_proj(self.norm(y.flatten(-2), z))

    def init_state(
        self, batch: int, device: torch.device | None = None, dtype: torch.dtype | None = None
    ) -> State:
        conv = torch.zeros(batch, self.conv_dim, self.K - 1, device=device, dtype=dtype)
        h = torch.zeros(batch, self.H, self.P, self.N, device=device, dtype=dtype)
        return (conv, h)

    def step(self, x: torch.Tensor, state: State) -> tuple[torch.Tensor, State]:
        """One token: ``x [B, d]`` and ``(conv, h)`` -> ``y [B, d]`` and the next state."""
        conv, h = state
        Bsz = x.shape[0]
        z, xbc, dt = self._split(self.in_proj(x))
        window = torch.cat([conv, xbc[..., None]], dim=-1)  # [B, conv_dim, K]
        xbc = (window * self.conv1d.weight[:, 0, :]).sum(-1)
        if self.conv1d.bias is not None:
            xbc = xbc + self.conv1d.bias
        xbc = F.silu(xbc)
        xs, Bm, Cm = torch.split(xbc, [self.di, self.G * self.N, self.G * self.N], dim=-1)
        R = self.H // self.G
        xs = xs.view(Bsz, self.G, R, self.P)
        Bm, Cm = Bm.view(Bsz, self.G, 1, 1, self.N), Cm.view(Bsz, self.G, 1, 1, self.N)
        a = torch.exp(dt * -torch.exp(self.A_log)).view(Bsz, self.G, R, 1, 1)
        hg = h.view(Bsz, self.G, R, self.P, self.N)
        hg = a * hg + (dt.view(Bsz, self.G, R, 1) * xs)[..., None] * Bm
        y = (hg * Cm).sum(-1) + xs * self.D.view(self.G, R, 1)
        out = self.out_proj(self.norm(y.reshape(Bsz, self.di), z))
        return out, (window[..., 1:], hg.view(h.shape))


def _check(p: Mamba2Params, c: BuildContext) -> None:
    di = _dims(p, c.d_model)[0]
    if di < p.n_heads:
        raise ValueError(f"expansion {p.expansion} leaves an inner width {di} < n_heads")
    check_heads(p.n_heads, **{"the inner width expansion·d_model =": di})
    if p.n_heads % p.n_groups:
        raise ValueError(f"n_groups {p.n_groups} does not divide n_heads {p.n_heads}")
    if p.dt_min > p.dt_max:
        raise ValueError(f"dt_min {p.dt_min} is larger than dt_max {p.dt_max}")


def _n_params(p: Mamba2Params, c: BuildContext) -> int:
    d = c.d_model
    di, _, cd = _dims(p, d)
    H, K = p.n_heads, p.d_conv
    return (
        d * (di + cd + H)
        + (di + cd + H if p.bias else 0)  # in_proj
        + cd * K
        + (cd if p.conv_bias else 0)  # depthwise conv over [x, B, C]
        + 3 * H  # dt_bias, A_log, D
        + di  # norm weight
        + di * d
        + (d if p.bias else 0)  # out_proj
    )


def _flops(p: Mamba2Params, c: BuildContext, L: int) -> float:
    d = c.d_model
    di, P, cd = _dims(p, d)
    L = max(L, 1)
    dense = 2 * d * (di + cd + p.n_heads) + 2 * cd * p.d_conv + 2 * di * d
    return (dense * L + ssd_flops(L, p.n_heads, P, p.n_groups, p.d_state)) / L


def _state_bytes(p: Mamba2Params, c: BuildContext, L: int) -> int:
    di, _, cd = _dims(p, c.d_model)
    return 4 * (cd * (p.d_conv - 1) + di * p.d_state)


register(
    BlockKind(
        name="mamba2",
        role="token_mixer",
        params=Mamba2Params,
        build=lambda p, c: Mamba2(c.d_model, p),
        n_params=_n_params,
        flops=_flops,
        state_bytes=_state_bytes,
        check=_check,
        paper=(
            "Dao & Gu, 2024, 'Transformers are SSMs: Generalized Models and Efficient "
            "Algorithms Through Structured State Space Duality' (Mamba-2, SSD)"
        ),
        summary="Mamba-2 SSD: scalar decay per head, grouped B/C, chunked matmul form, gated norm",
        recurrent=True,
        flops_exact=True,
    )
)
