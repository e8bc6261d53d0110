"""Lowering: IR -> an ordinary ``torch.nn.Module``.

``compile(spec)`` returns a :class:`CompiledModel`: plain PyTorch (``state_dict``,
optimizers, ``torch.compile`` and ``torch.onnx.export`` all work). Blocks whose weights are
shared (``share_weights``) are stored once and called several times; a tied LM head reads
the embedding matrix. The model refuses to allocate when the cost pass says the parameters
would not fit (``ARCHIR_MAX_PARAMS``, default 2e9).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from archir import registry
from archir.cost import DEFAULT_MAX_PARAMS, max_params  # noqa: F401  (re-exported)
from archir.ir import Graph, Node, build_graph
from archir.spec.models import SpecModel

if TYPE_CHECKING:
    from archir.spec.loader import Spec


class Residual(nn.Module):
    """A block in its residual structure.

    ``pre_norm``: ``x + s·f(norm(x))``; ``post_norm``: ``norm(x + s·f(x))``;
    ``peri_norm``: ``x + s·norm₂(f(norm(x)))``; no residual: ``f(norm(x))``.
    ``[batch, seq, d] -> [batch, seq, d]``.
    """

    def __init__(
        self,
        fn: nn.Module,
        norm: nn.Module | None,
        style: str | None,
        scale: float,
        norm_out: nn.Module | None = None,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.fn = fn
        self.norm = norm if norm is not None else nn.Identity()
        self.norm_out = norm_out
        self.style = style
        self.scale = scale
        self.drop = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        style = self.style
        if style == "pre_norm":
            y = self.drop(self.fn(self.norm(x)))
            return x + y if self.scale == 1.0 else x + self.scale * y
        if style == "post_norm":
            return self.norm(x + self.scale * self.drop(self.fn(x)))
        if style == "peri_norm":
            y = self.fn(self.norm(x))
            if self.norm_out is not None:
                y = self.norm_out(y)
            return x + self.scale * self.drop(y)
        return self.scale * self.fn(self.norm(x)) if self.scale != 1.0 else self.fn(self.norm(x))


class Merge(nn.Module):
    """Combine same-shaped outputs: ``sum``, ``mean`` or learned softmax ``weighted`` average
    (DenseFormer; Pagliardini et al., 2024)."""

    def __init__(self, n: int, mode: str) -> None:
        super().__init__()
        self.mode = mode
        self.logits = nn.Parameter(torch.zeros(n)) if mode == "weighted" else None

    def forward(self, xs: list[torch.Tensor]) -> torch.Tensor:
        if self.logits is not None:
            w = torch.softmax(self.logits, dim=0)
            out = xs[0] * w[0]
            for i in range(1, len(xs)):
                out = out + xs[i] * w[i]
            return out
        out = xs[0]
        for x in xs[1:]:
            out = out + x
        return out / len(xs) if self.mode == "mean" else out


def _build_norm(name: str | None, node: Node) -> nn.Module | None:
    if name is None:
        return None
    k = registry.get(name)
    assert node.ctx is not None
    return k.build(k.params(), node.ctx)


def sum_aux_losses(modules: list[nn.Module]) -> torch.Tensor | None:
    """Sum of the ``aux_loss`` tensors set by ``modules`` in the last forward (None if none)."""
    losses = [m.aux_loss for m in modules if getattr(m, "aux_loss", None) is not None]
    if not losses:
        return None
    total = losses[0]
    for v in losses[1:]:
        total = total + v
    return total


class CompiledModel(nn.Module):
    """The lowered model.

    ``forward(x)``: tokens ``[batch, seq]`` (int64) or images ``[batch, C, H, W]`` ->
    logits ``[batch, seq, vocab]`` (language models) or ``[batch, n_classes]``.
    ``forward_features(x)`` returns the final hidden states ``[batch, seq, d_model]``
    (after the final norm), before the head. ``aux_loss()`` sums auxiliary losses set by
    blocks during the last forward (e.g. MoE load balancing).

    Attributes:
        graph: the IR it was lowered from; ``spec``: the concrete spec model.
    """

    def __init__(self, graph: Graph) -> None:
        super().__init__()
        self.graph = graph
        self.spec = graph.spec
        nodes = list(graph)
        slot = {n.name: i for i, n in enumerate(nodes)}
        self.embed: nn.Module = nn.Identity()
        self.final_norm: nn.Module = nn.Identity()
        self.head: nn.Module = nn.Identity()
        self.blocks = nn.ModuleList()
        self.merges = nn.ModuleList()
        owner_index: dict[str, int] = {}
        # plan entries: (kind, module index, input slots); executed in order, one slot each
        plan: list[tuple[str, int, tuple[int, ...]]] = []
        dropout = graph.spec.model.dropout
        for n in nodes:
            ins = tuple(slot[s] for s in n.inputs)
            assert n.ctx is not None
            if n.op == "embed":
                self.embed = registry.get(n.kind or "").build(n.params, n.ctx)
                plan.append(("embed", 0, ins))
            elif n.op == "merge":
                self.merges.append(Merge(len(n.inputs), n.merge))
                plan.append(("merge", len(self.merges) - 1, ins))
            elif n.op == "block":
                if n.weights_of is not None:
                    idx = owner_index[n.weights_of]
                else:
                    fn = registry.get(n.kind or "").build(n.params, n.ctx)
                    norm = _build_norm(n.norm, n)
                    norm_out = _build_norm(n.norm, n) if n.residual == "peri_norm" else None
                    self.blocks.append(
                        Residual(fn, norm, n.residual, n.residual_scale, norm_out, dropout)
                    )
                    idx = len(self.blocks) - 1
                    owner_index[n.name] = idx
                plan.append(("block", idx, ins))
            elif n.op == "norm":
                self.final_norm = _build_norm(n.kind, n) or nn.Identity()
                plan.append(("norm", 0, ins))
            elif n.op == "head":
                self.head = registry.get(n.kind or "").build(n.params, n.ctx)
                if getattr(n.params, "tie_embeddings", False):
                    self.head.tie(self.embed)  # type: ignore[operator]
                plan.append(("head", 0, ins))
        self._plan = plan
        self._chain = all(
            len(ins) == 1 and ins[0] == i - 1 for i, (_, _, ins) in enumerate(plan) if i > 0
        )
        self._aux_modules = [m for m in self.modules() if getattr(m, "has_aux_loss", False)]

    def _run(self, x: torch.Tensor, stop_before_head: bool) -> torch.Tensor:
        plan = self._plan
        if self._chain:
            h = self.embed(x)
            for op, idx, _ in plan[1:]:
                if op == "block":
                    h = self.blocks[idx](h)
                elif op == "norm":
                    h = self.final_norm(h)
                elif op == "head":
                    return h if stop_before_head else self.head(h)
                else:
                    h = self.merges[idx]([h])
            return h
        vals: list[torch.Tensor] = []
        for op, idx, ins in plan:
            if op == "embed":
                vals.append(self.embed(x))
            elif op == "block":
                vals.append(self.blocks[idx](vals[ins[0]]))
            elif op == "merge":
                vals.append(self.merges[idx]([vals[i] for i in ins]))
            elif op == "norm":
                vals.append(self.final_norm(vals[ins[0]]))
            else:
                if stop_before_head:
                    return vals[ins[0]]
                vals.append(self.head(vals[ins[0]]))
        return vals[-1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._run(x, stop_before_head=False)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self._run(x, stop_before_head=True)

    def aux_loss(self) -> torch.Tensor | None:
        return sum_aux_losses(self._aux_modules)


def compile(spec: Spec | SpecModel, *, seed: int | None = None) -> CompiledModel:  # noqa: A001
    """Lower a concrete spec to a PyTorch module.

    Args:
        spec: a concrete spec (``load_spec(...)`` or ``Spec.fix(...)``).
        seed: when given, ``torch.manual_seed(seed)`` before initializing weights.

    Raises:
        SpecError: the spec is open; GraphError: it does not validate;
        BudgetError: the parameter count exceeds ``ARCHIR_MAX_PARAMS`` (checked by the cost
            pass before any memory is allocated).
    """
    from archir.cost import check_budget

    graph = build_graph(spec)
    check_budget(graph)
    if seed is not None:
        torch.manual_seed(seed)
    return CompiledModel(graph)
