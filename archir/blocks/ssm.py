"""State-space token mixers (role ``token_mixer``): Mamba selective SSM and S4D.

``mamba``: Gu & Dao, 2023, "Mamba: Linear-Time Sequence Modeling with Selective State
Spaces". ``s4d``: Gu et al., 2022, "On the Parameterization and Initialization of Diagonal
State Space Models".

Both map ``x [batch, seq, d_model] -> [batch, seq, d_model]`` in ``forward`` without a loop
over time steps and without complex tensors (so ``torch.onnx.export`` with a dynamic
sequence axis works), and provide ``init_state`` / ``step`` for decoding with a fixed-size
state that reproduces ``forward``.

Cost conventions: FLOPs per token at length ``L`` count what ``forward`` computes
(a multiply-add is 2 FLOPs; ``exp``/``cos``/``sin`` not counted); state bytes are the fixed
recurrent state in fp32.
"""

from __future__ import annotations

import math
import threading

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from archir.blocks.common import carry_back, carry_in, init_linear, tracing
from archir.registry import MAX_DIM, BlockKind, BuildContext, KindParams, register

State = tuple[torch.Tensor, ...]

# Mamba's parallel scan works in chunks of CHUNK steps, in one of two exact forms (no clamp:
# the recurrence is the paper's for any Δ·A ≤ 0):
# * fast (the usual case, every per-step log-decay Δ·A ≥ −FAST_LOG_DECAY): within a chunk the
#   log-decay G_t = Σ_{s≤t} Δ_s·A is cumulated and centered on half the chunk total, and the
#   state is exp(G_t)·Σ_{s≤t} exp(−G_s)·u_s, both factors bounded by
#   exp(CHUNK·FAST_LOG_DECAY/2) = e^64 (fp32-safe); cumulative sums are matmuls;
# * stable (any Δ·A, e.g. −50 after training; and always under torch.compile, where the data
#   cannot choose; export runs the same recurrence as _scan_export, below): sub-chunks of STABLE_STEPS steps; their end states from zero as
#   Σ exp(suffix sum of Δ·A)·u, carried through the chunk and between chunks (every exponent
#   a sum of Δ·A ≤ 0), then the recurrence h = exp(Δ·A)·h + u from each sub-chunk's entering
#   state over its STABLE_STEPS steps, every sub-chunk at once (a fixed count of steps, not a
#   loop over the sequence) — products of factors ≤ 1, no overflow.
# Between chunks both forms carry the chunk end states by the recurrence over chunks
# ``carry_in`` (eager: linear in the chunk count; its adjoint ``carry_back``), under graph
# capture through the equivalent ``carry_matrix`` (no loop over a symbolic count); both are
# sums of log-decays ≤ 0, stable.
CHUNK = 32
FAST_LOG_DECAY = 4.0
#: steps of the stable form's recurrence (a sub-chunk; CHUNK is a multiple of it)
STABLE_STEPS = 8
# The exported form (ONNX / torch.export / TorchScript tracing; not torch.compile, which keeps
# the stable form above): the same exact recurrence laid out for onnxruntime, which has no
# fused kernels and pays for every full-size [B, T, d_inner, d_state] tensor it writes, every
# strided slice (a copy) and every broadcast with a short inner span. See
# :func:`_scan_export`: sub-chunks of EXPORT_STEPS steps run as an unrolled recurrence, step by
# step on contiguous [B, T/EXPORT_STEPS, d_state, d_inner] tensors, their end states carried
# through chunks of EXPORT_CHUNK steps by a short recurrence and between chunks by
# ``carry_matrix``; about 8 full-size passes instead of ~16, 2-3x faster in onnxruntime at
# T 128-1,024 (benchmarks/README.md, issue 14 part 6).
EXPORT_STEPS = 16
EXPORT_CHUNK = 64


def carry_matrix(g: torch.Tensor) -> torch.Tensor:
    """Decay between chunks: ``g [B, nc, X]`` (each chunk's total log-decay) ->
    ``[B, nc, nc, X]`` with ``out[:, i, j] = exp(Σ_{j<r<i} g_r)`` for ``j < i`` and 0 otherwise,
    so the state entering chunk ``i`` is ``Σ_j out[:, i, j]·S_j`` (``S_j``: chunk ``j``'s end
    state started from zero).

    The sums are a matmul with a constant 0/1 matrix (sums of same-sign terms, no
    subtraction of large prefix sums, so exact for long sequences; plain MatMul in ONNX).
    """
    Bsz, nc, X = g.shape
    idx = torch.arange(nc, device=g.device)
    i, j, r = idx[:, None, None], idx[None, :, None], idx[None, None, :]
    between = ((j < r) & (r < i)).to(g.dtype).reshape(nc * nc, nc)
    below = (idx[:, None] > idx[None, :]).to(g.dtype).reshape(nc * nc, 1)
    return (torch.exp(torch.matmul(between, g)) * below).view(Bsz, nc, nc, X)


# Scratch buffers of the scan, reused between calls: on CPU a fresh [B, T, di, N] tensor is
# served by mmap and costs more in page faults than the arithmetic done on it. Only scratch
# that is dead when the forward or backward returns goes back (never saved activations);
# at most _POOL_BYTES are kept per thread: a training step uses four such buffers (fast
# form) or five (stable form), 128 MiB each at batch 8, T 1,024, d_inner 256 (with a
# 256 MiB cap the fast form's step at T 1,024 paid 1.2-1.4x its time in page faults;
# benchmarks/mamba_scan.py).
_POOL = threading.local()
_POOL_BYTES = 768 * 2**20


def _take(
    shape: tuple[int, ...], like: torch.Tensor, avoid: tuple[torch.Tensor, ...] = ()
) -> torch.Tensor:
    """An uninitialized scratch tensor of ``shape`` (``like``'s dtype and device) that shares
    no memory with ``avoid``. A buffer made under ``torch.inference_mode`` is not handed out
    outside it (torch refuses writes to it there: a Mamba run under inference mode made the
    next ordinary forward on the thread raise)."""
    bufs: list[torch.Tensor] = getattr(_POOL, "bufs", [])
    n = math.prod(shape)
    ptrs = {t.data_ptr() for t in avoid}
    inference = torch.is_inference_mode_enabled()
    for i, b in enumerate(bufs):
        if (
            b.numel() == n
            and b.dtype == like.dtype
            and b.device == like.device
            and b.data_ptr() not in ptrs
            and (inference or not b.is_inference())
        ):
            return bufs.pop(i).view(shape)
    return torch.empty(shape, dtype=like.dtype, device=like.device)


def _give(*ts: torch.Tensor) -> None:
    """Return scratch tensors (no longer referenced by the caller) to the pool."""
    bufs: list[torch.Tensor] = getattr(_POOL, "bufs", [])
    for t in ts:
        if all(b.data_ptr() != t.data_ptr() for b in bufs):  # a retained graph gives twice
            bufs.insert(0, t)
    total = 0
    for i, b in enumerate(bufs):
        total += b.numel() * b.element_size()
        if total > _POOL_BYTES:
            del bufs[i:]
            break
    _POOL.bufs = bufs


def _needs_stable(dt: torch.Tensor, A: torch.Tensor) -> bool:
    """Whether some ``Δ·A`` (``dt [..., di]``, ``A [di, N]``) is below ``−FAST_LOG_DECAY``
    (then only the stable form is exact in fp32)."""
    return bool((dt.reshape(-1, dt.shape[-1]).amax(0)[:, None] * A).amin() < -FAST_LOG_DECAY)


def _scan_stable(
    dt: torch.Tensor, A: torch.Tensor, ux: torch.Tensor, Bm: torch.Tensor, Cm: torch.Tensor
) -> torch.Tensor:
    """The stable chunked scan (see the comment at :data:`CHUNK`), out of place (autograd and
    export follow it). Same shapes as :func:`_scan_forward`; returns ``y [B, nc, Q, di]``."""
    Bsz, nc, Q, di = dt.shape
    N = A.shape[1]
    P = STABLE_STEPS
    M = Q // P  # sub-chunks of P steps per chunk
    la = (dt[..., None] * A).reshape(Bsz, nc, M, P, di * N)  # log-decay of each step
    u = (ux[..., None] * Bm[..., None, :]).reshape(la.shape)
    dev, dty = dt.device, dt.dtype
    # every exponent below is a sum of log-decays ≤ 0 (sums over steps are matmuls with
    # triangular 0/1 matrices), so nothing overflows
    suffix = torch.matmul(torch.ones(P, P, dtype=dty, device=dev).triu(1), la)  # Σ_{r>p}
    S_sub = (torch.exp(suffix) * u).sum(3)  # [B, nc, M, X]: sub-chunk end states from zero
    g_sub = la.sum(3)  # [B, nc, M, X]: sub-chunk total log-decays
    after = torch.matmul(torch.ones(M, M, dtype=dty, device=dev).triu(1), g_sub)  # Σ_{r>m}
    S = (torch.exp(after) * S_sub).sum(2)  # [B, nc, X]: chunk end states from zero
    if tracing():  # no loop over a (symbolic) chunk count
        H = (carry_matrix(g_sub.sum(2)) * S[:, None]).sum(2)  # [B, nc, X]: entering each chunk
    else:
        H = carry_in(g_sub.sum(2), S)
    # the state entering each sub-chunk: the chunk's, decayed, plus the sub-chunks before
    before = torch.matmul(torch.ones(M, M, dtype=dty, device=dev).tril(-1), g_sub)  # Σ_{r<m}
    L_in = carry_matrix(g_sub.reshape(Bsz * nc, M, -1)).view(Bsz, nc, M, M, -1)
    h = torch.exp(before) * H[:, :, None] + (L_in * S_sub[:, :, None]).sum(3)  # [B,nc,M,X]
    # then the recurrence over the P steps of every sub-chunk at once (a fixed count of
    # steps whatever the length; few steps keep the exported graph small)
    a_p, u_p = torch.exp(la).unbind(3), u.unbind(3)
    hs = []
    for p in range(P):
        h = a_p[p] * h + u_p[p]
        hs.append(h)
    h = torch.stack(hs, 3).view(Bsz, nc, Q, di, N)
    return torch.einsum("bkqdn,bkqn->bkqd", h, Cm)


def _scan_export(
    dt: torch.Tensor, A: torch.Tensor, ux: torch.Tensor, Bm: torch.Tensor, Cm: torch.Tensor
) -> torch.Tensor:
    """The selective scan as exported (see :data:`EXPORT_CHUNK`), out of place, no
    data-dependent branch, exact for any ``Δ·A ≤ 0`` (every factor is ``exp`` of a sum of
    log-decays ≤ 0).

    ``dt, ux [B, T, di]``, ``A [di, N]``, ``Bm, Cm [B, T, N]`` with ``T`` a multiple of
    :data:`EXPORT_CHUNK` -> ``y [B, T, di]``. States are laid out ``[..., N, di]`` (the
    broadcasts ``Δ⊗A`` and ``B⊗Δx`` then have spans of ``di`` elements, and ``C·h`` is a
    batched row-vector MatMul); the step axis of a sub-chunk is sliced from the small
    ``[B, T, di]`` inputs, never from a full-size tensor.

    Written for ``torch.export``'s cost as well as onnxruntime's: every sub-chunk of every
    sequence lies on one leading axis ``R = B·T/P``, the small inputs are transposed once so
    that step ``p`` is a select of axis 0, and ``C·h`` is ``bmm`` (``matmul`` decomposes
    into reshapes of symbolic shapes). A Mamba block (d_model 128) exports in 19-21 s instead
    of 29 s, and the graph runs as fast as before.
    """
    Bsz, T, di = dt.shape
    N = A.shape[1]
    P, M = EXPORT_STEPS, EXPORT_CHUNK // EXPORT_STEPS
    R = Bsz * (T // P)  # the sub-chunks of every sequence, on one leading axis
    X = N * di
    AT = A.t()  # [N, di]
    dt3 = dt.reshape(R, P, di)
    ux3 = ux.reshape(R, P, di)
    # the small inputs with the step axis first: step p is a plain select of axis 0
    dtP = dt3.transpose(0, 1).unsqueeze(2)  # [P, R, 1, di]
    uxP = ux3.transpose(0, 1).unsqueeze(2)
    BP = Bm.reshape(R, P, N).transpose(0, 1).unsqueeze(3)  # [P, R, N, 1]
    CP = Cm.reshape(R, P, N).transpose(0, 1).unsqueeze(2)  # [P, R, 1, N]
    # per step p of every sub-chunk: decay a = exp(Δ·A) ≤ 1 and input u = Δx·B, [R, N, di]
    a = [torch.exp(dtP[p] * AT) for p in range(P)]
    u = [BP[p] * uxP[p] for p in range(P)]
    z = u[0]  # the sub-chunks' end states from zero
    for p in range(1, P):
        z = a[p] * z + u[p]
    S = z.reshape(Bsz, -1, M, X)  # [B, nc, M, X]
    g = (dt3.sum(1)[:, None, :] * AT).reshape(Bsz, -1, M, X)  # sub-chunk log-decays
    D = torch.exp(g)
    e = S[:, :, 0]  # the chunks' end states from zero
    for m in range(1, M):
        e = D[:, :, m] * e + S[:, :, m]
    L = carry_matrix(g.sum(2))  # [B, nc, nc, X]
    h = (L * e[:, None]).sum(2)  # the state entering each chunk
    h_in = [h]  # ... and each sub-chunk
    for m in range(M - 1):
        h = D[:, :, m] * h + S[:, :, m]
        h_in.append(h)
    h = torch.stack(h_in, 2).reshape(R, N, di)
    ys = []
    for p in range(P):
        h = a[p] * h + u[p]
        ys.append(torch.bmm(CP[p], h))  # [R, 1, di]
    return torch.cat(ys, 1).reshape(Bsz, T, di)


class _StableScan(torch.autograd.Function):
    """The stable form with a hand-written backward (eager training with strong decays; the
    same function as :func:`_scan_stable`, its recurrence run over whole chunks):
    the adjoint of the in-chunk recurrence ``δ_q = C_q gy_q + a_{q+1} δ_{q+1}`` run backwards
    over the chunk's steps in place, the carry's adjoint through ``carry_back``, and the
    end-state recurrence's adjoint ``ε_{q−1} = a_q ε_q``; ``∂la = ∂a·a`` plus the chunk
    total's share. Saves ``a`` and ``h`` (``[B, nc, Q, di, N]`` each)."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx,
        dt: torch.Tensor,
        A: torch.Tensor,
        ux: torch.Tensor,
        Bm: torch.Tensor,
        Cm: torch.Tensor,
    ) -> torch.Tensor:
        Bsz, nc, Q, di = dt.shape
        shape = (Bsz, nc, Q, di, A.shape[1])
        la = torch.mul(dt[..., None], A, out=_take(shape, dt))
        g = la.sum(2)  # [B, nc, di, N]
        a = torch.exp(la, out=la)
        u = torch.mul(ux[..., None], Bm[..., None, :], out=_take(shape, dt))
        z = u[:, :, 0].clone()
        for q in range(1, Q):
            z.mul_(a[:, :, q]).add_(u[:, :, q])
        g = g.reshape(Bsz, nc, -1)
        H = carry_in(g, z.reshape(Bsz, nc, -1)).view(z.shape)  # the state entering each chunk
        h = u  # overwritten step by step: h_q = a_q h_{q−1} + u_q
        prev = H
        for q in range(Q):
            h[:, :, q].addcmul_(a[:, :, q], prev)
            prev = h[:, :, q]
        y = torch.einsum("bkqdn,bkqn->bkqd", h, Cm)
        ctx.save_for_backward(dt, A, ux, Bm, Cm, a, h, H, z, g)
        return y

    @staticmethod
    def backward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx, gy: torch.Tensor
    ) -> tuple[torch.Tensor, ...]:
        dt, A, ux, Bm, Cm, a, h, H, S, g = ctx.saved_tensors  # type: ignore[attr-defined]
        Bsz, nc, Q, di = dt.shape
        N = A.shape[1]
        shape = (Bsz, nc, Q, di, N)
        saved = (a, h)  # full-size scratch below comes from the pool, never these
        gy = gy.contiguous()
        gC = (gy[..., None, :] @ h).squeeze(-2)
        # ∂y/∂h directly, then the adjoint
        delta = torch.mul(gy[..., None], Cm[..., None, :], out=_take(shape, a, saved))
        for q in range(Q - 2, -1, -1):
            delta[:, :, q].addcmul_(a[:, :, q + 1], delta[:, :, q + 1])
        ga = _take(shape, a, saved)
        torch.mul(delta[:, :, 1:], h[:, :, :-1], out=ga[:, :, 1:])
        torch.mul(delta[:, :, 0], H, out=ga[:, :, 0])
        gH = a[:, :, 0] * delta[:, :, 0]  # [B, nc, di, N]
        # the carry H_i = exp(g_{i−1}) H_{i−1} + S_{i−1} backwards: F_k, the gradient of
        # chunk k's end state S_k, is the total gradient reaching H_{k+1}; the chunk total
        # g_k enters only H_{k+1}, through exp(g_k) H_k
        F_ = carry_back(g, gH.reshape(Bsz, nc, -1))  # [B, nc, di·N]
        gS = F_.view(S.shape)
        gg = (F_ * torch.exp(g) * H.reshape(Bsz, nc, -1)).view(Bsz, nc, di, N)  # ∂ totals
        # the end-state recurrence z_q = a_q z_{q−1} + u_q (z_{Q−1} = S), backwards: z is
        # recomputed forwards (u_q one step at a time), then ε runs back from ∂S
        gu = delta
        z = _take(shape, a, saved)
        torch.mul(ux[:, :, 0, :, None], Bm[:, :, 0, None, :], out=z[:, :, 0])
        for q in range(1, Q):
            u_q = ux[:, :, q, :, None] * Bm[:, :, q, None, :]
            torch.addcmul(u_q, a[:, :, q], z[:, :, q - 1], out=z[:, :, q])
        eps = gS
        for q in range(Q - 1, -1, -1):
            gu[:, :, q].add_(eps)
            if q > 0:
                ga[:, :, q].addcmul_(eps, z[:, :, q - 1])
                eps = eps * a[:, :, q]
        gla = ga.mul_(a).add_(gg[:, :, None])
        tmp = torch.mul(gla, A, out=z)
        gdt = tmp.sum(-1)
        gA = torch.mul(gla, dt[..., None], out=tmp).view(-1, di, N).sum(0)
        gux = (gu @ Bm[..., None]).squeeze(-1)
        gB = (ux[..., None, :] @ gu).squeeze(-2)
        del gla, tmp
        # scratch and the saved a, h are dead now (a second backward through this graph
        # would be refused by autograd's version check on saved tensors, not go wrong)
        _give(delta, ga, z, a, h)
        return gdt, gA, gux, gB, gC


def _scan_forward(
    dt: torch.Tensor,
    A: torch.Tensor,
    ux: torch.Tensor,
    Bm: torch.Tensor,
    Cm: torch.Tensor,
) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
    """Chunked selective scan, run without an autograd graph (intermediates are updated in
    place: on CPU a fresh ``[B, T, di, N]`` tensor costs more in page faults than the
    arithmetic on it).

    ``dt, ux [B, nc, Q, di]``, ``A [di, N]``, ``Bm, Cm [B, nc, Q, N]`` -> ``y [B, nc, Q, di]``
    with ``y_t = C_t·h_t``, ``h_t = exp(Δ_t A) h_{t−1} + ux_t B_t``, and what the backward
    pass needs: ``(eG, h, L, ehalf)``. The fast form: exact while every ``Δ·A ≥
    −FAST_LOG_DECAY`` (:func:`_needs_stable` is False; the callers check).
    """
    Bsz, nc, Q, di = dt.shape
    N = A.shape[1]
    shape, flat = (Bsz, nc, Q, di, N), (Bsz, nc, Q, di * N)
    tril = torch.ones(Q, Q, dtype=dt.dtype, device=dt.device).tril()
    capture = tracing()  # compile: no out= arguments, no pool
    # G: log-decay since the chunk start, centered on half the chunk's total (|G| ≤
    # Q·FAST_LOG_DECAY/2). Cumulative sums within a chunk are a matmul with a lower-triangular
    # ones matrix (much faster than cumsum over a strided axis on CPU).
    if capture:
        buf = dt[..., None] * A
        G = torch.matmul(tril, buf.view(flat)).view(shape)
        half = 0.5 * G[:, :, -1:]  # [B, nc, 1, di, N]
        G = G - half
    else:  # cumulate Δ [B, nc, Q, di] only, then scale by A
        Dc = torch.matmul(tril, dt)
        Dhalf = 0.5 * Dc[:, :, -1:]
        G = torch.mul((Dc - Dhalf)[..., None], A, out=_take(shape, dt))
        half = Dhalf[..., None] * A
        buf = _take(shape, dt)
    eG = torch.exp(G) if capture else torch.exp(G, out=_take(shape, dt))
    if capture:
        v = ux[..., None] * Bm[..., None, :] / eG
        h = torch.matmul(tril, v.view(flat)).view(shape)
    else:  # reuse the buffers of the log-decays and of G
        v = torch.mul(ux[..., None], Bm[..., None, :], out=buf).div_(eG)
        h = torch.matmul(tril, v.view(flat), out=G.view(flat)).view(shape)  # chunk-local
        _give(buf)
        del buf, v
    # states carried between chunks: E_k = Σ_{j≤k} exp(Σ_{j<r≤k} g_r) S_j with S_j the end
    # state of chunk j started from zero and g_r the total log-decay of chunk r
    ehalf = torch.exp(half[:, :, 0])  # [B, nc, di, N]
    S = (eG[:, :, -1] * h[:, :, -1]).view(Bsz, nc, di * N)
    g = (2.0 * half).view(Bsz, nc, di * N)  # each chunk's total log-decay
    if capture:  # no loop over a (symbolic) chunk count
        carry = (carry_matrix(g) * S[:, None]).sum(2).view(Bsz, nc, di, N)
    else:  # entering each chunk, linear in the chunk count
        carry = carry_in(g, S).view(Bsz, nc, di, N)
    if capture:  # out of place: autograd can run through it (torch.compile)
        h = (h + (ehalf * carry)[:, :, None]) * eG
    else:
        h.add_((ehalf * carry)[:, :, None]).mul_(eG)  # [B, nc, Q, di, N]
    y = torch.einsum("bkqdn,bkqn->bkqd", h, Cm)
    return y, (eG, h, g, ehalf)


class _SelectiveScan(torch.autograd.Function):
    """``_scan_forward`` with a hand-written backward: the adjoint recurrence
    ``δ_t = C_t gy_t + exp(la_{t+1}) δ_{t+1}`` run as the same chunked scan backwards in time,
    then ``∂la_t = δ_t (h_t − u_t)``, ``∂u_t = δ_t``, ``∂C_t = Σ_d gy_t h_t``."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx,
        dt: torch.Tensor,
        A: torch.Tensor,
        ux: torch.Tensor,
        Bm: torch.Tensor,
        Cm: torch.Tensor,
    ) -> torch.Tensor:
        y, (eG, h, g, ehalf) = _scan_forward(dt, A, ux, Bm, Cm)
        ctx.save_for_backward(dt, A, ux, Bm, Cm, eG, h, g, ehalf)
        return y

    @staticmethod
    def backward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx, gy: torch.Tensor
    ) -> tuple[torch.Tensor, ...]:
        dt, A, ux, Bm, Cm, eG, h, g, ehalf = ctx.saved_tensors  # type: ignore[attr-defined]
        Bsz, nc, Q, di = dt.shape
        N = A.shape[1]
        shape, flat = (Bsz, nc, Q, di, N), (Bsz, nc, Q, di * N)
        gy = gy.contiguous()
        triu = torch.ones(Q, Q, dtype=dt.dtype, device=dt.device).triu()
        w = torch.mul(eG, Cm[..., None, :], out=_take(shape, eG, (eG, h))).mul_(gy[..., None])
        # w = exp(G_s − Gm)·C_s·gy_s; rc: Σ_{s≥t} w_s within the chunk
        rc = torch.matmul(triu, w.view(flat), out=_take(flat, eG, (eG, h))).view(shape)
        # gradient entering chunk k from later chunks: F_k = Σ_i L[i, k] R_i with
        # R_i = Σ_{s∈i} exp(G_s) C_s gy_s (G from chunk i's start)
        R = (ehalf * rc[:, :, 0]).view(Bsz, nc, di * N)
        Fk = carry_back(g, R).view(Bsz, nc, di, N)
        delta = rc.add_((ehalf * Fk)[:, :, None]).div_(eG)  # ∂loss/∂h_t (total)
        gla = torch.addcmul(h, ux[..., None], Bm[..., None, :], value=-1.0, out=w).mul_(delta)
        gdt = gla.mul_(A).sum(-1)  # Σ_n ∂la·A
        gA = gla.mul_(dt[..., None]).view(-1, di, N).sum(0).div_(A)  # Σ_{b,t} ∂la·Δ
        gux = torch.einsum("bkqdn,bkqn->bkqd", delta, Bm)
        gB = (ux[..., None, :] @ delta).squeeze(-2)
        gC = (gy[..., None, :] @ h).squeeze(-2)
        del gla, delta
        # scratch and the saved eG, h are dead now (a second backward through this graph
        # would be refused by autograd's version check on saved tensors, not go wrong)
        _give(w, rc, eG, h)
        return gdt, gA, gux, gB, gC


def selective_scan(
    dt: torch.Tensor, A: torch.Tensor, ux: torch.Tensor, Bm: torch.Tensor, Cm: torch.Tensor
) -> torch.Tensor:
    """Mamba's selective scan ``y_t = C_t·h_t``, ``h_t = exp(Δ_t A) h_{t−1} + ux_t B_t``
    (``h_{−1} = 0``), exact for any ``Δ·A ≤ 0`` (no clamp).

    ``dt, ux [B, T, di]`` (``Δ`` and ``Δ·x``), ``A [di, N]`` (negative),
    ``Bm, Cm [B, T, N]`` -> ``y [B, T, di]``. Chunked parallel form, no loop over time (see
    :data:`CHUNK`): the fast form when every ``Δ·A ≥ −FAST_LOG_DECAY`` (under autograd with a
    hand-written backward: the same chunked scan run backwards in time), else the stable
    form. Under graph capture (:func:`~archir.blocks.common.tracing`) no data-dependent
    branch: while exporting (ONNX, torch.export, tracing) :func:`_scan_export`, under
    ``torch.compile`` the stable form; both plain out-of-place ops that autograd and
    torch.export follow, with symbolic padding (a dynamic sequence axis stays dynamic).
    """
    Bsz, T, di = dt.shape
    if tracing(compiling=False):  # ONNX / torch.export: the onnxruntime-shaped exact form
        # padded to ne·EXPORT_CHUNK steps, written so that a symbolic T gives a padded
        # length that is a multiple by algebra (a dynamic sequence axis stays dynamic)
        ne = (T + EXPORT_CHUNK - 1) // EXPORT_CHUNK
        pad = ne * EXPORT_CHUNK - T
        dt, ux = F.pad(dt, (0, 0, 0, pad)), F.pad(ux, (0, 0, 0, pad))
        Bm, Cm = F.pad(Bm, (0, 0, 0, pad)), F.pad(Cm, (0, 0, 0, pad))
        return _scan_export(dt, A, ux, Bm, Cm)[:, :T]
    capture = tracing()
    # pad to nc·CHUNK steps with nc = ceil(T / CHUNK); written so that a symbolic T (dynamic
    # sequence axis under torch.export) gives a padded length that is nc·CHUNK by algebra
    nc = (T + CHUNK - 1) // CHUNK
    pad = nc * CHUNK - T
    if capture or pad:
        dt, ux = F.pad(dt, (0, 0, 0, pad)), F.pad(ux, (0, 0, 0, pad))
        Bm, Cm = F.pad(Bm, (0, 0, 0, pad)), F.pad(Cm, (0, 0, 0, pad))
    args = [t.reshape(Bsz, nc, CHUNK, t.shape[-1]).contiguous() for t in (dt, ux, Bm, Cm)]
    dt, ux, Bm, Cm = args
    A = A.contiguous()
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (dt, A, ux, Bm, Cm))
    if capture:  # export/compile: no data-dependent branch
        y = _scan_stable(dt, A, ux, Bm, Cm)
    elif _needs_stable(dt, A):
        y = _StableScan.apply(dt, A, ux, Bm, Cm) if needs_grad else _scan_stable(dt, A, ux, Bm, Cm)
    elif needs_grad:
        y = _SelectiveScan.apply(dt, A, ux, Bm, Cm)
    else:
        with torch.no_grad():
            y, (eG, h, _, _) = _scan_forward(dt, A, ux, Bm, Cm)
            _give(eG, h)
    return y.reshape(Bsz, nc * CHUNK, di)[:, :T]


# --------------------------------------------------------------------------- Mamba


class MambaParams(KindParams):
    d_state: int = Field(16, ge=1, le=MAX_DIM)
    d_conv: int = Field(4, ge=1, le=1024)
    expansion: float = Field(2.0, gt=0, le=16)
    dt_rank: int | None = Field(None, ge=1, le=MAX_DIM)
    dt_min: float = Field(0.001, gt=0)
    dt_max: float = Field(0.1, gt=0)
    conv_bias: bool = True


def _mamba_dims(p: MambaParams, d: int) -> tuple[int, int]:
    """``(d_inner, dt_rank)``."""
    return int(round(p.expansion * d)), p.dt_rank or math.ceil(d / 16)


def _softplus(x: torch.Tensor) -> torch.Tensor:
    """``softplus(x) = log(1 + exp(x))``; while exporting written ``relu(x) + log1p(exp(−|x|))``
    (the same value to an ulp): onnxruntime's ``Softplus`` kernel is scalar, ~10x slower
    than these vectorized ops (3 ms of a 25 ms layer at T 512)."""
    if tracing(compiling=False):
        return F.relu(x) + torch.log1p(torch.exp(-x.abs()))
    return F.softplus(x)


class Mamba(nn.Module):
    """Mamba selective SSM block (Gu & Dao, 2023).

    ``x, z = in_proj(x)`` (each ``d_inner = expansion·d``); ``x = silu(causal depthwise
    conv_{d_conv}(x))``; input-dependent ``Δ = softplus(dt_proj(·))`` (low rank ``dt_rank``),
    ``B, C [d_state]`` from ``x_proj``; per channel ``c`` and state ``n``:
    ``h_t = exp(Δ_t A) h_{t−1} + Δ_t B_t x_t``, ``y_t = C_t·h_t + D x_t`` with
    ``A = −exp(A_log) [d_inner, d_state]`` (no clamp: exact for any ``Δ·A``, see ``CHUNK``);
    output ``out_proj(y ⊙ silu(z))``.

    ``forward``: ``[B, T, d] -> [B, T, d]`` by a chunked parallel scan: cumulative sums within
    chunks of ``CHUNK`` steps and a recurrence between chunks (``carry_in``), with a
    hand-written backward (``selective_scan``); ~5x faster to train on CPU than autograd
    through the same scan (``benchmarks/mixers_speed.py``). State: conv window ``[B, d_inner, d_conv−1]`` and SSM state ``[B, d_inner, d_state]``.
    """

    def __init__(self, d: int, p: MambaParams) -> None:
        super().__init__()
        di, R = _mamba_dims(p, d)
        self.di, self.R, self.N, self.K = di, R, p.d_state, p.d_conv
        self.in_proj = nn.Linear(d, 2 * di, bias=False)
        self.conv = nn.Conv1d(di, di, p.d_conv, groups=di, padding=p.d_conv - 1, bias=p.conv_bias)
        self.x_proj = nn.Linear(di, R + 2 * p.d_state, bias=False)
        self.dt_proj = nn.Linear(R, di, bias=True)
        self.out_proj = nn.Linear(di, d, bias=False)
        for layer in (self.in_proj, self.x_proj, self.out_proj):
            init_linear(layer)
        nn.init.uniform_(self.dt_proj.weight, -(R**-0.5), R**-0.5)
        dt = torch.exp(
            torch.rand(di) * (math.log(p.dt_max) - math.log(p.dt_min)) + math.log(p.dt_min)
        )
        with torch.no_grad():
            self.dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # softplus⁻¹(dt)
        a = torch.arange(1, p.d_state + 1, dtype=torch.float32).repeat(di, 1)
        self.A_log = nn.Parameter(torch.log(a))
        self.D = nn.Parameter(torch.ones(di))

    def _ssm_inputs(
        self, xc: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """``xc [..., di]`` -> log-decay ``[..., di, N]``, input ``Δ·B·x [..., di, N]``,
        ``C [..., N]``, and ``Δ [..., di]``."""
        dbc = self.x_proj(xc)
        dt, Bm, Cm = torch.split(dbc, [self.R, self.N, self.N], dim=-1)
        dt = F.softplus(self.dt_proj(dt))
        A = -torch.exp(self.A_log)
        log_decay = dt[..., None] * A
        u = (dt * xc)[..., None] * Bm[..., None, :]
        return log_decay, u, Cm, dt

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        T = x.shape[1]
        xi, z = self.in_proj(x).chunk(2, dim=-1)
        xc = F.silu(self.conv(xi.transpose(1, 2))[..., :T].transpose(1, 2))
        dt, Bm, Cm = torch.split(self.x_proj(xc), [self.R, self.N, self.N], dim=-1)
        dt = _softplus(self.dt_proj(dt))
        y = selective_scan(dt, -torch.exp(self.A_log), dt * xc, Bm, Cm) + xc * self.D
        return self.out_proj(y * F.silu(z))

    def init_state(
        self, batch: int, device: torch.device | None = None, dtype: torch.dtype | None = None
    ) -> State:
        conv = torch.zeros(batch, self.di, self.K - 1, device=device, dtype=dtype)
        h = torch.zeros(batch, self.di, self.N, device=device, dtype=dtype)
        return (conv, h)

    def step(self, x: torch.Tensor, state: State) -> tuple[torch.Tensor, State]:
        conv, h = state
        xi, z = self.in_proj(x).chunk(2, dim=-1)
        window = torch.cat([conv, xi[..., None]], dim=-1)  # [B, di, K]
        xc = (window * self.conv.weight[:, 0, :]).sum(-1)
        if self.conv.bias is not None:
            xc = xc + self.conv.bias
        xc = F.silu(xc)
        la, u, Cm, _ = self._ssm_inputs(xc)
        h = torch.exp(la) * h + u
        y = (h * Cm[:, None, :]).sum(-1) + xc * self.D
        return self.out_proj(y * F.silu(z)), (window[..., 1:], h)


def _mamba_check(p: MambaParams, c: BuildContext) -> None:
    if p.dt_min > p.dt_max:
        raise ValueError(f"dt_min {p.dt_min} is larger than dt_max {p.dt_max}")


def _mamba_params(p: MambaParams, c: BuildContext) -> int:
    d = c.d_model
    di, R = _mamba_dims(p, d)
    N, K = p.d_state, p.d_conv
    return (
        d * 2 * di  # in_proj
        + di * K
        + (di if p.conv_bias else 0)  # depthwise conv
        + di * (R + 2 * N)  # x_proj
        + R * di
        + di  # dt_proj
        + di * N  # A_log
        + di  # D
        + di * d  # out_proj
    )


def _mamba_flops(p: MambaParams, c: BuildContext, L: int) -> float:
    d = c.d_model
    di, R = _mamba_dims(p, d)
    N, K = p.d_state, p.d_conv
    dense = 2.0 * d * 2 * di + 2.0 * di * K + 2.0 * di * (R + 2 * N) + 2.0 * R * di + 2.0 * di * d
    # per (channel, state): Δ·A, Δx·B, the in-chunk recurrence or cumulative sum (counted
    # as 1, as since the latency predictor was calibrated: the triangular matmul the forms
    # run costs 2·CHUNK), the decay, the carry multiply-add, C·h multiply-add = 9; between
    # chunks the nc×nc transfer matrix: ~2·nc/CHUNK per token
    nc = math.ceil(max(L, 1) / CHUNK)
    scan = 9.0 * di * N + 2.0 * di * N * nc / CHUNK
    return dense + scan + 4.0 * di  # + D skip and gate


register(
    BlockKind(
        name="mamba",
        role="token_mixer",
        params=MambaParams,
        build=lambda p, c: Mamba(c.d_model, p),
        n_params=_mamba_params,
        flops=_mamba_flops,
        state_bytes=lambda p, c, L: 4 * _mamba_dims(p, c.d_model)[0] * (p.d_state + p.d_conv - 1),
        check=_mamba_check,
        paper="Gu & Dao, 2023, 'Mamba: Linear-Time Sequence Modeling with Selective State Spaces'",
        summary="selective SSM: input-dependent Δ, B, C; causal depthwise conv; SiLU gate",
        recurrent=True,
    )
)


# --------------------------------------------------------------------------- S4D


class S4DParams(KindParams):
    d_state: int = Field(64, ge=2, le=MAX_DIM)
    dt_min: float = Field(0.001, gt=0)
    dt_max: float = Field(0.1, gt=0)


class S4D(nn.Module):
    """Diagonal state-space layer S4D (Gu et al., 2022, "On the Parameterization and
    Initialization of Diagonal State Space Models"), S4D-Lin initialization
    ``A_n = −½ + iπn``, zero-order-hold discretization, in real arithmetic.

    Each of ``d`` channels has ``M = d_state/2`` complex modes, kept as (real, imaginary)
    pairs. Kernel ``K_l = 2·Re(Σ_n C̃_n λ_n^l)`` with ``λ = exp(ΔA)``,
    ``C̃ = C·(λ−1)/A``; ``y = K * x + D⊙x`` (causal convolution as a masked Toeplitz matmul),
    then ``GLU(W·GELU(y))`` back to ``d``.
    ``forward``: ``[B, T, d] -> [B, T, d]``. State: ``[B, d, M, 2]`` (``d·d_state`` reals)
    with ``h_t = λ h_{t−1} + x_t``, ``y_t = 2·Re(C̃·h_t) + D x_t``.
    """

    def __init__(self, d: int, p: S4DParams) -> None:
        super().__init__()
        M = p.d_state // 2
        self.d, self.M = d, M
        log_dt = torch.rand(d) * (math.log(p.dt_max) - math.log(p.dt_min)) + math.log(p.dt_min)
        self.log_dt = nn.Parameter(log_dt)
        self.log_A_real = nn.Parameter(torch.log(0.5 * torch.ones(d, M)))
        self.A_imag = nn.Parameter(math.pi * torch.arange(M, dtype=torch.float32).repeat(d, 1))
        self.C = nn.Parameter(torch.randn(d, M, 2) * 0.5**0.5)
        self.D = nn.Parameter(torch.randn(d))
        self.out = nn.Linear(d, 2 * d, bias=True)
        init_linear(self.out)

    def _modes(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Discrete ``λ = exp(ΔA)`` as (log-magnitude, angle) and ``C̃`` as (re, im),
        each ``[d, M]``."""
        dt = torch.exp(self.log_dt)[:, None]
        ar, ai = -torch.exp(self.log_A_real), self.A_imag
        log_mag, ang = ar * dt, ai * dt
        # (λ − 1) / A with λ = e^{log_mag}(cos ang + i sin ang)
        lr, li = torch.exp(log_mag) * torch.cos(ang) - 1.0, torch.exp(log_mag) * torch.sin(ang)
        den = ar * ar + ai * ai
        qr, qi = (lr * ar + li * ai) / den, (li * ar - lr * ai) / den
        cr, ci = self.C[..., 0], self.C[..., 1]
        return log_mag, ang, cr * qr - ci * qi, cr * qi + ci * qr

    def _post(self, y: torch.Tensor) -> torch.Tensor:
        return F.glu(self.out(F.gelu(y)), dim=-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        T = x.shape[1]
        log_mag, ang, cr, ci = self._modes()
        pos = torch.arange(T, device=x.device)
        lf = pos.to(x.dtype)
        mag = torch.exp(log_mag[..., None] * lf)  # [d, M, T]
        th = ang[..., None] * lf
        K = 2.0 * (mag * (cr[..., None] * torch.cos(th) - ci[..., None] * torch.sin(th))).sum(1)
        lag = pos[:, None] - pos[None, :]  # [T, S] = t − s
        toe = K[:, lag.clamp(min=0)] * (lag >= 0).to(x.dtype)  # [d, T, S]
        y = (toe @ x.permute(2, 1, 0)).permute(2, 1, 0)  # [B, T, d]
        return self._post(y + x * self.D)

    def init_state(
        self, batch: int, device: torch.device | None = None, dtype: torch.dtype | None = None
    ) -> State:
        return (torch.zeros(batch, self.d, self.M, 2, device=device, dtype=dtype),)

    def step(self, x: torch.Tensor, state: State) -> tuple[torch.Tensor, State]:
        (h,) = state
        log_mag, ang, cr, ci = self._modes()
        lam_r, lam_i = torch.exp(log_mag) * torch.cos(ang), torch.exp(log_mag) * torch.sin(ang)
        hr, hi = h[..., 0], h[..., 1]
        hr, hi = lam_r * hr - lam_i * hi + x[..., None], lam_r * hi + lam_i * hr
        y = 2.0 * (cr * hr - ci * hi).sum(-1) + x * self.D
        return self._post(y), (torch.stack([hr, hi], dim=-1),)


def _s4d_check(p: S4DParams, c: BuildContext) -> None:
    if p.d_state % 2:
        raise ValueError(f"d_state {p.d_state} must be even (complex modes as real pairs)")
    if p.dt_min > p.dt_max:
        raise ValueError(f"dt_min {p.dt_min} is larger than dt_max {p.dt_max}")


def _s4d_params(p: S4DParams, c: BuildContext) -> int:
    d, M = c.d_model, p.d_state // 2
    return d + 2 * d * M + 2 * d * M + d + (d * 2 * d + 2 * d)


def _s4d_flops(p: S4DParams, c: BuildContext, L: int) -> float:
    d, M = c.d_model, p.d_state // 2
    # dense Toeplitz conv + kernel generation (per sequence, ~6 FLOPs per (channel, mode,
    # lag), i.e. 6·d·M per token) + D skip + output GLU projection
    return 2.0 * L * d + 6.0 * d * M + 2.0 * d + 2.0 * d * 2 * d


register(
    BlockKind(
        name="s4d",
        role="token_mixer",
        params=S4DParams,
        build=lambda p, c: S4D(c.d_model, p),
        n_params=_s4d_params,
        flops=_s4d_flops,
        state_bytes=lambda p, c, L: 4 * c.d_model * (p.d_state // 2) * 2,
        check=_s4d_check,
        paper=(
            "Gu et al., 2022, 'On the Parameterization and Initialization of Diagonal State "
            "Space Models' (S4D)"
        ),
        summary="diagonal SSM, S4D-Lin init, ZOH, real-arithmetic kernel as causal convolution",
        recurrent=True,
    )
)
