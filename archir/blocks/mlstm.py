"""The matrix-memory LSTM of xLSTM (role ``token_mixer``): the mLSTM block, kind ``mlstm``.

Beck, Pöppel, Spanring, Auer, Prudnikova, Kopp, Klambauer, Brandstetter & Hochreiter, 2024,
"xLSTM: Extended Long Short-Term Memory" (reference code: NX-AI/xlstm, ``mLSTMLayer`` and its
pure-PyTorch backends). Per head, with ``k`` scaled by ``1/√d_head`` and gate pre-activations
``ĩ_t, f̃_t`` (scalars per head and step), the stabilised recurrence is

    ``m_t = max(log σ(f̃_t) + m_{t−1}, ĩ_t)``
    ``C_t = exp(log σ(f̃_t) + m_{t−1} − m_t) C_{t−1} + exp(ĩ_t − m_t) k_t v_tᵀ``
    ``n_t = exp(log σ(f̃_t) + m_{t−1} − m_t) n_{t−1} + exp(ĩ_t − m_t) k_t``
    ``h̃_t = C_tᵀ q_t / (max(|n_tᵀ q_t|, exp(−m_t)) + eps)``  (``−m_t`` capped at 80: see
    :data:`_MAX_NEG_M`)

from ``C_0 = 0``, ``n_0 = 0``, ``m_0 = 0``: an exponential input gate, a sigmoid forget gate
(in log space), the normaliser state ``n`` and the max-stabiliser ``m``. Unrolled,
``m_t = max(F_t, max_{s≤t}(F_t − F_s + ĩ_s))`` with ``F_t = Σ_{r≤t} log σ(f̃_r)`` (the first
term is the initial ``m_0 = 0``), and every exponent above is ``≤ 0``, so nothing overflows.
Without ``eps`` the output does not depend on ``m`` at all (``C̃ q / max(|ñᵀq|, 1)`` of the
unstabilised states); ``eps`` (1e-6 in the reference) is added after the stabilisation, as
there.

``forward`` maps ``x [batch, seq, d_model] -> [batch, seq, d_model]`` by the chunkwise-parallel
form (:func:`mlstm_scan`): no loop over time steps, linear in the length apart from a
``[n_chunks, n_chunks]`` carry, exportable with a dynamic sequence axis. ``init_state`` /
``step`` decode with a fixed-size state and reproduce ``forward``.

Cost conventions: FLOPs per token at length ``L`` are the matmul-class work ``forward`` does
(projections, depthwise convolution, the chunked matmuls at the padded length; a multiply-add
is 2 FLOPs) — exactly what ``torch.utils.flop_counter`` counts; state bytes are the fixed
decode state in fp32 (convolution window, ``C``, ``n`` and ``m``).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from archir.blocks.common import check_heads, hidden_size, tracing
from archir.blocks.ssd import segsum
from archir.registry import MAX_DIM, BlockKind, BuildContext, KindParams, register

State = tuple[torch.Tensor, ...]

_NEG_INF = float("-inf")
#: cap on ``−m`` in the normaliser's floor ``exp(−m)``: a closed forget gate with a strongly
#: negative input gate drives the stabiliser below −88, where fp32 ``exp(−m)`` is ``inf``; the
#: output was then 0 (as in the reference) but every gradient NaN. Capped, the floor is e^80
#: there: the output is ``num / e^80`` (below 1e-34 of ``num``, whose terms are ≤ 1 times
#: ``q·k``, ``v``) and the gradients finite.
_MAX_NEG_M = 80.0


def _floor(m: torch.Tensor) -> torch.Tensor:
    """The normaliser's lower bound ``exp(−m)``, with ``−m`` capped at :data:`_MAX_NEG_M`."""
    return torch.exp(torch.clamp(-m, max=_MAX_NEG_M))


def chunking(T: int, chunk: int, capture: bool = False) -> tuple[int, int]:
    """``(Q, n_chunks)`` of the chunked form at length ``T`` with longest chunk ``chunk``.

    Eagerly ``⌈T/chunk⌉`` chunks of ``⌈T/n_chunks⌉`` steps (the least padding); under graph
    capture (``torch.export``, the ONNX exporters, ``torch.compile``) every chunk has
    ``chunk`` steps, whatever the (symbolic) length."""
    if capture:
        return chunk, (T + chunk - 1) // chunk
    nc = max(1, -(-T // chunk))
    return max(1, -(-T // nc)), nc


def mlstm_scan(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    igate: torch.Tensor,
    fgate: torch.Tensor,
    chunk: int = 64,
    eps: float = 1e-6,
) -> torch.Tensor:
    """The stabilised mLSTM recurrence (module docstring) from a zero state, chunkwise.

    Args:
        q, k, v: ``[B, T, H, Dh]`` queries, keys (unscaled: ``1/√Dh`` is applied here) and
            values per head.
        igate, fgate: ``[B, T, H]`` input and forget gate pre-activations ``ĩ, f̃``.
        chunk: longest chunk (see :func:`chunking`).
        eps: added to the denominator after the max.

    Returns:
        ``h̃ [B, T, H, Dh]``.

    Within a chunk the map is the masked matrix ``exp(logD − m_t) ⊙ (q kᵀ)`` with
    ``logD[t, s] = Σ_{s<r≤t} log σ(f̃_r) + ĩ_s`` (segment sums of same-sign terms, never a
    difference of prefix sums); values carry a column of ones so the same products give
    ``nᵀq``. Each chunk's end state from zero is stabilised by its own max ``mloc``; the state
    entering chunk ``c`` (and its stabiliser) is a max-weighted sum over earlier chunks through
    an ``[n_chunks, n_chunks]`` matrix of segment sums of the chunk totals, with the zero
    initial state's ``m_0 = 0`` as chunk "−1". Every exponent is ``≤ 0``. ``m_t`` equals the
    step form's, so ``eps`` enters identically.
    """
    Bsz, T, H, Dh = q.shape
    capture = tracing()
    Q, nc = chunking(T, chunk, capture)
    pad = nc * Q - T
    lf = F.logsigmoid(fgate)
    k = k * (1.0 / math.sqrt(Dh))
    v1 = torch.cat([v, torch.ones_like(v[..., :1])], dim=-1)  # [B, T, H, Dh+1]
    if capture or pad:  # padded steps sit after every real one: causally unseen
        q, k, v1 = (F.pad(t, (0, 0, 0, 0, 0, pad)) for t in (q, k, v1))
        igate, lf = F.pad(igate, (0, 0, 0, pad)), F.pad(lf, (0, 0, 0, pad))

    def chunks(t: torch.Tensor) -> torch.Tensor:  # [B, nc·Q, H, e] -> [B, H, nc, Q, e]
        # contiguous: batched matmuls over (B, H, nc) then fold without a stride check that
        # torch.export would resolve by specializing the (symbolic) chunk count
        return t.reshape(Bsz, nc, Q, H, -1).permute(0, 3, 1, 2, 4).contiguous()

    qc, kc, vc = chunks(q), chunks(k), chunks(v1)
    ic = igate.reshape(Bsz, nc, Q, H).permute(0, 3, 1, 2)  # [B, H, nc, Q]
    bc = lf.reshape(Bsz, nc, Q, H).permute(0, 3, 1, 2)
    idx = torch.arange(Q, device=q.device)
    causal = idx[:, None] >= idx[None, :]
    logD = torch.where(causal, segsum(bc) + ic[..., None, :], _NEG_INF)  # [B, H, nc, Q, Q]
    Fc = torch.cumsum(bc, dim=-1)  # [B, H, nc, Q]: log-decay from the chunk start
    if not capture and nc == 1:  # one chunk (eagerly): the zero state enters, m_0 = 0
        m = torch.maximum(logD.amax(-1), Fc)
        out = torch.matmul(
            torch.matmul(qc, kc.transpose(-1, -2)) * torch.exp(logD - m[..., None]), vc
        )
    else:
        # each chunk's end state from zero, stabilised by its own max mloc
        last = logD[..., -1, :]  # [B, H, nc, Q]
        mloc = last.amax(-1)  # [B, H, nc]
        kw = kc * torch.exp(last - mloc[..., None])[..., None]
        S = torch.matmul(kw.transpose(-1, -2), vc)  # [B, H, nc, Dh, Dh+1]
        # the state entering chunk c: index 0 is the zero initial state (m_0 = 0), index
        # j ≥ 1 the end state of chunk j−1, decayed by the totals g of the chunks between
        g = F.pad(Fc[..., -1], (1, 0))[..., :nc]  # [B, H, nc] (slices of nc + 1, never
        mp = F.pad(mloc, (1, 0))[..., :nc]  # of nc − 1: torch.export keeps nc symbolic)
        cidx = torch.arange(nc, device=q.device)
        ccausal = cidx[:, None] >= cidx[None, :]
        Mlog = torch.where(ccausal, segsum(g) + mp[..., None, :], _NEG_INF)  # [B, H, nc, nc]
        m_in = Mlog.amax(-1)  # [B, H, nc]: stabiliser of the entering state
        E = torch.exp(Mlog - m_in[..., None])  # [B, H, nc, nc]
        Sp = F.pad(S, (0, 0, 0, 0, 1, 0))[:, :, :nc]  # [B, H, nc, Dh, Dh+1]: index 0 zero
        C_in = torch.matmul(E, Sp.flatten(-2)).unflatten(-1, (Dh, Dh + 1))
        carried = Fc + m_in[..., None]  # [B, H, nc, Q]
        m = torch.maximum(logD.amax(-1), carried)
        out = torch.matmul(
            torch.matmul(qc, kc.transpose(-1, -2)) * torch.exp(logD - m[..., None]), vc
        )
        out = out + torch.matmul(qc, C_in) * torch.exp(carried - m)[..., None]
    num, qn = out[..., :Dh], out[..., Dh:]
    h = num / (torch.maximum(qn.abs(), _floor(m)[..., None]) + eps)  # [B, H, nc, Q, Dh]
    h = h.permute(0, 2, 3, 1, 4).reshape(Bsz, nc * Q, H, Dh)
    return h[:, :T] if capture or pad else h


#: :func:`mlstm_scan` run eagerly inside a ``torch.compile``d model (a graph break), as
#: Mamba-2's scan: its dynamic-length chunked graph is traced by ``torch.export`` and the
#: ONNX exporters, not compiled.
_mlstm_scan_eager = torch.compiler.disable(mlstm_scan)


def _compiling_only() -> bool:
    return tracing() and not tracing(compiling=False)


def mlstm_flops(L: int, H: int, Dh: int, chunk: int) -> int:
    """Matmul FLOPs of :func:`mlstm_scan` over one sequence of length ``L`` (eager chunking,
    padding included): ``q kᵀ`` (2·Q·Dh per step and head) and the masked map times
    ``[v, 1]`` (2·Q·(Dh+1)); with more than one chunk also each chunk's end state and the
    entering state's read-out (2·Dh·(Dh+1) each per step and head) and the carry between
    chunks (2·nc²·Dh·(Dh+1) per head)."""
    Q, nc = chunking(max(L, 1), chunk)
    total = 2 * H * nc * Q * Q * (2 * Dh + 1)
    if nc > 1:
        total += H * (4 * nc * Q + 2 * nc * nc) * Dh * (Dh + 1)
    return total


# --------------------------------------------------------------------------- the block


class MLSTMParams(KindParams):
    n_heads: int = Field(4, ge=1, le=MAX_DIM)
    expansion: float = Field(2.0, gt=0, le=16)
    multiple_of: int = Field(64, ge=1, le=MAX_DIM)
    conv_kernel: int = Field(4, ge=1, le=1024)
    qkv_blocksize: int = Field(4, ge=1, le=MAX_DIM)
    chunk: int = Field(64, ge=1, le=4096)
    bias: bool = False
    conv_bias: bool = True
    eps: float = Field(1e-6, ge=0)
    norm_eps: float = Field(1e-5, gt=0)


def _inner(p: MLSTMParams, d: int) -> int:
    """The up-projected width: ``expansion·d`` rounded up to a multiple of ``multiple_of``."""
    return hidden_size(d, p.expansion, None, p.multiple_of)


class BlockDiagonal(nn.Module):
    """A block-diagonal linear map (the reference's ``LinearHeadwiseExpand`` without
    expansion): ``[..., n·b] -> [..., n·b]``, each of ``n`` blocks of ``b`` features mapped by
    its own ``[b, b]`` matrix (``weight [n, b_out, b_in]``), plus an optional bias."""

    def __init__(self, width: int, block: int, bias: bool, std: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(width // block, block, block) * std)
        self.bias = nn.Parameter(torch.zeros(width)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, b, _ = self.weight.shape
        y = torch.einsum("...nd,nod->...no", x.unflatten(-1, (n, b)), self.weight).flatten(-2)
        return y if self.bias is None else y + self.bias


class MLSTM(nn.Module):
    """The mLSTM block of xLSTM (Beck et al., 2024), pre-up-projection, the reference layout.

    ``proj_up(x) -> [x_m, z]`` (each ``d_inner = expansion·d`` rounded up to ``multiple_of``);
    a causal depthwise convolution of width ``conv_kernel`` and SiLU on ``x_m`` gives ``x_c``;
    ``q, k`` are block-diagonal maps (blocks of ``qkv_blocksize``) of ``x_c``, ``v`` of ``x_m``;
    input and forget gate pre-activations per head are linear in ``[q, k, v]``; the mLSTM cell
    (:func:`mlstm_scan`, ``n_heads`` heads of ``d_inner/n_heads``) is followed by a per-head
    LayerNorm (weight, no bias), a learnable skip ``+ skip ⊙ x_c``, the output gate
    ``⊙ silu(z)`` and ``proj_down``. Initialisation as the reference: small-init
    (``N(0, 2/(5d))``) for ``proj_up`` and ``q, k, v``; zero gate weights, forget-gate biases
    ``linspace(3, 6)`` over heads, input-gate biases ``N(0, 0.1²)``; skip and norm weights 1;
    ``proj_down`` ``N(0, 0.02²)`` (the reference scales it by the number of blocks, which a
    block does not know).

    ``forward``: ``[B, T, d] -> [B, T, d]`` by the chunkwise form. State: convolution window
    ``[B, d_inner, conv_kernel−1]``, ``C [B, H, Dh, Dh]``, ``n [B, H, Dh]``, ``m [B, H]``.
    """

    def __init__(self, d: int, p: MLSTMParams) -> None:
        super().__init__()
        di = _inner(p, d)
        H, K = p.n_heads, p.conv_kernel
        self.di, self.H, self.Dh, self.K = di, H, di // H, K
        self.chunk, self.eps = p.chunk, p.eps
        small = math.sqrt(2 / (5 * d))
        self.proj_up = nn.Linear(d, 2 * di, bias=p.bias)
        nn.init.normal_(self.proj_up.weight, std=small)
        self.conv1d = nn.Conv1d(di, di, K, groups=di, bias=p.conv_bias)
        self.q_proj = BlockDiagonal(di, p.qkv_blocksize, p.bias, small)
        self.k_proj = BlockDiagonal(di, p.qkv_blocksize, p.bias, small)
        self.v_proj = BlockDiagonal(di, p.qkv_blocksize, p.bias, small)
        self.igate = nn.Linear(3 * di, H)
        self.fgate = nn.Linear(3 * di, H)
        with torch.no_grad():
            for gate in (self.igate, self.fgate):
                gate.weight.zero_()
            self.fgate.bias.copy_(torch.linspace(3.0, 6.0, H))
            self.igate.bias.normal_(0.0, 0.1)
            if self.proj_up.bias is not None:
                self.proj_up.bias.zero_()
        self.norm_weight = nn.Parameter(torch.ones(di))
        self.norm_eps = p.norm_eps
        self.skip = nn.Parameter(torch.ones(di))
        self.proj_down = nn.Linear(di, d, bias=p.bias)
        nn.init.normal_(self.proj_down.weight, std=0.02)
        if self.proj_down.bias is not None:
            nn.init.zeros_(self.proj_down.bias)

    def _qkv_gates(
        self, xm: torch.Tensor, xc: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """``q, k, v [..., d_inner]`` and gate pre-activations ``[..., H]``."""
        q, k, v = self.q_proj(xc), self.k_proj(xc), self.v_proj(xm)
        qkv = torch.cat([q, k, v], dim=-1)
        return q, k, v, self.igate(qkv), self.fgate(qkv)

    def _out(self, h: torch.Tensor, xc: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """Per-head norm of ``h [..., H, Dh]``, skip, output gate, down-projection."""
        h = F.layer_norm(h, (self.Dh,), eps=self.norm_eps).flatten(-2) * self.norm_weight
        return self.proj_down((h + self.skip * xc) * F.silu(z))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        Bsz, T, _ = x.shape
        xm, z = self.proj_up(x).chunk(2, dim=-1)
        xc = self.conv1d(F.pad(xm.transpose(1, 2), (self.K - 1, 0)))
        xc = F.silu(xc.transpose(1, 2))
        q, k, v, ig, fg = self._qkv_gates(xm, xc)
        shape = (Bsz, T, self.H, self.Dh)
        scan = _mlstm_scan_eager if _compiling_only() else mlstm_scan
        h = scan(q.view(shape), k.view(shape), v.view(shape), ig, fg, self.chunk, self.eps)
        return self._out(h, xc, z)

    def init_state(
        self, batch: int, device: torch.device | None = None, dtype: torch.dtype | None = None
    ) -> State:
        conv = torch.zeros(batch, self.di, self.K - 1, device=device, dtype=dtype)
        C = torch.zeros(batch, self.H, self.Dh, self.Dh, device=device, dtype=dtype)
        n = torch.zeros(batch, self.H, self.Dh, device=device, dtype=dtype)
        m = torch.zeros(batch, self.H, device=device, dtype=dtype)
        return (conv, C, n, m)

    def step(self, x: torch.Tensor, state: State) -> tuple[torch.Tensor, State]:
        """One token: ``x [B, d]`` and ``(conv, C, n, m)`` -> ``y [B, d]`` and the next state."""
        conv, C, n, m = state
        Bsz = x.shape[0]
        xm, z = self.proj_up(x).chunk(2, dim=-1)
        window = torch.cat([conv, xm[..., None]], dim=-1)  # [B, d_inner, K]
        xc = (window * self.conv1d.weight[:, 0, :]).sum(-1)
        if self.conv1d.bias is not None:
            xc = xc + self.conv1d.bias
        xc = F.silu(xc)
        q, k, v, ig, fg = self._qkv_gates(xm, xc)
        q, k, v = (t.view(Bsz, self.H, self.Dh) for t in (q, k, v))
        k = k * (1.0 / math.sqrt(self.Dh))
        lf = F.logsigmoid(fg)  # [B, H]
        m_new = torch.maximum(lf + m, ig)
        fa, ia = torch.exp(lf + m - m_new), torch.exp(ig - m_new)
        C = fa[..., None, None] * C + ia[..., None, None] * (k[..., :, None] * v[..., None, :])
        n = fa[..., None] * n + ia[..., None] * k
        num = torch.matmul(q[..., None, :], C)[..., 0, :]  # [B, H, Dh]
        qn = (q * n).sum(-1, keepdim=True)
        h = num / (torch.maximum(qn.abs(), _floor(m_new)[..., None]) + self.eps)
        return self._out(h, xc, z), (window[..., 1:], C, n, m_new)


def _check(p: MLSTMParams, c: BuildContext) -> None:
    di = _inner(p, c.d_model)
    check_heads(p.n_heads, **{"the inner width expansion·d_model rounded up to multiple_of =": di})
    if di % p.qkv_blocksize:
        raise ValueError(f"qkv_blocksize {p.qkv_blocksize} does not divide the inner width {di}")


def _n_params(p: MLSTMParams, c: BuildContext) -> int:
    d, di, H, K = c.d_model, _inner(p, c.d_model), p.n_heads, p.conv_kernel
    return (
        d * 2 * di
        + (2 * di if p.bias else 0)  # proj_up
        + di * K
        + (di if p.conv_bias else 0)  # depthwise conv
        + 3 * (di * p.qkv_blocksize + (di if p.bias else 0))  # q, k, v (block-diagonal)
        + 2 * (3 * di * H + H)  # input and forget gates
        + 2 * di  # norm weight, learnable skip
        + di * d
        + (d if p.bias else 0)  # proj_down
    )


def _flops(p: MLSTMParams, c: BuildContext, L: int) -> float:
    d, di, H = c.d_model, _inner(p, c.d_model), p.n_heads
    L = max(L, 1)
    dense = (
        2 * d * 2 * di  # proj_up
        + 2 * di * p.conv_kernel  # depthwise conv
        + 3 * 2 * di * p.qkv_blocksize  # q, k, v
        + 2 * 2 * 3 * di * H  # gates
        + 2 * di * d  # proj_down
    )
    return (dense * L + mlstm_flops(L, H, di // H, p.chunk)) / L


def _state_bytes(p: MLSTMParams, c: BuildContext, L: int) -> int:
    di, H = _inner(p, c.d_model), p.n_heads
    Dh = di // H
    return 4 * (di * (p.conv_kernel - 1) + H * Dh * Dh + H * Dh + H)


register(
    BlockKind(
        name="mlstm",
        role="token_mixer",
        params=MLSTMParams,
        build=lambda p, c: MLSTM(c.d_model, p),
        n_params=_n_params,
        flops=_flops,
        state_bytes=_state_bytes,
        check=_check,
        paper=(
            "Beck et al., 2024, 'xLSTM: Extended Long Short-Term Memory' (mLSTM: matrix "
            "memory, exponential input gate, normaliser and max-stabiliser)"
        ),
        summary="xLSTM mLSTM block: matrix memory C, exp input gate, stabilised, chunkwise form",
        recurrent=True,
        flops_exact=True,
    )
)
