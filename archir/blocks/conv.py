"""Convolution and MetaFormer token mixers (role ``token_mixer``).

Kinds: ``hyena`` (implicit long convolution), ``pooling`` (PoolFormer), ``sepconv``
(ConvFormer), ``token_mlp`` (MLP-Mixer token mixing) and ``identity``.

Shapes: every module maps ``x [batch, seq, d_model] -> [batch, seq, d_model]`` and accepts
any ``seq`` up to ``max_seq_len`` (``pooling``, ``sepconv`` and ``identity`` accept any
length). In a causal model (``ctx.causal``) every mixer here is causal: output ``t`` depends
only on inputs ``<= t``. ``hyena`` is causal always (it is a causal operator by design).

Cost units: FLOPs per token at sequence length ``L`` (a multiply-add is 2 FLOPs); state bytes
are the fp32 inference state a decoder keeps per sequence.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from archir.blocks.common import hidden_size, init_linear, linear_params, tracing
from archir.registry import MAX_DIM, BlockKind, BuildContext, KindParams, NoParams, register

# --------------------------------------------------------------------------- hyena


class HyenaParams(KindParams):
    """Parameters of ``hyena``.

    Conventions: ``order`` and the layout of every tensor follow the reference code,
    HazyResearch/safari ``src/models/sequence/hyena.py`` (``HyenaOperator``, ``HyenaFilter``,
    ``ExponentialModulation``), so the numbers of a safari config give the same operator and
    a safari checkpoint maps onto archir's parameters by reshapes (see :class:`Hyena`).

    Attributes:
        order: safari's ``order`` N (its default 2): ``N + 1`` input projections (gates
            ``x⁰..x^{N-1}`` and the value ``v``), ``N`` gates and ``N - 1`` long filters.
            This is *not* the paper's §3 N, whose order-N operator has N filters: safari's
            order N is the paper's order N - 1 with one more gate, applied to ``v`` before
            the first filter. (archir before this convention: its order N is today's N + 1
            with that innermost gate fixed to 1.) At least 2.
        short_kernel: width of the short depthwise causal convolution over the projections
            (safari ``short_filter_order``).
        filter_width: hidden width of the implicit-filter MLP (safari ``filter_order``).
        filter_layers: hidden (Linear + Sin) layers of the filter MLP after the first
            (safari ``num_inner_mlps``, whose default is 2).
        emb_dim: positional features fed to the filter MLP (odd: time + sin/cos bands;
            safari ``emb_dim``, whose filter default is 3).
        decay_fast, decay_slow: fractions of the sequence over which the fastest / slowest
            filter channel's exponential window decays to 1e-2 (safari ``fast_decay_pct``,
            ``slow_decay_pct``).
        fft: long-convolution path. ``auto``: FFT, except in an exported graph (ONNX's
            ``DFT`` runs slowly in onnxruntime), which holds two forms behind an ``If`` on
            the length: a direct causal convolution (a depthwise conv1d with a length-T
            kernel, O(T²)) up to :data:`DIRECT_MAX_LEN` positions, a DFT factorised into
            MatMuls (:func:`causal_conv_dft`) beyond; ``on``/``off`` force FFT / direct.
        bias: biases on the input and output projections (safari: always).
    """

    order: int = Field(2, ge=1, le=9)
    short_kernel: int = Field(3, ge=1, le=64)
    filter_width: int = Field(64, ge=1, le=MAX_DIM)
    filter_layers: int = Field(1, ge=0, le=8)
    emb_dim: int = Field(9, ge=3, le=MAX_DIM)
    decay_fast: float = Field(0.3, gt=0)
    decay_slow: float = Field(1.5, gt=0)
    fft: Literal["auto", "on", "off"] = "auto"
    bias: bool = True

    def hash_dump(self) -> dict[str, Any]:
        """The validated parameters plus the ``order`` convention (``safari``), so a stored
        study's hyena trial, built under archir's earlier order, is not taken for this one."""
        return {**super().hash_dump(), "order_convention": "safari"}


class Sin(nn.Module):
    """``sin(ω ⊙ x)`` with a trainable frequency per feature (the Hyena filter activation).
    ``[..., width] -> [..., width]``."""

    def __init__(self, width: int, w: float = 1.0) -> None:
        super().__init__()
        self.freq = nn.Parameter(torch.full((width,), w))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sin(self.freq * x)


class ImplicitFilter(nn.Module):
    """Hyena's implicit long filter: an MLP over sinusoidal positional features, times an
    exponentially decaying window, one filter per channel (Poli et al., 2023, §3.3; safari's
    ``HyenaFilter`` with ``PositionalEmbedding`` and ``ExponentialModulation``).

    ``forward(T) -> h [n_out, T]`` (the first ``T`` taps of the length-``max_len`` filter,
    so the filter at a position never depends on the sequence length). Output channel ``j``
    decays at rate ``linspace(ln(1e-2)/decay_slow, ln(1e-2)/decay_fast, n_out)[j]``; in
    :class:`Hyena` channel ``j = c·(order-1) + o`` is filter ``o`` of model channel ``c``
    (safari's channel-major ``(v o)`` layout).

    Buffers (not parameters, not in the state dict): ``z [max_len, emb]`` the positional
    features ``[t, cos(f·w), sin(−f·w)]`` (safari's ``pos_emb.z`` without its batch axis),
    ``t [max_len, 1]`` = ``linspace(0, 1, max_len)`` and ``deltas [1, n_out]`` the decay
    rates (safari's ``modulation.deltas``); the window is ``exp(−t·|δ|)``.
    """

    def __init__(self, n_out: int, max_len: int, p: HyenaParams) -> None:
        super().__init__()
        bands = (p.emb_dim - 1) // 2
        t = torch.linspace(0, 1, max_len)[:, None]
        w = 2 * math.pi * torch.arange(max_len, dtype=torch.float32)[:, None] / max_len
        f = torch.linspace(1e-4, bands - 1, bands)[None, :]
        z = torch.cat([t, torch.cos(f * w), torch.sin(-f * w)], dim=-1)  # [L, 1 + 2·bands]
        self.register_buffer("z", z, persistent=False)
        target = 1e-2
        max_decay = math.log(target) / p.decay_fast
        min_decay = math.log(target) / p.decay_slow
        # the window exp(-t·|δ|) is evaluated in forward, in the module's dtype (as safari's
        # ExponentialModulation does), not cached: in fp64 it is then fp64 throughout
        self.register_buffer("t", t, persistent=False)
        deltas = torch.linspace(min_decay, max_decay, n_out)[None, :]
        self.register_buffer("deltas", deltas, persistent=False)
        layers: list[nn.Module] = [nn.Linear(z.shape[1], p.filter_width), Sin(p.filter_width)]
        for _ in range(p.filter_layers):
            layers += [nn.Linear(p.filter_width, p.filter_width), Sin(p.filter_width)]
        layers.append(nn.Linear(p.filter_width, n_out, bias=False))
        self.mlp = nn.Sequential(*layers)

    def taps(self, T: int, groups: int) -> list[torch.Tensor]:
        """The first ``T`` taps, time first, in ``groups`` interleaved groups of channels:
        group ``o`` is ``[T, n_out / groups]``, channels ``o, o + groups, …`` — the same
        numbers as ``forward(T)[o::groups].T``, computed from the matching rows of the last
        Linear and decay rates, so no strided gather runs on the taps (onnxruntime's
        ``Gather`` on a last axis cost 125 µs per 16k taps)."""
        hidden = self.mlp[:-1](self.z[:T])  # [T, width]
        weight = self.mlp[-1].weight  # [n_out, width]
        return [
            (hidden @ weight[o::groups].transpose(0, 1))
            * torch.exp(-self.t[:T] * self.deltas[:, o::groups].abs())
            for o in range(groups)
        ]

    def forward(self, T: int) -> torch.Tensor:
        return self.taps(T, 1)[0].transpose(0, 1)


def causal_conv_fft(z: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """Causal long convolution ``y[t] = Σ_{s<=t} h[t-s]·z[s]`` by FFT (zero-padded to 2T).

    ``z [batch, channels, T]``, ``h [channels, T]`` -> ``[batch, channels, T]``.
    """
    T = z.shape[-1]
    n = 2 * T
    y = torch.fft.irfft(torch.fft.rfft(z, n=n) * torch.fft.rfft(h, n=n), n=n)
    return y[..., :T]


def causal_conv_direct(z: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """The same causal convolution as a depthwise ``conv1d`` with a length-T kernel
    (O(T²) multiply-adds, no FFT: export-friendly — ONNX ``Conv`` with a computed kernel).

    ``z [batch, channels, T]``, ``h [channels, T]`` -> ``[batch, channels, T]``.
    Left zero-padding by T-1 (built with ``cat``, so the length stays symbolic) makes it
    causal; the kernel is flipped because ``conv1d`` is a cross-correlation.
    """
    padded = torch.cat([torch.zeros_like(z)[..., 1:], z], dim=-1)
    return F.conv1d(padded, h.flip(-1).unsqueeze(1), groups=h.shape[0])


#: longest sequence an exported Hyena graph convolves directly (ONNX ``Conv``, O(T²));
#: longer ones take :func:`causal_conv_dft`. Measured on onnxruntime, 1 thread, 128
#: channels: direct 0.33 / 0.59 / 1.26 / 5.1 ms at T 128 / 160 / 256 / 512, the
#: factorised DFT (``n1`` 64, channels last) 0.37 / 0.37 / 0.37 / 0.82 ms
#: (``benchmarks/hyena_long_conv.py``; numbers in benchmarks/README.md, issue 14 part 6).
DIRECT_MAX_LEN = 128
#: the DFT forms of an exported Hyena graph past :data:`DIRECT_MAX_LEN`, shortest first:
#: ``(longest T, n1, m1)`` of :func:`causal_conv_dft` (the last one has no limit). Each
#: further form is one more ``If``, present only in models whose ``max_seq_len`` reaches it
#: (:func:`causal_conv_export`). One convolution, 128 channels, batch 1, 1 thread,
#: onnxruntime, ms (session 18, ``benchmarks/hyena_long_conv.py``; torch's FFT in eager:
#: 0.37 / 0.76 / 1.68 / 4.57 ms):
#:
#: ======  =======  =======  =======  ========
#: T       (64, 1)  (32, 8)  (64, 8)  (128, 1)
#: ======  =======  =======  =======  ========
#: 512     0.82     1.53     3.57     0.92
#: 1,024   2.11     1.54     3.62     2.04
#: 2,048   6.96     3.71     3.60     5.37
#: 4,096   28.0     12.2     9.86     18.3
#: ======  =======  =======  =======  ========
#:
#: (32, 8) would win at 769–1,024 positions, but a form costs export time (one Hyena filter:
#: 10 s with one DFT form, 21 s with two), and the calibration's models are 1,024 long.
DFT_FORMS: tuple[tuple[int, int, int], ...] = ((1024, 64, 1), (0, 64, 8))


def _form_limits() -> list[int]:
    """The length past which each form of :data:`DFT_FORMS` starts (the first:
    :data:`DIRECT_MAX_LEN`)."""
    return [DIRECT_MAX_LEN] + [up_to for up_to, _, _ in DFT_FORMS[:-1]]


def _dft_m2(T: Any, n1: int, m1: int) -> Any:
    """``m2`` of :func:`causal_conv_dft` at length ``T`` (an int, or symbolic under export):
    a multiple of 8 with ``n1·m1·m2 >= 2T``."""
    return 8 * ((2 * T + 8 * n1 * m1 - 1) // (8 * n1 * m1))


def _cis(num: torch.Tensor, den: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """``cos`` and ``sin`` of ``-2π·num/den`` (``num`` int64, reduced modulo ``den`` in
    integers first, so the angle stays exact for long transforms; ``den`` may be symbolic)."""
    dt = torch.ones((), dtype=num.dtype, device=num.device) * den
    ang = torch.remainder(num, dt).to(torch.float32) * (-2 * math.pi) / dt.to(torch.float32)
    return torch.cos(ang), torch.sin(ang)


def _blocks(re: torch.Tensor, im: torch.Tensor) -> torch.Tensor:
    """A complex matrix ``[..., M, N]`` as the real block matrix ``[[re, -im], [im, re]]``
    ``[..., 2M, 2N]``: rows and columns are (real | imaginary, index)."""
    return torch.cat([torch.cat([re, -im], -1), torch.cat([im, re], -1)], -2)


def _cmul(
    ar: torch.Tensor, ai: torch.Tensor, br: torch.Tensor, bi: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The complex product ``(ar + i·ai)(br + i·bi)`` as real and imaginary parts."""
    return ar * br - ai * bi, ar * bi + ai * br


def causal_conv_dft(z: torch.Tensor, h: torch.Tensor, n1: int = 64, m1: int = 1) -> torch.Tensor:
    """The same causal convolution through a length-``n`` DFT (``n = n1·n2 >= 2T``)
    factorised by Cooley–Tukey, each stage a MatMul with a small DFT matrix built in the
    graph (export form for long sequences: onnxruntime has no fast FFT, and its ``DFT``
    kernel runs slower than a direct ``Conv``). Stage two is itself factorised
    ``n2 = m1·m2`` when ``m1 > 1`` (three stages). Multiply-adds per padded position, for
    each transform: ``n1/2 + 2·n2`` (two stages) or ``n1/2 + 2·m1 + 2·m2`` (three), instead
    of ``T`` for the direct form; float32 angles are reduced modulo ``n`` in int64, so the
    result matches the FFT to ~1e-6 relative.

    **Channels last**: ``z [batch, T, channels]``, ``h [T, channels]`` ->
    ``[batch, T, channels]`` — the layout of the projections around it, so the graph holds
    no transpose (time is the contracted axis of every MatMul, channels ride along).

    With ``t = t1·n2 + t2`` and ``k = k1 + n1·k2``: stage one sums over ``t1`` (an
    ``[n1, n1/2]`` DFT: the upper half of the zero-padded input is zero), then for each
    ``k1`` a complex ``[n2, n2]`` DFT sums over ``t2`` with the twiddle
    ``exp(-2πi·k1·t2/n)`` folded into its matrix. With ``m1 > 1`` that DFT runs as two
    stages, ``t2 = t2a·m2 + t2b`` and ``k2 = k2a + m1·k2b``: an ``[m1, m1]`` matrix per
    ``k1`` over ``t2a``, then an ``[m2, m2]`` matrix per ``(k1, k2a)`` over ``t2b``; both
    twiddles (``exp(-2πi·k1·t2/n)`` splits into a ``t2a`` and a ``t2b`` factor, and the
    inner ``exp(-2πi·k2a·t2b/n2)``) are folded into those matrices, and each stage's
    output rows are ordered so that the next stage reads them without a transpose. The
    inputs are real, so only ``k1 <= n1/2`` is computed: the rest is conjugate
    (``X[k1 + n1·k2] = conj(X[n - k1 - n1·k2])``, and after the inverse's stage two
    ``D[n1 - k1] = conj(D[k1])``), which halves every stage. Complex values are kept as
    real and imaginary halves of the contracted axis, so each complex MatMul is one real
    MatMul with a ``[[Re, -Im], [Im, Re]]`` block matrix. The spectra of ``z`` and ``h``
    are multiplied, and the inverse runs the same stages backwards (conjugate matrices),
    computing only the first ``T`` outputs (``t = s2 + n2·s1``, ``s1 < n1/2``), with ``k1``
    and ``n1 - k1`` folded into one term (weight 2; 1 for ``k1 = 0`` and ``n1/2``, whose
    terms are real).
    """
    B, T, C = z.shape
    half = n1 // 2
    K = half + 1  # frequencies k1 = 0 … n1/2 of stage one
    # m2 a multiple of 8: onnxruntime's GEMM packs columns in panels (n2 18 ran 1.4x slower
    # than 16), and never 1, which would make torch.export specialise a short traced length
    m2 = _dft_m2(T, n1, m1)
    n2 = m1 * m2
    n = n1 * n2
    L = half * n2  # the nonzero first half of the padded length, >= T
    a1 = torch.arange(n1, device=z.device)
    k1 = a1[:K]
    c1, s1 = _cis(k1[:, None] * a1[None, :half], n1)  # [K, n1/2]
    F1 = torch.stack([c1, s1], 1).reshape(2 * K, half)  # rows (k1, re | im)
    aa = torch.arange(m1, device=z.device)
    ab = torch.arange(m2, device=z.device)
    # the [m2, m2] stage per (k1, k2a): exp(-2πi·k2b·t2b/m2) · exp(-2πi·(k1 + n1·k2a)·t2b/n)
    fr, fi = _cis(ab[:, None] * ab[None, :], m2)  # [m2, m2], symmetric
    wr, wi = _cis((k1[:, None] + n1 * aa[None, :])[:, :, None] * ab, n)  # [K, m1, m2]
    # [K, m1, (re|im k2b), (re|im t2b)], the twiddle on the columns t2b
    Pb = _blocks(*_cmul(fr, fi, wr[:, :, None, :], wi[:, :, None, :]))
    # its inverse per (k1, k2a), [s2b, k2b]: the conjugate, the twiddle on the rows s2b
    qr, qi = _cmul(fr, fi, wr[:, :, :, None], wi[:, :, :, None])
    Qb = _blocks(qr, -qi)
    if m1 > 1:
        # the [m1, m1] stage per k1: exp(-2πi·k2a·t2a/m1) · exp(-2πi·k1·m2·t2a/n);
        # rows (k2a, re|im) so that its output is (k2a, (re|im t2b)), cols (re|im, t2a)
        gr, gi = _cis(aa[:, None] * aa[None, :], m1)  # [m1, m1], symmetric
        wr, wi = _cis((m2 * k1)[:, None] * aa, n)  # [K, m1]
        ar, ai = _cmul(gr, gi, wr[:, None, :], wi[:, None, :])  # twiddle on the columns t2a
        Pa = torch.stack([torch.cat([ar, -ai], -1), torch.cat([ai, ar], -1)], 2)
        Pa = Pa.reshape(K, 2 * m1, 2 * m1)
        # its inverse, [s2a, k2a]: the conjugate, the twiddle on the rows s2a;
        # rows (re|im, s2a), cols (k2a, re|im)
        ur, ui = _cmul(gr, gi, wr[:, :, None], wi[:, :, None])
        ui = -ui
        Qa = torch.cat(
            [
                torch.stack([ur, -ui], -1).reshape(K, m1, 2 * m1),
                torch.stack([ui, ur], -1).reshape(K, m1, 2 * m1),
            ],
            1,
        )

    def spectrum(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``[..., T, C]`` -> real and imaginary parts ``[..., K, m1, m2, C]``."""
        lead = x.shape[:-2]
        x = F.pad(x, (0, 0, 0, L - T)).reshape(*lead, half, n2 * C)  # [.., t1, (t2 c)]
        A = F1 @ x  # [.., (k1 re|im), (t2a t2b c)]
        if m1 > 1:
            A = Pa @ A.view(*lead, K, 2 * m1, m2 * C)  # [.., k1, (k2a re|im), (t2b c)]
        S = Pb @ A.view(*lead, K, m1, 2 * m2, C)  # [.., k1, k2a, (re|im k2b), c]
        re, im = S.view(*lead, K, m1, 2, m2, C).unbind(-3)
        return re, im

    Zr, Zi = spectrum(z)  # [B, K, m1, m2, C]
    Hr, Hi = spectrum(h)  # [K, m1, m2, C]
    Y = torch.cat([Zr * Hr - Zi * Hi, Zr * Hi + Zi * Hr], -2)  # [B, K, m1, (re|im k2b), C]
    D = Qb @ Y  # [B, K, k2a, (re|im s2b), C]
    if m1 > 1:
        D = Qa @ D.view(B, K, 2 * m1, m2 * C)  # [B, K, (re|im s2a), (s2b c)]
    # stage one backwards, real part only: Re(e^{+iθ}·D) = cos θ·Dr − sin θ·Di (s1 = −sin θ);
    # k1 and n1 − k1 are conjugate, so each 0 < k1 < n1/2 counts twice
    one = torch.ones(1, device=z.device)  # no in-place writes: this runs inside torch.cond
    fold = torch.cat([one, torch.full((half - 1,), 2.0, device=z.device), one])
    G = torch.stack([c1.T * fold, s1.T * fold], 2).reshape(half, 2 * K) / n  # cols (k1, re|im)
    y = (G @ D.reshape(B, 2 * K, n2 * C)).view(B, L, C)  # [b, (s1 s2), c]
    return y.split([T, L - T], dim=1)[0]  # a split: the traced size is T, not min(T, L)


def causal_conv_export(z: torch.Tensor, h: torch.Tensor, max_len: int) -> torch.Tensor:
    """The causal convolution of an exported Hyena graph past :data:`DIRECT_MAX_LEN`
    (channels last, shapes as :func:`causal_conv_dft`), chosen by ONNX ``If`` nodes
    (``torch.cond``) on the sequence length: :func:`causal_conv_direct` up to
    :data:`DIRECT_MAX_LEN` positions (transposed to channels first and back), then the
    forms of :data:`DFT_FORMS` in turn, as far as ``max_len`` (``max_seq_len``) reaches.
    With one DFT form that is one ``If``. With more, the ``If`` nodes run one after the
    other, each computing its form or passing the previous result on (a copy), not nested:
    torch.export traces a nested ``cond`` again at every level (one Hyena filter with three
    forms: 29 s nested, 21 s in a row; with four: 63 s / 29 s). Call it only under
    ``torch.export`` (:meth:`Hyena.forward` does). The ``If`` itself costs nothing
    measurable (session 16); the direct branch's two transposes cost a 4-layer Hyena model
    3–4 % at T 128."""

    # cond's branches must return the same layout: a fresh, contiguous [B, T, C] tensor
    def direct(z: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        torch._check(h.shape[0] == z.shape[1])
        return causal_conv_direct(z.transpose(1, 2), h.transpose(0, 1)).transpose(1, 2).contiguous()

    def dft(n1: int, m1: int) -> Callable[..., torch.Tensor]:
        def branch(z: torch.Tensor, h: torch.Tensor, *_: torch.Tensor) -> torch.Tensor:
            torch._check(h.shape[0] == z.shape[1])
            return causal_conv_dft(z, h, n1, m1) * 1.0

        return branch

    def zeros(z: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        return z.new_zeros(z.shape)

    def keep(z: torch.Tensor, h: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return y * 1.0  # a branch may not return its input itself

    T = z.shape[1]
    # the DFT forms max_len reaches: form i covers (limits[i], limits[i + 1]], the last
    # every length past limits[i]
    limits = _form_limits()
    reached = [dft(n1, m1) for lo, (_, n1, m1) in zip(limits, DFT_FORMS) if max_len > lo]
    if not reached:
        return direct(z, h)
    if len(reached) == 1:
        return torch.cond(T <= DIRECT_MAX_LEN, direct, reached[0], (z, h))
    y = torch.cond(T <= DIRECT_MAX_LEN, direct, zeros, (z, h))
    for i, form in enumerate(reached):
        lo, hi = limits[i], limits[i + 1] if i + 1 < len(reached) else 0
        inside = T > lo if not hi else (T - lo - 1) // (hi - lo) == 0  # lo < T <= hi
        y = torch.cond(inside, form, keep, (z, h, y))
    return y


class Hyena(nn.Module):
    """Hyena operator (Poli et al., 2023, "Hyena Hierarchy: Towards Larger Convolutional
    Language Models"), as the reference code computes it (HazyResearch/safari,
    ``HyenaOperator`` with one head, ``inner_factor`` 1, one block, no outer mixing, identity
    activation).

    ``x [batch, seq, d] -> [batch, seq, d]``, causal, ``seq <= max_seq_len``. With
    ``N = order``: the input is projected to ``(N+1)·d`` channels, passed through a short
    depthwise causal convolution and split into ``x⁰, …, x^{N-1}, v`` (``d`` channels each,
    in that order); then for ``o = 0 … N-2``::

        v ← x^{N-1-o} ⊙ v
        v ← h_o * v + D_o ⊙ v          (causal long convolution with implicit filter h_o)

    and ``y = out_proj(x⁰ ⊙ v)`` — safari's loop over ``reversed(x[1:])`` and its final gate.

    Porting a safari checkpoint (reshapes only): ``in_proj``, ``out_proj`` and
    ``short_filter`` → ``in_proj``, ``out_proj``, ``short`` as they are; ``filter_fn
    .implicit_filter.{0,2,4,…}`` (Linear) → ``filter.mlp.{0,2,4,…}``, the last one included;
    safari's Sin frequency ``[1, w]`` (one module shared by every Sin of its MLP) →
    ``filter.mlp.{1,3,…}.freq [w]`` (one per layer here: copy it into each); ``filter_fn
    .bias [(N-1)·d]`` (channel-major ``(c o)``) → ``skip [d, N-1]``; the filter output and
    its decay rates ``modulation.deltas`` are channel-major in both. Safari trains the
    positional features ``pos_emb.z`` (``lr_pos_emb``; its pile config trains them at the
    model's rate): archir keeps them as a fixed buffer, so copy a trained ``z[0]`` into
    ``filter.z``. Not in archir: ``num_heads``/``inner_factor``/``num_blocks`` > 1, outer
    mixing, ``post_order_ffn``, an output activation, dropouts, ``normalized`` filters, a
    modulation ``shift``, ``modulate: false``, the initial Sin frequency ``w`` (archir: 1,
    safari's ``HyenaFilter`` default). ``D`` starts at ``N(0, 0.02²)`` here, ``N(0, 1)``
    in safari.

    Step form: ``init_state(batch)`` returns ``(short-conv buffer [B, (N+1)d, k-1],
    history of the long convolutions' inputs [B, N-1, d, 0])``; ``step(x_t [B, d], state)``
    agrees with ``forward`` and appends one position to the history (``[B, N-1, d, t]``
    after ``t`` tokens, like attention's KV cache), so one token costs O(t·d) — the
    convolution ``Σ_{s<=t} h[t-s]·u[s]`` over the tokens seen, with the filter read
    backwards from a fixed reversed copy — instead of O(max_seq_len·d). Raises
    ``ValueError`` past ``max_seq_len``.
    """

    def __init__(self, d: int, max_len: int, p: HyenaParams) -> None:
        super().__init__()
        self.d, self.order, self.max_len, self.k = d, p.order, max_len, p.short_kernel
        self.n_filters = p.order - 1
        self.fft = p.fft
        C = (p.order + 1) * d
        self.in_proj = nn.Linear(d, C, bias=p.bias)
        self.short = nn.Conv1d(C, C, p.short_kernel, groups=C, bias=True)
        self.filter = ImplicitFilter(d * self.n_filters, max_len, p)
        self.decode_limit = max_len  # the filter is max_len long
        self._back: tuple[tuple[Any, ...], torch.Tensor] | None = None  # _reversed_filters
        self.state_names = ("short conv inputs", "long convolutions' input history")
        self.skip = nn.Parameter(torch.randn(d, self.n_filters) * 0.02)  # D, channel-major
        self.out_proj = nn.Linear(d, d, bias=p.bias)
        init_linear(self.in_proj)
        init_linear(self.out_proj)

    def _use_fft(self) -> bool:
        if self.fft == "auto":
            return not tracing(compiling=False)  # an exported graph: causal_conv_export
        return self.fft == "on"

    def _reversed_filters(self) -> torch.Tensor:
        """``[N-1, d, max_len]``, every filter read backwards (``[..., L-1-j] = h[j]``), for
        :meth:`step`. It depends on the filter's parameters only, so eager inference keeps
        it between tokens, keyed by each parameter's storage and version counter (an
        optimizer step, ``load_state_dict`` or ``.to()`` changes the key); a traced graph
        computes it (onnxruntime folds it into a constant), and so does a step that
        records gradients for the filter."""
        tensors = (*self.filter.parameters(), *self.filter.buffers())
        key = None
        if not tracing() and not (
            torch.is_grad_enabled() and any(t.requires_grad for t in tensors)
        ):
            try:
                key = tuple((t.data_ptr(), t._version, t.dtype, t.device) for t in tensors)
            except RuntimeError:  # inference tensors keep no version counter
                pass
        if key is not None and self._back is not None and self._back[0] == key:
            return self._back[1]
        back = self._filters(self.max_len).flip(-1).transpose(0, 1)
        if key is not None:
            self._back = (key, back)
        return back

    def _long_conv(self, v: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        if self._use_fft():
            return causal_conv_fft(v, h)
        return causal_conv_direct(v, h)

    def _filters(self, T: int) -> torch.Tensor:
        """``[d, N-1, T]``: filter ``o`` of channel ``c`` at ``[c, o]``."""
        return self.filter(T).view(self.d, self.n_filters, T)

    def _exports_channels_last(self) -> bool:
        """An exported graph of a model longer than :data:`DIRECT_MAX_LEN` runs the long
        convolutions channels last behind an ``If`` (:func:`causal_conv_export`); shorter
        models and the TorchScript exporter keep the direct ``Conv`` (no ``If``)."""
        return (
            self.fft == "auto" and self.max_len > DIRECT_MAX_LEN and torch.compiler.is_exporting()
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, d = x.shape
        # an exported graph past DIRECT_MAX_LEN runs channels last from the short
        # convolution on: the factorised DFT needs no transpose then, nor does out_proj
        last = self._exports_channels_last()
        x = self.short(F.pad(self.in_proj(x).transpose(1, 2), (self.k - 1, 0)))  # [B, C, T]
        if last:
            x = x.transpose(1, 2)  # [B, T, C]
        parts = x.split(d, dim=-1 if last else 1)
        gates, v = parts[:-1], parts[-1]  # x⁰ … x^{N-1}, v
        # N-1 filters, [T, d] each (channels last) or [d, T]
        h = self.filter.taps(T, self.n_filters) if last else self._filters(T).unbind(1)
        for o in range(self.n_filters):
            v = v * gates[self.order - 1 - o]
            if last:
                v = causal_conv_export(v, h[o], self.max_len) + self.skip[:, o] * v
            else:
                v = self._long_conv(v, h[o]) + self.skip[:, o, None] * v
        v = v * gates[0]
        return self.out_proj(v if last else v.transpose(1, 2))

    def init_state(
        self,
        batch: int,
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        C = (self.order + 1) * self.d
        return (
            torch.zeros(batch, C, self.k - 1, device=device, dtype=dtype),
            torch.zeros(batch, self.n_filters, self.d, 0, device=device, dtype=dtype),
        )

    def step(
        self, x_t: torch.Tensor, state: tuple[torch.Tensor, torch.Tensor]
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        buf, hist = state
        t = hist.shape[-1]  # tokens seen; this one is position t
        if not tracing() and t >= self.max_len:
            raise ValueError(f"hyena: step past max_seq_len {self.max_len}")
        x = self.in_proj(x_t)[..., None]  # [B, C, 1]
        win = torch.cat([buf, x], dim=-1)  # [B, C, k]
        xc = (win * self.short.weight[:, 0, :]).sum(-1) + self.short.bias
        parts = xc.split(self.d, dim=-1)
        gates, v = parts[:-1], parts[-1]
        L = self.max_len
        # the filter reversed: back[..., L-1-j] = h[j]; the past positions s = 0..t-1 take
        # h[t - s] = back[..., L-1-t+s], the new one h[0]
        back = self._reversed_filters()  # [N-1, d, L]
        taps, h0 = back[..., L - 1 - t : L - 1], back[..., L - 1]  # [N-1, d, t], [N-1, d]
        past = torch.matmul(hist[..., None, :], taps[..., None])[..., 0, 0]  # [B, N-1, d]
        us = []
        for o in range(self.n_filters):
            u = v * gates[self.order - 1 - o]
            us.append(u)
            v = past[:, o] + (h0[o] + self.skip[:, o]) * u
        y = self.out_proj(v * gates[0])
        # one copy of the history per token (the appended position of every filter at once)
        return y, (win[..., 1:], torch.cat([hist, torch.stack(us, dim=1)[..., None]], dim=-1))


def _hyena_params(p: HyenaParams, c: BuildContext) -> int:
    d, N, w = c.d_model, p.order, p.filter_width
    C = (N + 1) * d
    n = linear_params(d, C, p.bias) + C * p.short_kernel + C
    n += linear_params(1 + 2 * ((p.emb_dim - 1) // 2), w, True) + w
    n += p.filter_layers * (linear_params(w, w, True) + w)
    n += w * (N - 1) * d + (N - 1) * d
    return n + linear_params(d, d, p.bias)


def _fft_flops(n: int) -> float:
    """Real FFT of length ``n``: the usual ``2.5·n·log2(n)`` estimate."""
    return 2.5 * n * math.log2(max(n, 2))


def exported_conv_form(p: HyenaParams, c: BuildContext, seq: int) -> str:
    """How an exported graph computes the long convolutions at length ``seq``: ``"fft"``
    (``fft="on"``: ONNX ``DFT``), ``"direct"`` (a depthwise ``Conv`` with a length-``seq``
    kernel: ``fft="off"``, or up to :data:`DIRECT_MAX_LEN` positions, or in a model whose
    ``max_seq_len`` stays within it) or ``"dft"`` (:func:`causal_conv_dft`, MatMuls; see
    :func:`causal_conv_export`)."""
    if p.fft == "on":
        return "fft"
    if p.fft == "off" or seq <= DIRECT_MAX_LEN or c.max_seq_len <= DIRECT_MAX_LEN:
        return "direct"
    return "dft"


def exported_long_conv_flops(p: HyenaParams, c: BuildContext, seq: int) -> float:
    """FLOPs of one long convolution (one filter, one channel, one sequence) at length
    ``seq`` as an **exported** graph computes it (:func:`causal_conv_export`): the direct
    depthwise convolution (``2·seq²``) up to :data:`DIRECT_MAX_LEN` positions or in a model
    whose ``max_seq_len`` stays within it; past it the factorised DFT form of
    :data:`DFT_FORMS` that covers ``seq`` — its MatMul stages over the padded length for the
    spectra of the input and of the filter and for the inverse, and the complex product.
    ``fft="on"`` exports ONNX ``DFT`` (the FFT estimate), ``"off"`` the direct form. The
    filter's spectrum is counted once per sequence (exact at batch 1). The FFT estimate of
    :func:`_hyena_flops` is flat in ``seq`` where the exported work jumps at 129 positions
    (2·128² against a DFT over 512 points) and grows with the DFT's padding."""
    form = exported_conv_form(p, c, seq)
    if form == "fft":
        return 3 * _fft_flops(2 * seq) + 6.0 * (seq + 1)
    if form == "direct":
        return 2.0 * seq * seq
    i = max(j for j, lo in enumerate(_form_limits()) if seq > lo)
    _, n1, m1 = DFT_FORMS[i]
    half = n1 // 2
    K = half + 1
    m2 = _dft_m2(seq, n1, m1)
    n2 = m1 * m2
    stage_one = 2 * K * half * n2  # multiply-adds of [2K, n1/2] @ [n1/2, n2]
    stage_a = K * (2 * m1) ** 2 * m2 if m1 > 1 else 0
    stage_b = K * m1 * (2 * m2) ** 2
    forward = stage_one + stage_a + stage_b
    inverse = stage_b + stage_a + half * 2 * K * n2
    return 2.0 * (2 * forward + inverse) + 6.0 * K * n2


def _hyena_flops(p: HyenaParams, c: BuildContext, L: int, exported: bool = False) -> float:
    """Per token: projections, short conv, the filter MLP (evaluated once per position),
    per long filter (``order - 1`` of them) the gate before it, the long convolution (FFT
    path: 3 real FFTs of length 2L plus the complex product, divided by L; direct path: the
    depthwise length-T convolution, 2·L per channel; ``exported``: the forms an exported
    graph runs, :func:`exported_long_conv_flops` / L) and the skip term, then the last
    gate."""
    d, N, w = c.d_model, p.order, p.filter_width
    C = (N + 1) * d
    f = 2.0 * d * C + 2.0 * C * p.short_kernel + 2.0 * d * d
    emb = 1 + 2 * ((p.emb_dim - 1) // 2)
    f += 2.0 * (emb * w + p.filter_layers * w * w + w * (N - 1) * d) + (N - 1) * d  # MLP, window
    if exported:
        long = exported_long_conv_flops(p, c, L) / L
    elif p.fft == "off":
        long = 2.0 * L
    else:
        long = (3 * _fft_flops(2 * L) + 6.0 * (L + 1)) / L
    return f + (N - 1) * d * (long + 3.0) + d


def exported_hyena_flops(p: HyenaParams, c: BuildContext, L: int) -> float:
    """FLOPs per token of a Hyena block at length ``L`` as its exported graph computes
    them (:func:`_hyena_flops` with :func:`exported_long_conv_flops`): what the latency
    predictor's features count, where the cost pass (``archir.cost``) counts the FFT that
    PyTorch runs."""
    return _hyena_flops(p, c, L, exported=True)


def _hyena_state(p: HyenaParams, c: BuildContext, L: int) -> int:
    d, N = c.d_model, p.order
    return 4 * ((N - 1) * d * L + (N + 1) * d * (p.short_kernel - 1))


def _hyena_check(p: HyenaParams, c: BuildContext) -> None:
    if p.order < 2:
        raise ValueError(
            f"order must be at least 2 (hyena's order is safari's: order N has N-1 long "
            f"filters; archir's earlier order {p.order} is order {p.order + 1}), got {p.order}"
        )
    if p.emb_dim % 2 == 0:
        raise ValueError(f"hyena emb_dim must be odd (time + sin/cos pairs), got {p.emb_dim}")


register(
    BlockKind(
        name="hyena",
        role="token_mixer",
        params=HyenaParams,
        build=lambda p, c: Hyena(c.d_model, c.max_seq_len, p),
        n_params=_hyena_params,
        flops=_hyena_flops,
        state_bytes=_hyena_state,
        check=_hyena_check,
        recurrent=True,
        state_grows=True,
        paper="Poli et al., 2023, 'Hyena Hierarchy: Towards Larger Convolutional Language Models'",
        summary="gated implicit long convolution (FFT; direct depthwise conv when exporting), causal",
    )
)


# --------------------------------------------------------------------------- pooling


class PoolingParams(KindParams):
    """``pool_size``: window length (odd when the model is bidirectional)."""

    pool_size: int = Field(3, ge=1, le=1024)


def _grid(c: BuildContext) -> tuple[int, int] | None:
    """The image token grid ``(H, W)`` a bidirectional mixer reads (``archir.ir.GridContext``
    in a vision model), ``None`` for a sequence."""
    return None if c.causal else getattr(c, "grid", None)


class Pooling(nn.Module):
    """PoolFormer token mixer ``avgpool(x) - x`` (Yu et al., 2022, "MetaFormer Is Actually
    What You Need for Vision").

    ``[batch, seq, d] -> [batch, seq, d]``. Bidirectional: centred window, padding not
    counted. Causal: the mean of the last ``min(t+1, pool_size)`` tokens. On an image's
    token grid (``grid = (H, W)``, ``seq = H·W`` row-major) the window is the paper's
    2-D ``pool_size × pool_size`` square (stride 1, padding not counted).
    """

    state_names = ("last pool_size - 1 inputs", "position")

    def __init__(
        self, pool_size: int, causal: bool, d: int = 0, grid: tuple[int, int] | None = None
    ) -> None:
        super().__init__()
        self.k, self.causal, self.d, self.grid = pool_size, causal, d, grid

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.grid is not None:
            H, W = self.grid
            g = x.transpose(1, 2).reshape(-1, x.shape[-1], H, W)
            k = self.k
            y = F.avg_pool2d(g, k, stride=1, padding=k // 2, count_include_pad=False)
            return y.flatten(2).transpose(1, 2) - x
        xt = x.transpose(1, 2)  # [B, d, T]
        if self.causal:
            s = F.avg_pool1d(F.pad(xt, (self.k - 1, 0)), self.k, stride=1) * self.k
            T = x.shape[1]
            count = torch.arange(1, T + 1, device=x.device, dtype=x.dtype).clamp(max=self.k)
            y = s / count
        else:
            y = F.avg_pool1d(xt, self.k, stride=1, padding=self.k // 2, count_include_pad=False)
        return y.transpose(1, 2) - x

    def init_state(
        self, batch: int, device: torch.device | None = None, dtype: torch.dtype | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The last ``pool_size - 1`` inputs ``[batch, pool_size - 1, d]`` (zeros) and the
        position ``pos []`` int64. Causal models only."""
        if not self.causal:
            raise ValueError("bidirectional pooling cannot decode one token at a time")
        return (
            torch.zeros(batch, self.k - 1, self.d, device=device, dtype=dtype),
            torch.zeros((), dtype=torch.long, device=device),
        )

    def step(
        self, x: torch.Tensor, state: tuple[torch.Tensor, torch.Tensor]
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """``x [batch, d] -> [batch, d]``: the mean of the last ``min(pos + 1, pool_size)``
        tokens minus ``x``; agrees with ``forward``."""
        buf, pos = state
        win = torch.cat([buf, x[:, None]], dim=1)  # [B, k, d]
        count = torch.clamp(pos + 1, max=self.k).to(x.dtype)
        return win.sum(1) / count - x, (win[:, 1:], pos + 1)


def _pool_check(p: PoolingParams, c: BuildContext) -> None:
    if not c.causal and p.pool_size % 2 == 0:
        raise ValueError(f"bidirectional pooling needs an odd pool_size, got {p.pool_size}")


register(
    BlockKind(
        name="pooling",
        role="token_mixer",
        params=PoolingParams,
        build=lambda p, c: Pooling(p.pool_size, c.causal, c.d_model, _grid(c)),
        n_params=lambda p, c: 0,
        flops=lambda p, c, L: float(c.d_model * (p.pool_size ** (2 if _grid(c) else 1) + 1)),
        state_bytes=lambda p, c, L: 4 * c.d_model * (p.pool_size - 1) if c.causal else 0,
        check=_pool_check,
        paper="Yu et al., 2022, 'MetaFormer Is Actually What You Need for Vision'",
        summary="PoolFormer: average pool minus identity (causal window in causal models)",
    )
)


# --------------------------------------------------------------------------- sepconv


class SepConvParams(KindParams):
    """Parameters of ``sepconv``: hidden ``expansion`` of the pointwise layers, depthwise
    ``kernel_size`` (odd when bidirectional), ``activation`` after the first pointwise layer
    (``starrelu`` = ``s·relu(x)² + b`` with two learned scalars, as in ConvFormer)."""

    expansion: float = Field(2.0, gt=0, le=16)
    kernel_size: int = Field(7, ge=1, le=1024)
    activation: Literal["starrelu", "gelu", "relu", "silu"] = "starrelu"
    bias: bool = False


class StarReLU(nn.Module):
    """``s·relu(x)² + b`` with learned scalars ``s, b`` (Yu et al., 2023)."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(1))
        self.shift = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.scale * F.relu(x).square() + self.shift


_ACTS = {"gelu": nn.GELU, "relu": nn.ReLU, "silu": nn.SiLU, "starrelu": StarReLU}


class SepConv(nn.Module):
    """ConvFormer token mixer (Yu et al., 2023, "MetaFormer Baselines for Vision"):
    pointwise expand -> activation -> depthwise conv over the sequence -> pointwise project.

    ``[batch, seq, d] -> [batch, seq, d]``; the depthwise conv is left-padded (causal) in
    causal models and centred otherwise. On an image's token grid (``grid = (H, W)``,
    ``seq = H·W`` row-major) the depthwise conv is the paper's 2-D ``k × k`` one (zero
    padding ``k // 2``).
    """

    def __init__(
        self, d: int, p: SepConvParams, causal: bool, grid: tuple[int, int] | None = None
    ) -> None:
        super().__init__()
        h = hidden_size(d, p.expansion, None)
        self.pw1 = nn.Linear(d, h, bias=p.bias)
        self.act = _ACTS[p.activation]()
        self.grid = grid
        conv = nn.Conv2d if grid is not None else nn.Conv1d
        self.dw = conv(h, h, p.kernel_size, groups=h, bias=p.bias)
        self.pw2 = nn.Linear(h, d, bias=p.bias)
        k = p.kernel_size
        self.k, self.h, self.causal = k, h, causal
        self.state_names = ("depthwise conv inputs",)
        self.pad = (k - 1, 0) if causal else (k // 2, k // 2)
        init_linear(self.pw1)
        init_linear(self.pw2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.act(self.pw1(x)).transpose(1, 2)
        if self.grid is not None:
            H, W = self.grid
            y = F.pad(y.reshape(-1, self.h, H, W), self.pad + self.pad)
            return self.pw2(self.dw(y).flatten(2).transpose(1, 2))
        y = self.dw(F.pad(y, self.pad)).transpose(1, 2)
        return self.pw2(y)

    def init_state(
        self, batch: int, device: torch.device | None = None, dtype: torch.dtype | None = None
    ) -> tuple[torch.Tensor]:
        """The depthwise conv's last ``kernel_size - 1`` inputs ``[batch, hidden, k - 1]``
        (zeros: the causal left padding). Causal models only."""
        if not self.causal:
            raise ValueError("bidirectional sepconv cannot decode one token at a time")
        return (torch.zeros(batch, self.h, self.k - 1, device=device, dtype=dtype),)

    def step(
        self, x: torch.Tensor, state: tuple[torch.Tensor]
    ) -> tuple[torch.Tensor, tuple[torch.Tensor]]:
        """``x [batch, d] -> [batch, d]``; agrees with ``forward``."""
        (buf,) = state
        win = torch.cat([buf, self.act(self.pw1(x))[..., None]], dim=-1)  # [B, h, k]
        y = (win * self.dw.weight[:, 0, :]).sum(-1)
        if self.dw.bias is not None:
            y = y + self.dw.bias
        return self.pw2(y), (win[..., 1:],)


def _sep_h(p: SepConvParams, c: BuildContext) -> int:
    return hidden_size(c.d_model, p.expansion, None)


def _sep_params(p: SepConvParams, c: BuildContext) -> int:
    d, h = c.d_model, _sep_h(p, c)
    k2 = p.kernel_size ** (2 if _grid(c) else 1)
    n = linear_params(d, h, p.bias) + h * k2 + (h if p.bias else 0)
    n += linear_params(h, d, p.bias)
    return n + (2 if p.activation == "starrelu" else 0)


def _sep_check(p: SepConvParams, c: BuildContext) -> None:
    if not c.causal and p.kernel_size % 2 == 0:
        raise ValueError(f"bidirectional sepconv needs an odd kernel_size, got {p.kernel_size}")


register(
    BlockKind(
        name="sepconv",
        role="token_mixer",
        params=SepConvParams,
        build=lambda p, c: SepConv(c.d_model, p, c.causal, _grid(c)),
        n_params=_sep_params,
        # matmuls and the depthwise conv (what torch.utils.flop_counter counts); k×k on a grid
        flops=lambda p, c, L: (
            4.0 * c.d_model * _sep_h(p, c)
            + 2.0 * _sep_h(p, c) * p.kernel_size ** (2 if _grid(c) else 1)
        ),
        state_bytes=lambda p, c, L: 4 * _sep_h(p, c) * (p.kernel_size - 1) if c.causal else 0,
        check=_sep_check,
        paper="Yu et al., 2023, 'MetaFormer Baselines for Vision' (ConvFormer)",
        summary="separable conv: pointwise expand, act, depthwise conv, pointwise project",
        flops_exact=True,
    )
)


# --------------------------------------------------------------------------- token_mlp


class TokenMLPParams(KindParams):
    """Parameters of ``token_mlp``: hidden width ``round(expansion · max_seq_len)``."""

    expansion: float = Field(0.5, gt=0, le=8)
    activation: Literal["gelu", "relu", "silu"] = "gelu"


class TokenMLP(nn.Module):
    """MLP-Mixer token mixing (Tolstikhin et al., 2021, "MLP-Mixer: An all-MLP Architecture
    for Vision"): one MLP across the sequence axis, shared by all channels.

    ``[batch, seq, d] -> [batch, seq, d]`` for ``seq <= max_seq_len``: a shorter sequence
    acts as if zero-padded to ``max_seq_len`` (the weights are sliced). Causal: hidden unit
    ``j`` belongs to position ``p_j = floor(j·L/H)``; ``W1[j, s]`` is kept for ``s <= p_j`` and
    ``W2[t, j]`` for ``p_j <= t`` (lower-triangular masks), so output ``t`` sees inputs ``<= t``.
    """

    def __init__(self, max_len: int, p: TokenMLPParams, causal: bool, d: int = 0) -> None:
        super().__init__()
        H = hidden_size(max_len, p.expansion, None)
        self.fc1 = nn.Linear(max_len, H)
        self.fc2 = nn.Linear(H, max_len)
        self.act = _ACTS[p.activation]()
        self.causal = causal
        self.d, self.max_len = d, max_len
        self.decode_limit = max_len  # step cannot go past max_seq_len
        self.state_names = ("hidden units' running input sums", "position")
        init_linear(self.fc1)
        init_linear(self.fc2)
        owner = torch.arange(H) * max_len // H  # position of each hidden unit
        pos = torch.arange(max_len)
        self.register_buffer("m1", (pos[None, :] <= owner[:, None]).float(), persistent=False)
        self.register_buffer("m2", (owner[None, :] <= pos[:, None]).float(), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        T = x.shape[1]
        w1, w2 = self.fc1.weight[:, :T], self.fc2.weight[:T]
        if self.causal:
            w1, w2 = w1 * self.m1[:, :T], w2 * self.m2[:T]
        xt = x.transpose(1, 2)  # [B, d, T]
        h = self.act(F.linear(xt, w1, self.fc1.bias))
        return F.linear(h, w2, self.fc2.bias[:T]).transpose(1, 2)

    def init_state(
        self, batch: int, device: torch.device | None = None, dtype: torch.dtype | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The hidden units' running input sums ``acc [batch, d, H]`` (zeros) and the
        position ``pos []`` int64. Causal models only; at most ``max_seq_len`` tokens."""
        if not self.causal:
            raise ValueError("a bidirectional token_mlp cannot decode one token at a time")
        H = self.fc1.weight.shape[0]
        return (
            torch.zeros(batch, self.d, H, device=device, dtype=dtype),
            torch.zeros((), dtype=torch.long, device=device),
        )

    def step(
        self, x: torch.Tensor, state: tuple[torch.Tensor, torch.Tensor]
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """``x [batch, d] -> [batch, d]`` at position ``pos < max_seq_len``. Hidden unit ``j``
        sums ``W1[j, s]·x_s`` over ``s <= p_j``; output ``t`` reads the units with
        ``p_j <= t``, all complete by then. Agrees with ``forward``.

        Raises:
            ValueError: past ``max_seq_len`` (eager mode).
        """
        acc, pos = state
        if not tracing() and int(pos) >= self.max_len:
            raise ValueError(f"token_mlp: step past max_seq_len {self.max_len}")
        i = pos.reshape(1)
        # column t of W1 and row t of W2 only (not the masked matrices: O(H) per token)
        w1 = (self.fc1.weight.index_select(1, i) * self.m1.index_select(1, i))[:, 0]  # [H]
        acc = acc + x[..., None] * w1
        h = self.act(acc + self.fc1.bias)  # [B, d, H]
        w2 = (self.fc2.weight.index_select(0, i) * self.m2.index_select(0, i))[0]  # [H]
        y = h @ w2 + self.fc2.bias.index_select(0, i)
        return y, (acc, pos + 1)


def _tok_h(p: TokenMLPParams, c: BuildContext) -> int:
    return hidden_size(c.max_seq_len, p.expansion, None)


register(
    BlockKind(
        name="token_mlp",
        role="token_mixer",
        params=TokenMLPParams,
        build=lambda p, c: TokenMLP(c.max_seq_len, p, c.causal, c.d_model),
        n_params=lambda p, c: (
            linear_params(c.max_seq_len, _tok_h(p, c), True)
            + linear_params(_tok_h(p, c), c.max_seq_len, True)
        ),
        # per token: two [d, T]x[T, H] matmuls per sequence, divided by T tokens
        flops=lambda p, c, L: 4.0 * c.d_model * _tok_h(p, c),
        state_bytes=lambda p, c, L: 4 * c.d_model * L,
        state_grows=True,
        paper="Tolstikhin et al., 2021, 'MLP-Mixer: An all-MLP Architecture for Vision'",
        summary="MLP across the sequence axis (lower-triangular masked when causal)",
        flops_exact=True,
    )
)


# --------------------------------------------------------------------------- identity


class Identity(nn.Module):
    """The no-op token mixer ``y = x`` (a search candidate that skips mixing).
    ``[batch, seq, d] -> [batch, seq, d]``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def init_state(
        self, batch: int, device: torch.device | None = None, dtype: torch.dtype | None = None
    ) -> tuple[()]:
        return ()

    def step(self, x: torch.Tensor, state: tuple[()]) -> tuple[torch.Tensor, tuple[()]]:
        return x, state


register(
    BlockKind(
        name="identity",
        role="token_mixer",
        params=NoParams,
        build=lambda p, c: Identity(),
        n_params=lambda p, c: 0,
        flops=lambda p, c, L: 0.0,
        paper="Yu et al., 2022, 'MetaFormer Is Actually What You Need for Vision' (identity)",
        summary="no-op token mixer (skip)",
        flops_exact=True,
    )
)
