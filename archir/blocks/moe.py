"""Mixture-of-experts channel mixer (role ``channel_mixer``).

Shazeer et al., 2017, "Outrageously Large Neural Networks: The Sparsely-Gated
Mixture-of-Experts Layer"; Fedus et al., 2022, "Switch Transformers" (load-balancing loss,
capacity factor).

Shapes: ``x [batch, seq, d_model] -> [batch, seq, d_model]``; tokens are routed
independently (``N = batch·seq`` tokens per forward).

Routing: ``p = softmax(x·W_r)`` over ``n_experts``; each token goes to its ``top_k`` experts
with gates ``p_i / Σ_topk p`` (renormalized, summing to 1; ``normalize_gates: false``
keeps ``p_i`` as Switch does for ``top_k: 1``) and its output is
``Σ gate_i · expert_i(x)``.

Capacity (training only): in training mode each expert takes at most
``C = ceil(capacity_factor · N · top_k / n_experts)`` tokens; slots are filled in priority
order (every token's first choice before any second choice, earlier tokens first) and tokens
over capacity are dropped for that expert (their contribution is 0; the residual carries
them). ``capacity_factor: null`` never drops. In eval mode — evaluation, inference, export —
no token is dropped, so a sequence's output never depends on the other sequences in its
batch (as in Switch Transformers' and Mixtral's inference, where capacity is a training-time
bound on an expert's batch).

Auxiliary loss, ``aux_loss_style``:

* ``switch`` (default; Fedus et al., 2022), set in ``self.aux_loss`` on every forward and
  summed over layers by the model: ``aux_loss_weight · n_experts · Σ_i f_i · P_i`` per layer,
  ``f_i`` the fraction of routing slots assigned to expert ``i`` (before drops), ``P_i`` the
  mean router probability;
* ``mixtral`` (transformers' ``load_balancing_loss_func``): one term for the whole model,
  ``aux_loss_weight · n_experts · Σ_i (c_i / R) · (p_i / R)`` with ``c_i`` expert ``i``'s
  top-k assignments and ``p_i`` its summed router probabilities over the rows ``R`` of every
  such layer together — ``top_k`` times the Switch value for one layer, and layers pooled
  instead of summed. Each layer leaves ``self.aux_stats = (c, p, rows)``; the compiled model
  combines them (:meth:`archir.compiler.CompiledModel.aux_loss`).

Two numerically equal execution paths (``dispatch``): ``sparse`` runs each expert on the
tokens it was given (index gather; data-dependent shapes); ``dense`` runs every expert on
every token and masks (static shapes). ``auto`` is sparse in eager mode and while exporting
(ONNX ``NonZero`` → ``Gather`` → two MatMuls → ``ScatterND`` add per expert, dynamic batch
and sequence: onnxruntime runs ``top_k/n_experts`` of the expert FLOPs, as eager does; up to
:data:`SPARSE_EXPORT_MAX` experts), dense under ``torch.compile`` and for larger banks.

Cost: FLOPs per token count what the sparse path runs: the router ``2·d·E`` plus ``top_k``
experts (``4·d·h`` for ``mlp``, ``6·d·h`` for ``swiglu``); the dense path runs
``n_experts / top_k`` times the expert FLOPs. Parameters count all experts.
"""

from __future__ import annotations

from typing import ClassVar, Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from archir.blocks.common import hidden_size, tracing
from archir.registry import MAX_HIDDEN, BlockKind, BuildContext, KindParams, register

#: largest ``n_experts`` whose exported graph dispatches sparsely (one unrolled branch per
#: expert; past it the graph runs every expert on every token as one batched MatMul)
SPARSE_EXPORT_MAX = 64


class MoEParams(KindParams):
    """Parameters of ``moe``.

    Attributes:
        n_experts: number of expert FFNs ``E``.
        top_k: experts per token.
        expansion: per-expert hidden width ``h = round(expansion·d_model)`` (or ``d_ff``).
        expert_kind: ``mlp`` (``W2·gelu(W1·x)``) or ``swiglu`` (``W2·(silu(Wg·x) ⊙ Wu·x)``).
        capacity_factor: tokens per expert in training ``= ceil(cf·N·top_k/E)``; ``null`` =
            no limit. Never applied in eval mode (inference does not drop tokens).
        aux_loss_weight: scale of the load-balancing loss.
        normalize_gates: renormalize the top-k probabilities to sum to 1; ``false`` keeps the
            raw router probabilities (Switch with ``top_k: 1``, where renormalized gates
            would all be 1 and the router would learn only from the auxiliary loss).
        dispatch: ``auto`` | ``sparse`` | ``dense`` (see the module docstring).
        aux_loss_style: ``switch`` (per layer, summed) or ``mixtral`` (pooled over layers,
            as transformers computes it; see the module docstring).
    """

    n_experts: int = Field(8, ge=1, le=4096)
    top_k: int = Field(2, ge=1, le=4096)
    expansion: float = Field(2.0, gt=0, le=64)
    d_ff: int | None = Field(None, gt=0, le=MAX_HIDDEN)
    expert_kind: Literal["mlp", "swiglu"] = "mlp"
    capacity_factor: float | None = Field(1.25, gt=0)
    aux_loss_weight: float = Field(0.01, ge=0)
    normalize_gates: bool = True
    dispatch: Literal["auto", "sparse", "dense"] = "auto"
    aux_loss_style: Literal["switch", "mixtral"] = "switch"

    added_later: ClassVar[frozenset[str]] = frozenset({"aux_loss_style"})


class MoE(nn.Module):
    """Top-k softmax-routed mixture of FFN experts with capacity and a balancing loss.

    ``forward(x [batch, seq, d]) -> [batch, seq, d]``; sets ``self.aux_loss`` (a scalar) and
    ``self.last_gates [N, E]`` (the combine weights after drops, for inspection).
    """

    def __init__(self, d: int, h: int, p: MoEParams) -> None:
        super().__init__()
        E = p.n_experts
        self.E, self.k, self.h = E, p.top_k, h
        self.kind = p.expert_kind
        self.capacity_factor = p.capacity_factor
        self.aux_weight = p.aux_loss_weight
        self.dispatch = p.dispatch
        self.normalize = p.normalize_gates
        self.router = nn.Linear(d, E, bias=False)
        n_in = 2 if p.expert_kind == "swiglu" else 1
        self.w_in = nn.Parameter(torch.randn(E, d, n_in * h) * 0.02)  # [E, d, h | 2h]
        self.w_out = nn.Parameter(torch.randn(E, h, d) * 0.02)  # [E, h, d]
        nn.init.normal_(self.router.weight, std=0.02)
        self.has_aux_loss = True
        self.aux_style = p.aux_loss_style
        self.aux_loss: torch.Tensor | None = None
        #: ``(assignments [E], summed router probabilities [E], rows)`` of the last forward
        self.aux_stats: tuple[torch.Tensor, torch.Tensor, int] | None = None
        self.last_gates: torch.Tensor | None = None

    def _act(self, a: torch.Tensor) -> torch.Tensor:
        if self.kind == "swiglu":
            g, u = a.split(self.h, dim=-1)
            return F.silu(g) * u
        return F.gelu(a)

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Router for tokens ``x [N, d]``: combine weights ``[N, E]`` (renormalized top-k
        gates, zero where not chosen or, in training mode only, dropped over capacity) and
        the auxiliary loss (scalar)."""
        E, k = self.E, self.k
        probs = torch.softmax(self.router(x).float(), dim=-1)  # [N, E]
        top_p, top_i = probs.topk(k, dim=-1)  # [N, k]
        gates = top_p / top_p.sum(-1, keepdim=True) if self.normalize else top_p
        chosen = F.one_hot(top_i, E).to(probs.dtype)  # [N, k, E]
        if self.capacity_factor is not None and self.training:
            slots = chosen.transpose(0, 1).reshape(-1, E)  # [k·N, E], first choices first
            pos = torch.cumsum(slots, dim=0) - 1.0  # 0-based position in the expert
            n_tok = torch.ones_like(probs[:, 0]).sum()
            keep = (pos * E < self.capacity_factor * k * n_tok).to(probs.dtype)
            kept = (slots * keep).reshape(k, -1, E).transpose(0, 1)  # [N, k, E]
        else:
            kept = chosen
        combine = (gates[..., None] * kept).sum(1)  # [N, E]
        counts = chosen.sum((0, 1))  # top-k assignments per expert
        self.aux_stats = (counts, probs.sum(0), probs.shape[0])
        frac = counts / (k * probs.shape[0])  # f_i
        aux = self.aux_weight * E * (frac * probs.mean(0)).sum()
        return combine.to(x.dtype), aux

    def _dense(self, x: torch.Tensor, combine: torch.Tensor) -> torch.Tensor:
        if tracing() and self.E <= SPARSE_EXPORT_MAX:
            # one 2-D MatMul per expert: in ONNX each expert's slice of the bank is a
            # constant Gather that the exporter folds into a 2-D initializer, which
            # onnxruntime's int8/int4 quantizers turn into MatMulInteger / MatMulNBits (they
            # skip the batched MatMul of the einsum form: int8 1.7x -> 3.2x, int4 1.15x -> 5x)
            y = x.new_zeros(x.shape)
            for e in range(self.E):
                ye = self._act(x @ self.w_in[e]) @ self.w_out[e]
                y = y + combine[:, e : e + 1] * ye
            return y
        a = torch.einsum("nd,edh->enh", x, self.w_in)
        y = torch.bmm(self._act(a), self.w_out)  # [E, N, d]
        return torch.einsum("ne,end->nd", combine, y)

    def _sparse(self, x: torch.Tensor, combine: torch.Tensor) -> torch.Tensor:
        exporting = tracing(compiling=False)
        out = torch.zeros_like(x)
        for e in range(self.E):
            idx = torch.nonzero(combine[:, e] > 0).squeeze(-1)  # this expert's tokens
            if not exporting and idx.numel() == 0:
                continue  # (in a graph an empty expert is an empty Gather and MatMul)
            xe = x.index_select(0, idx)
            # one 2-D MatMul per expert weight: in ONNX w_in[e] is a constant Gather that the
            # exporter folds into a 2-D initializer, which the int8/int4 quantizers take
            ye = self._act(xe @ self.w_in[e]) @ self.w_out[e]
            gate = combine[:, e].index_select(0, idx)[:, None]
            if exporting:  # NonZero, Gather, MatMul, ScatterND(add) in ONNX
                out = out.index_add(0, idx, ye * gate)
            else:
                out.index_add_(0, idx, ye * gate)
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, d = x.shape
        flat = x.reshape(B * T, d)
        combine, aux = self.route(flat)
        self.aux_loss = aux if self.aux_style == "switch" else None
        self.last_gates = combine.detach()
        mode = self.dispatch
        if mode == "auto":
            # eager and export (up to SPARSE_EXPORT_MAX experts): sparse; torch.compile
            # (data-dependent shapes break its graph) and very many experts: dense
            sparse = not tracing() or (tracing(compiling=False) and self.E <= SPARSE_EXPORT_MAX)
            mode = "sparse" if sparse else "dense"
        y = self._dense(flat, combine) if mode == "dense" else self._sparse(flat, combine)
        return y.reshape(B, T, d)


def _h(p: MoEParams, c: BuildContext) -> int:
    return hidden_size(c.d_model, p.expansion, p.d_ff)


def _params(p: MoEParams, c: BuildContext) -> int:
    d, h, E = c.d_model, _h(p, c), p.n_experts
    n_in = 2 if p.expert_kind == "swiglu" else 1
    return d * E + E * (d * n_in * h + h * d)


def _flops(p: MoEParams, c: BuildContext, L: int) -> float:
    d, h = c.d_model, _h(p, c)
    expert = (6.0 if p.expert_kind == "swiglu" else 4.0) * d * h
    return 2.0 * d * p.n_experts + p.top_k * expert


def _check(p: MoEParams, c: BuildContext) -> None:
    if p.top_k > p.n_experts:
        raise ValueError(f"top_k {p.top_k} exceeds n_experts {p.n_experts}")


register(
    BlockKind(
        name="moe",
        role="channel_mixer",
        params=MoEParams,
        build=lambda p, c: MoE(c.d_model, _h(p, c), p),
        n_params=_params,
        flops=_flops,
        check=_check,
        paper=(
            "Shazeer et al., 2017, 'Outrageously Large Neural Networks'; "
            "Fedus et al., 2022, 'Switch Transformers'"
        ),
        summary="top-k routed mixture of FFN experts, capacity factor, load-balancing loss",
        flops_exact=True,
        extra={"flops_counts": "router + top_k experts (sparse path)"},
    )
)
