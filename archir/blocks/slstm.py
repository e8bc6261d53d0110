"""The sLSTM token mixer (role ``token_mixer``): xLSTM's scalar LSTM with memory mixing,
kind ``slstm``.

Beck, Pöppel, Spanring, Auer, Prudnikova, Kopp, Klambauer, Brandstetter & Hochreiter, 2024,
"xLSTM: Extended Long Short-Term Memory" (NX-AI/xlstm is the reference code: its sLSTM
layer and the vanilla PyTorch cell). Per head ``k`` (``n_heads`` heads of ``head_dim =
d_model / n_heads`` channels) and step ``t``, with gate pre-activations

    ``ĩ, f̃, z̃, õ = W_{i,f} x̂_t + W_{z,o} x_t + R_k h_{t−1} + b``

(``x̂ = silu(causal_conv(x))`` feeds the input and forget gates, ``x`` itself the cell input
and output gate; every ``W`` and ``R`` is block-diagonal, one ``[head_dim, head_dim]`` block
per head and gate: the recurrent *memory mixing* stays inside a head):

    ``c_t = f'_t c_{t−1} + i'_t tanh(z̃_t)``      cell
    ``n_t = f'_t n_{t−1} + i'_t``                normaliser
    ``h_t = σ(õ_t) ⊙ c_t / n_t``                  hidden state (fed back through ``R``)

with the exponential input gate ``i = exp(ĩ)``, the forget gate ``f = σ(f̃)`` (default) or
``exp(f̃)``, and the stabiliser ``m_t = max(log f_t + m_{t−1}, ĩ_t)`` that rescales both
gates, ``i' = exp(ĩ − m_t)``, ``f' = exp(log f_t + m_{t−1} − m_t)`` (both ≤ 1: nothing
overflows for any pre-activation; ``c/n`` is unchanged by the rescaling). A fresh state
(``n = 0``, the first step) has no past: there ``m_t = ĩ_t``, as the reference's first step.
The output is ``h`` normalised per head (a layer norm over each head's channels, weight over
``d_model``, no bias: the reference's multi-head group norm); the layer has no output
projection (the xLSTM sLSTM block's gated MLP is a separate ``geglu`` / ``swiglu`` channel
mixer in archir).

Why the sigmoid forget gate is the default: the reference's sLSTM cell function (``slstm``,
vanilla and CUDA) uses ``log f = logsigmoid(f̃)``; with ``f ≤ 1`` the memory can only decay and
the stabiliser stays bounded by the input-gate pre-activations. ``forget_gate: exp`` is the
paper's other choice (``log f = f̃``).

Where archir's layout differs from the reference (outputs are the same): the first-step test
``n = 0`` is per element (the reference tests ``all(n == 0)`` over the batch; after any step
``n ≥ 1``, so the two agree, and a batch may mix fresh and running states); the reference's
``min(·, 1)`` on both rescaled gates is left out (the max already bounds them by 1); the
norm weight is stored as itself (the reference stores ``weight − 1``); the ``powerlaw``
forget bias uses the reference's first-block exponent 0.3 in every layer (the reference
raises it to 1.6 with depth). Input projections start ``N(0, 2/(5·d))`` and the
convolution at PyTorch's default, as the reference's layer.

Forms. sLSTM is a true non-linear recurrence (``h_{t−1}`` enters every gate): there is no
parallel or chunked form. Eagerly (training, ``torch.compile``) ``forward`` loops over time in
Python; under export (``torch.export``, ``torch.onnx.export(dynamo=True)``,
:func:`archir.blocks.common.tracing` with ``compiling=False``) the same cell runs inside
``torch.ops.higher_order.scan``, which the dynamo ONNX exporter writes as one ONNX ``Scan``
over a symbolic sequence length (dynamic ``seq`` in the shipped graph); under TorchScript
tracing (the legacy exporter) the loop is compiled by TorchScript and written as an ONNX
``Loop``, dynamic as well.
``init_state`` / ``step`` decode one token with a fixed-size state.

Cost conventions: FLOPs per token are the matmul-class work ``forward`` does (the block-
diagonal input projections ``8·d·head_dim``, the recurrent matrices ``8·d·head_dim``, the
depthwise convolution ``2·d·conv_kernel``; a multiply-add is 2 FLOPs) — exactly what
``torch.utils.flop_counter`` counts; state bytes are the fixed decode state in fp32
(convolution window ``d·(conv_kernel−1)`` and ``h, c, n, m``, ``d`` each).
"""

from __future__ import annotations

import functools
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from archir.blocks.common import check_heads, tracing
from archir.registry import MAX_DIM, BlockKind, BuildContext, KindParams, register

State = tuple[torch.Tensor, ...]


class SLSTMParams(KindParams):
    """Parameters of ``slstm`` (names as in the reference's ``sLSTMLayerConfig``).

    Attributes:
        n_heads: heads; each has its own block of the input and recurrent matrices.
        conv_kernel: width of the causal depthwise convolution (+ SiLU) feeding the input
            and forget gates; 0: none (the gates read ``x``).
        forget_gate: ``sigmoid`` (``log f = logsigmoid(f̃)``, the reference's default) or
            ``exp`` (``log f = f̃``).
        forget_bias: initial forget-gate bias per channel of a head: ``powerlaw``
            (``5 − 12·(j/(head_dim−1))^0.3``, from 5 down to −7: the reference's
            ``powerlaw_blockdependent`` at its first block's exponent) or ``linspace``
            (3 to 6, the reference's ``small_init``).
        recurrent_init: ``zeros`` (the reference's default) or ``uniform`` (``U(±1/√d)``).
        eps: epsilon of the per-head norm.
    """

    n_heads: int = Field(4, ge=1, le=MAX_DIM)
    conv_kernel: int = Field(4, ge=0, le=1024)
    forget_gate: Literal["sigmoid", "exp"] = "sigmoid"
    forget_bias: Literal["powerlaw", "linspace"] = "powerlaw"
    recurrent_init: Literal["zeros", "uniform"] = "zeros"
    eps: float = Field(1e-5, gt=0)


def slstm_cell(
    wx: torch.Tensor,
    h: torch.Tensor,
    c: torch.Tensor,
    n: torch.Tensor,
    m: torch.Tensor,
    R: torch.Tensor,
    exp_forget: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One sLSTM step for every head (module docstring's equations).

    Args:
        wx: ``[H, B, 4, P]`` input part of the gate pre-activations ``(ĩ, f̃, z̃, õ)``
            (bias included).
        h, c, n, m: ``[H, B, P]`` the previous hidden state, cell, normaliser, stabiliser
            (all zeros: a fresh state).
        R: ``[H, P, 4·P]`` recurrent blocks, ``R[k, i, g·P + o]``: from channel ``i`` of
            ``h`` to channel ``o`` of gate ``g`` in head ``k``.
        exp_forget: ``log f = f̃`` instead of ``logsigmoid(f̃)``.

    Returns:
        the next ``(h, c, n, m)``, each ``[H, B, P]``. ``n ≥ 1`` after any step, so
        ``h`` is finite for every finite input.
    """
    pre = wx + torch.bmm(h, R).view(wx.shape)
    i, f, z, o = pre.unbind(2)
    logf = f if exp_forget else F.logsigmoid(f)
    # a fresh state has no past: log f + m -> ĩ, so m_t = ĩ_t and f' = 1 multiplies zeros
    lfm = torch.where(n == 0, i, logf + m)
    # h is the same for every m (c and n carry the same factor exp(−m)), so the gradient
    # through the stabiliser is zero: not recorded (exact; a third fewer backward ops). The
    # max as a Where: onnxruntime's fp16 converter keeps Max in fp32 and its casts inside
    # the exported Scan body break the graph ("Graph is not a DAG")
    m_new = torch.where(lfm > i, lfm, i).detach()
    ig = torch.exp(i - m_new)
    fg = torch.exp(lfm - m_new)
    c_new = fg * c + ig * torch.tanh(z)
    n_new = fg * n + ig
    h_new = torch.sigmoid(o) * c_new / n_new
    return h_new, c_new, n_new, m_new


def _scan_fn():  # type: ignore[no-untyped-def]
    from torch._higher_order_ops.scan import scan

    return scan


def _loop(wx: torch.Tensor, R: torch.Tensor, exp_forget: bool) -> torch.Tensor:
    """The Python loop of :func:`slstm_recurrence` (also compiled by TorchScript)."""
    z0 = torch.zeros(wx.size(1), wx.size(2), wx.size(4), dtype=wx.dtype, device=wx.device)
    h, c, n, m = z0, z0, z0, z0
    out: list[torch.Tensor] = []
    for wt in wx.unbind(0):  # unbind: one gradient buffer (wx[t] would fill one per step)
        h, c, n, m = slstm_cell(wt, h, c, n, m, R, exp_forget)
        out.append(h)
    return torch.stack(out)


@functools.cache
def _scripted_loop() -> Any:
    """:func:`_loop` compiled by TorchScript, once: what the TorchScript (legacy) ONNX
    exporter writes as an ONNX ``Loop`` over a dynamic length (tracing would unroll it)."""
    return torch.jit.script(_loop)


def slstm_recurrence(
    wx: torch.Tensor, R: torch.Tensor, exp_forget: bool, capture: bool | None = None
) -> torch.Tensor:
    """The sLSTM recurrence from a fresh state over a whole sequence.

    Args:
        wx: ``[T, H, B, 4, P]`` input parts of the gate pre-activations.
        R: ``[H, P, 4·P]`` recurrent blocks (:func:`slstm_cell`).
        exp_forget: exponential forget gate.
        capture: run as ``torch.ops.higher_order.scan`` (one ONNX ``Scan`` over a symbolic
            length) instead of a Python loop; default: while exporting
            (``tracing(compiling=False)``). Under TorchScript tracing (the legacy ONNX
            exporter) the loop runs compiled by TorchScript (an ONNX ``Loop``).

    Returns:
        ``h [T, H, B, P]`` at every step.
    """
    if capture is None:
        if torch.jit.is_tracing():
            return _scripted_loop()(wx, R, exp_forget)  # type: ignore[no-any-return]
        capture = tracing(compiling=False)
    if capture:
        z0 = wx.new_zeros(wx.shape[1], wx.shape[2], wx.shape[4])

        def body(
            carry: tuple[torch.Tensor, ...], wt: torch.Tensor
        ) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
            h, c, n, m = carry
            h, c, n, m = slstm_cell(wt, h, c, n, m, R, exp_forget)
            return (h, c, n, m), h.clone()

        _, hs = _scan_fn()(body, (z0, z0.clone(), z0.clone(), z0.clone()), wx)
        return hs  # type: ignore[no-any-return]
    return _loop(wx, R, exp_forget)


def _forget_bias(p: SLSTMParams, P: int) -> torch.Tensor:
    if p.forget_bias == "linspace":
        return torch.linspace(3.0, 6.0, P)
    return 5.0 - 12.0 * torch.linspace(0.0, 1.0, P) ** 0.3


class SLSTM(nn.Module):
    """sLSTM layer (Beck et al., 2024, xLSTM), the reference's post-up-projection layout.

    ``forward``: ``x [B, T, d] -> [B, T, d]``: causal depthwise convolution of width
    ``conv_kernel`` + SiLU feeding the input and forget gates, block-diagonal input
    projections (``W [4, H, P, P]``: gate, head, out, in), the recurrence of
    :func:`slstm_cell` with recurrent blocks ``R [H, P, 4, P]`` (head, in, gate, out) and
    bias ``b [4, H, P]``, then a per-head layer norm with weight ``[d]``. ``P = d / H``.

    State (``init_state`` / ``step``): convolution window ``[B, d, conv_kernel − 1]`` (when
    ``conv_kernel > 1``), then ``h, c, n, m`` each ``[B, H, P]``, zeros before the first
    token.
    """

    def __init__(self, d: int, p: SLSTMParams) -> None:
        super().__init__()
        H = p.n_heads
        P = d // H
        self.d, self.H, self.P, self.K, self.eps = d, H, P, p.conv_kernel, p.eps
        self.exp_forget = p.forget_gate == "exp"
        self.conv1d = nn.Conv1d(d, d, self.K, groups=d, bias=True) if self.K else None
        self.W = nn.Parameter(torch.randn(4, H, P, P) * (2.0 / (5.0 * d)) ** 0.5)
        R = torch.zeros(H, P, 4, P)
        if p.recurrent_init == "uniform":
            R.uniform_(-(d**-0.5), d**-0.5)
        self.R = nn.Parameter(R)
        b = torch.zeros(4, H, P)
        b[1] = _forget_bias(p, P)
        self.bias = nn.Parameter(b)
        self.norm_weight = nn.Parameter(torch.ones(d))

    def _gates(self, xc: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """``(ĩ, f̃, z̃, õ)`` input parts ``[T, H, B, 4, P]`` of ``xc, x [B, T, d]`` (the
        convolved input feeds ``i, f``; ``x`` feeds ``z, o``)."""
        B, T, _ = x.shape
        xh = x.view(B, T, self.H, self.P)
        if self.conv1d is None:
            wx = torch.einsum("bthi,ghoi->thbgo", xh, self.W)
        else:
            xch = xc.view(B, T, self.H, self.P)
            wx = torch.cat(
                [
                    torch.einsum("bthi,ghoi->thbgo", xch, self.W[:2]),
                    torch.einsum("bthi,ghoi->thbgo", xh, self.W[2:]),
                ],
                dim=3,
            )
        return wx + self.bias.transpose(0, 1)[:, None]

    def _out(self, h: torch.Tensor) -> torch.Tensor:
        """Per-head layer norm: ``h [..., H, P] -> [..., d]``."""
        y = F.layer_norm(h, (self.P,), eps=self.eps)
        return y.flatten(-2) * self.norm_weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, d = x.shape
        xc = x
        if self.conv1d is not None:
            xc = self.conv1d(F.pad(x.transpose(1, 2), (self.K - 1, 0)))
            xc = F.silu(xc.transpose(1, 2))
        wx = self._gates(xc, x)
        hs = slstm_recurrence(wx, self.R.view(self.H, self.P, 4 * self.P), self.exp_forget)
        return self._out(hs.permute(2, 0, 1, 3))  # [T, H, B, P] -> [B, T, H, P]

    def init_state(
        self, batch: int, device: torch.device | None = None, dtype: torch.dtype | None = None
    ) -> State:
        z = [torch.zeros(batch, self.H, self.P, device=device, dtype=dtype) for _ in range(4)]
        if self.K > 1:
            return (torch.zeros(batch, self.d, self.K - 1, device=device, dtype=dtype), *z)
        return tuple(z)

    def step(self, x: torch.Tensor, state: State) -> tuple[torch.Tensor, State]:
        """One token: ``x [B, d]`` and the state (class docstring) -> ``y [B, d]`` and the
        next state."""
        xc, window = x, None
        if self.K > 1:
            conv = state[0]
            window = torch.cat([conv, x[..., None]], dim=-1)  # [B, d, K]
        elif self.K == 1:
            window = x[..., None]
        if window is not None:
            assert self.conv1d is not None and self.conv1d.bias is not None
            xc = F.silu((window * self.conv1d.weight[:, 0, :]).sum(-1) + self.conv1d.bias)
        h, c, n, m = (s.transpose(0, 1) for s in state[-4:])  # [H, B, P]
        wx = self._gates(xc[:, None], x[:, None])[0]  # [H, B, 4, P]
        R = self.R.view(self.H, self.P, 4 * self.P)
        h, c, n, m = slstm_cell(wx, h, c, n, m, R, self.exp_forget)
        y = self._out(h.transpose(0, 1))
        new = tuple(s.transpose(0, 1).contiguous() for s in (h, c, n, m))
        if self.K > 1:
            assert window is not None
            return y, (window[..., 1:], *new)
        return y, new


def _check(p: SLSTMParams, c: BuildContext) -> None:
    check_heads(p.n_heads, d_model=c.d_model)


def _n_params(p: SLSTMParams, c: BuildContext) -> int:
    d = c.d_model
    P = d // p.n_heads
    conv = d * p.conv_kernel + d if p.conv_kernel else 0
    return conv + 4 * d * P + 4 * d * P + 4 * d + d  # conv, W, R, bias, norm


def _flops(p: SLSTMParams, c: BuildContext, L: int) -> float:
    d = c.d_model
    P = d // p.n_heads
    return float(2 * d * p.conv_kernel + 8 * d * P + 8 * d * P)


def _state_bytes(p: SLSTMParams, c: BuildContext, L: int) -> int:
    d = c.d_model
    return 4 * (d * max(p.conv_kernel - 1, 0) + 4 * d)


register(
    BlockKind(
        name="slstm",
        role="token_mixer",
        params=SLSTMParams,
        build=lambda p, c: SLSTM(c.d_model, p),
        n_params=_n_params,
        flops=_flops,
        state_bytes=_state_bytes,
        check=_check,
        paper=(
            "Beck et al., 2024, 'xLSTM: Extended Long Short-Term Memory' (sLSTM: exponential "
            "gating, stabiliser, block-diagonal memory mixing)"
        ),
        summary="xLSTM sLSTM: exponential gates, stabilised normaliser, per-head recurrent "
        "memory mixing; exports as an ONNX Scan",
        recurrent=True,
        extra={"flops_exact": True},
    )
)
