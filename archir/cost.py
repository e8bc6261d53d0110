"""The cost pass: exact parameters, FLOPs per token, inference state and weight bytes.

Units:
    params          trainable parameters; tied and shared weights counted once.
    flops_per_token forward FLOPs per token at sequence length ``seq_len`` (a multiply-add is
                    2 FLOPs; matmul-class operations as counted by ``torch.utils.flop_counter``,
                    plus the scans of state-space mixers, which have no matmul form).
                    In a vision hierarchy (an image model with ``downsample`` layers) a
                    "token" is one of the stem's grid: ``seq_len`` is the stem's token count
                    and ``flops_per_token × seq_len`` is the FLOPs of one image (each stage's
                    nodes counted at their own grid: per-token FLOPs at that grid's length ×
                    that grid's tokens ÷ ``seq_len``).
    state_bytes     inference state per sequence at ``seq_len`` in fp32 (KV caches grow with
                    length, recurrent state does not).
    weight_bytes    parameters × bits / 8 at each node's weight ``bits``.
    weight_bits_avg parameter-weighted mean of the weight bits.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from archir import registry
from archir.errors import BudgetError
from archir.ir import Graph, Node, build_graph
from archir.spec.models import SpecModel

if TYPE_CHECKING:
    from archir.spec.loader import Spec


@dataclass
class NodeCost:
    name: str
    role: str
    kind: str
    shape: str
    params: int
    flops_per_token: float
    state_bytes: int
    weight_bytes: float
    bits: float
    shared_with: str | None = None


@dataclass
class CostReport:
    """Totals and per-node rows of the cost pass (``archir show --json``)."""

    name: str
    seq_len: int
    params: int
    flops_per_token: float
    state_bytes: int
    weight_bytes: float
    weight_bits_avg: float
    blocks: list[NodeCost] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _norm_params(name: str | None, node: Node) -> int:
    if name is None:
        return 0
    k = registry.get(name)
    assert node.ctx is not None
    return k.n_params(k.params(), node.ctx)


def node_cost(node: Node, seq_len: int, tokens: int | None = None) -> NodeCost:
    """Cost of one IR node (weights of a node sharing another's are counted as 0).

    ``tokens``: in a vision hierarchy, the tokens of the node's output grid; its FLOPs and
    state are taken at that length and its FLOPs scaled by ``tokens / seq_len`` (FLOPs per
    token of the stem's grid)."""
    ctx = node.ctx
    assert ctx is not None
    params = 0
    flops = 0.0
    state = 0
    role = node.op
    kind_name = node.kind or node.merge
    if node.op == "merge":
        role = "merge"
        params = len(node.inputs) if node.merge == "weighted" else 0
    else:
        kind = registry.get(node.kind or "")
        role = kind.role
        params = kind.n_params(node.params, ctx)
        n = tokens if tokens is not None else seq_len
        flops = float(kind.flops(node.params, ctx, n))
        if n != seq_len:
            flops = flops * n / seq_len
        state = int(kind.state_bytes(node.params, ctx, n))
        if node.op == "block":
            params += _norm_params(node.norm, node)
            if node.residual == "peri_norm":
                params += _norm_params(node.norm, node)
            elif node.residual == "post_norm" and node.norm is None:
                pass
    if node.weights_of is not None:
        params = 0
    return NodeCost(
        name=node.name,
        role=role,
        kind=kind_name,
        shape=str(node.out) if node.out else "?",
        params=params,
        flops_per_token=flops,
        state_bytes=state,
        weight_bytes=params * node.bits / 8.0,
        bits=node.bits,
        shared_with=node.weights_of,
    )


def analyze_graph(graph: Graph, seq_len: int | None = None) -> CostReport:
    """Run the cost pass over a built graph."""
    m = graph.spec.model
    if seq_len is not None and seq_len < 1:
        raise ValueError(f"seq_len must be >= 1, got {seq_len}")
    L = int(seq_len if seq_len is not None else min(graph.spec.train.seq_len, m.max_seq_len))
    if any(n.op == "downsample" for n in graph):
        # a vision hierarchy: lengths are the grids', FLOPs per token of the stem's grid
        L = _tokens(graph["embed"]) or L
        rows = [node_cost(n, L, None if n.op in ("head", "merge") else _tokens(n)) for n in graph]
    else:
        rows = [node_cost(n, L) for n in graph]
    params = sum(r.params for r in rows)
    bits_w = sum(r.params * r.bits for r in rows)
    return CostReport(
        name=graph.spec.name,
        seq_len=L,
        params=params,
        flops_per_token=sum(r.flops_per_token for r in rows),
        state_bytes=sum(r.state_bytes for r in rows),
        weight_bytes=sum(r.weight_bytes for r in rows),
        weight_bits_avg=(bits_w / params) if params else 0.0,
        blocks=rows,
    )


def _tokens(node: Node) -> int | None:
    """The number of tokens of a node's output ``[batch, tokens, d]`` when it is fixed."""
    shape = node.out.shape if node.out is not None else ()
    return shape[1] if len(shape) == 3 and isinstance(shape[1], int) else None


DEFAULT_MAX_PARAMS = 2e9


def max_params() -> float:
    """The parameter limit: ``ARCHIR_MAX_PARAMS`` (default 2e9)."""
    try:
        return float(os.environ.get("ARCHIR_MAX_PARAMS", DEFAULT_MAX_PARAMS))
    except ValueError:
        return DEFAULT_MAX_PARAMS


def check_budget(graph: Graph, report: CostReport | None = None) -> CostReport:
    """Refuse a graph whose parameter count exceeds :func:`max_params` (no memory allocated).

    Returns:
        the cost report (computed when not given).

    Raises:
        BudgetError: located at the largest node, with the total and the limit.
    """
    report = report or analyze_graph(graph)
    limit = max_params()
    if report.params > limit:
        biggest = max(report.blocks, key=lambda r: r.params)
        raise BudgetError(
            f"the model would have {report.params:.3g} parameters "
            f"({report.params * 4 / 2**30:.1f} GiB in fp32), over the limit of {limit:.3g}; "
            f"largest node {biggest.name} ({biggest.params:.3g})",
            graph.locate(graph[biggest.name]),
            "reduce d_model, vocab_size or depth (or raise ARCHIR_MAX_PARAMS)",
        )
    return report


def analyze(spec: Spec | SpecModel, seq_len: int | None = None) -> CostReport:
    """Cost report of a concrete spec (the numbers ``archir show --json`` prints).

    Args:
        spec: a concrete :class:`Spec` or :class:`SpecModel`.
        seq_len: sequence length for FLOPs and state (default: ``train.seq_len``; a vision
            hierarchy always uses its grids, see the module docstring).

    Raises:
        SpecError: the spec is open; GraphError: the graph does not validate.
    """
    return analyze_graph(build_graph(spec), seq_len)
