"""Lowering: IR -> an ordinary ``torch.nn.Module``.

``compile(spec)`` returns a :class:`CompiledModel`: plain PyTorch (``state_dict``,
optimizers, ``torch.compile`` and ``torch.onnx.export`` all work). Blocks whose weights are
shared (``share_weights``) are stored once and called several times; a tied LM head reads
the embedding matrix. The model refuses to allocate when the cost pass says the parameters
would not fit (``ARCHIR_MAX_PARAMS``, default 2e9).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
from torch import nn

from archir import registry
from archir.blocks.common import tracing
from archir.cost import DEFAULT_MAX_PARAMS, max_params  # noqa: F401  (re-exported)
from archir.ir import Graph, Node, build_graph, norm_params
from archir.spec.models import SpecModel

if TYPE_CHECKING:
    from archir.spec.loader import Spec

#: a block's decoding state: its tensors (``()`` for a block that keeps none)
_State = tuple[torch.Tensor, ...]


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

    def _around(
        self, x: torch.Tensor, f: Callable[[torch.Tensor], tuple[torch.Tensor, _State]]
    ) -> tuple[torch.Tensor, _State]:
        """The residual structure around ``f`` (the block's function, returning its output
        and state): shared by ``forward`` and ``step``."""
        style = self.style
        if style == "pre_norm":
            y, st = f(self.norm(x))
            y = self.drop(y)
            return (x + y if self.scale == 1.0 else x + self.scale * y), st
        if style == "post_norm":
            y, st = f(x)
            return self.norm(x + self.scale * self.drop(y)), st
        if style == "peri_norm":
            y, st = f(self.norm(x))
            if self.norm_out is not None:
                y = self.norm_out(y)
            return x + self.scale * self.drop(y), st
        y, st = f(self.norm(x))
        return (self.scale * y if self.scale != 1.0 else y), st

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._around(x, lambda h: (self.fn(h), ()))[0]

    def init_state(
        self, batch: int, device: torch.device | None = None, dtype: torch.dtype | None = None
    ) -> _State:
        """The block's decoding state (``()`` for a per-token block such as an MLP)."""
        if hasattr(self.fn, "init_state"):
            return tuple(self.fn.init_state(batch, device=device, dtype=dtype))
        return ()

    def step(self, x: torch.Tensor, state: _State) -> tuple[torch.Tensor, _State]:
        """One token through the block: ``x [batch, 1, d] -> [batch, 1, d]`` and the new
        state; the same arithmetic as ``forward`` on that position (eval mode)."""

        def f(h: torch.Tensor) -> tuple[torch.Tensor, _State]:
            if hasattr(self.fn, "step"):
                y, st = self.fn.step(h[:, 0], state)
                return y[:, None], tuple(st)
            return self.fn(h), state

        return self._around(x, f)


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
    return k.build(norm_params(name, node.ctx.norm_eps), node.ctx)


def sum_aux_losses(modules: list[nn.Module]) -> torch.Tensor | None:
    """Sum of the ``aux_loss`` tensors set by ``modules`` in the last forward, plus one pooled
    term per group of MoE layers with ``aux_loss_style: mixtral`` (same ``n_experts`` and
    weight; see :mod:`archir.blocks.moe`). None if there is none."""
    losses = [m.aux_loss for m in modules if getattr(m, "aux_loss", None) is not None]
    pooled: dict[tuple[int, float], list[nn.Module]] = {}
    for m in modules:
        if getattr(m, "aux_style", None) == "mixtral" and m.aux_stats is not None:
            pooled.setdefault((m.E, m.aux_weight), []).append(m)
    for (E, weight), group in pooled.items():
        stats = [m.aux_stats for m in group]
        counts = torch.stack([s[0] for s in stats]).sum(0)
        probs = torch.stack([s[1] for s in stats]).sum(0)
        rows = 0.0
        for st in stats:
            rows += float(st[2])
        losses.append(weight * E * ((counts / rows) * (probs / rows)).sum())
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
    (after the final norm), before the head; in a vision hierarchy ``[batch, H·W, d]`` at
    the last stage's grid and width (``downsamples`` holds the layers between stages). ``aux_loss()`` sums auxiliary losses set by
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
        #: downsampling layers between the stages of a vision hierarchy (none elsewhere)
        self.downsamples = nn.ModuleList()
        owner_index: dict[str, int] = {}
        self._block_of: dict[str, int] = {}  # node name -> index into self.blocks
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
            elif n.op == "downsample":
                self.downsamples.append(registry.get(n.kind or "").build(n.params, n.ctx))
                plan.append(("downsample", len(self.downsamples) - 1, ins))
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
                self._block_of[n.name] = idx
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
        limits = [
            int(m.decode_limit)
            for m in self.modules()
            if getattr(m, "decode_limit", None) is not None
        ]
        #: the longest sequence a block can take (learned positions, token_mlp, hyena end at
        #: max_seq_len), None when nothing limits it
        self.seq_limit: int | None = min(limits) if limits else None

    def _run(self, x: torch.Tensor, stop_before_head: bool) -> torch.Tensor:
        plan = self._plan
        if (
            self.seq_limit is not None
            and x.dim() == 2
            and not tracing()
            and x.shape[1] > self.seq_limit
        ):
            raise ValueError(
                f"input 'tokens' has {x.shape[1]} positions, past max_seq_len {self.seq_limit} "
                f"of '{self.spec.name}' (learned positions, token_mlp or hyena end there)"
            )
        if self._chain:
            h = self.embed(x)
            for op, idx, _ in plan[1:]:
                if op == "block":
                    h = self.blocks[idx](h)
                elif op == "norm":
                    h = self.final_norm(h)
                elif op == "head":
                    return h if stop_before_head else self.head(h)
                elif op == "downsample":
                    h = self.downsamples[idx](h)
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
            elif op == "downsample":
                vals.append(self.downsamples[idx](vals[ins[0]]))
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

    # ------------------------------------------------------------------ decoding

    def check_decodable(self) -> None:
        """Raise :class:`~archir.errors.DecodeError` unless this is a causal language model
        whose every block can go one token at a time (its token mixers causal; a mixer
        without a step form is stepped per token only when it is a channel mixer or norm)."""
        from archir.errors import DecodeError

        m = self.spec.model
        if m.task != "causal_lm" or not isinstance(self.embed, _token_embedding()):
            raise DecodeError(
                f"'{self.spec.name}' is a {m.task} model: only a causal language model "
                "(model.task: causal_lm) decodes token by token"
            )
        for n in self.graph:
            if n.op != "block" or n.weights_of is not None:
                continue
            kind = registry.get(n.kind or "")
            fn = self.blocks[self._block_of[n.name]].fn
            if kind.role == "token_mixer" and not hasattr(fn, "step"):
                raise DecodeError(f"block '{n.name}' ({n.kind}) has no step form and cannot decode")
            if hasattr(fn, "causal") and not fn.causal:
                raise DecodeError(
                    f"block '{n.name}' ({n.kind}) is bidirectional: it reads later tokens, so "
                    "the model cannot decode one token at a time",
                    hint="set causal: true on it (or remove causal: false)",
                )

    def init_state(
        self, batch: int, device: torch.device | None = None, dtype: torch.dtype | None = None
    ) -> list[tuple[torch.Tensor, ...]]:
        """The decoding state before the first token: one tuple of tensors per step of the
        plan (the embedding's position, each block call's cache or recurrent state — a
        block whose weights are shared gets one state per call; ``()`` where nothing is
        kept). ``dtype``: of the floating-point states (default float32).

        Raises:
            DecodeError: :meth:`check_decodable`.
        """
        self.check_decodable()
        dev = device if device is not None else self.embed.weight.device
        out: list[tuple[torch.Tensor, ...]] = []
        for op, idx, _ in self._plan:
            if op == "embed":
                out.append(tuple(self.embed.init_state(batch, device=dev, dtype=dtype)))
            elif op == "block":
                out.append(self.blocks[idx].init_state(batch, device=dev, dtype=dtype))
            else:
                out.append(())
        return out

    def step(
        self, tokens: torch.Tensor, state: list[tuple[torch.Tensor, ...]]
    ) -> tuple[torch.Tensor, list[tuple[torch.Tensor, ...]]]:
        """Decode one token per sequence: ``tokens [batch]`` (int64) at the position the
        state has reached -> logits ``[batch, vocab]`` for the next token, and the new state.
        Feeding a sequence token by token reproduces ``forward``'s logits at every position
        (call it in eval mode, as inference does: an MoE drops no token there).

        Raises:
            ValueError: a block that cannot go past ``max_seq_len`` was asked to (eager).
        """
        new: list[tuple[torch.Tensor, ...]] = []
        vals: list[torch.Tensor] = []
        for (op, idx, ins), st in zip(self._plan, state):
            if op == "embed":
                e, s2 = self.embed.step(tokens, st)
                vals.append(e[:, None])
                new.append(tuple(s2))
                continue
            if op == "block":
                y, s2 = self.blocks[idx].step(vals[ins[0]], st)
                new.append(s2)
            elif op == "merge":
                y = self.merges[idx]([vals[i] for i in ins])
                new.append(st)
            elif op == "norm":
                y = self.final_norm(vals[ins[0]])
                new.append(st)
            else:
                y = self.head(vals[ins[0]])
                new.append(st)
            vals.append(y)
        return vals[-1][:, 0], new


def _token_embedding() -> type:
    from archir.blocks.embed import TokenEmbedding

    return TokenEmbedding


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
