"""A one-shot supernet built from an open spec (DARTS / GDAS / SPOS; DESIGN.md §7).

``build_supernet(spec)`` turns the open decisions of a spec into one trainable network in
which every candidate architecture is a path:

* **Block decisions** — every search node written inside a block of a layer group
  (``kind: {choice: [attention, mamba]}``, ``expansion: {choice: [2, 4]}``,
  ``n_heads: {choice: [2, 4]}``, ``bits: {choice: [16, 8, 4]}``, nodes nested in a chosen
  option ...). Each block position becomes a :class:`MixedBlock` whose candidates are the
  block's concrete configurations (the product of its decisions, conditional nodes only
  under the option that holds them). Each candidate is built by the compiler's own rules
  from the IR of the spec fixed at that configuration (``spec.fix`` -> ``build_graph`` ->
  ``registry.get(kind).build(params, ctx)`` inside the compiler's ``Residual``), so no
  supernet is written by hand. One architecture weight vector ``alpha`` exists per decision
  *name* (tied nodes share it); a candidate's weight is the product of the probabilities of
  the decision values it uses, so the weights of one block sum to 1.
* **Weight sharing by slicing** — candidates of the same kind whose parameters have the same
  names and fit, dimension by dimension, inside the largest such candidate do not own
  weights: they run with leading slices of the largest one's tensors
  (``W[:h, :d]``; e.g. ``expansion`` 2 uses the first half of the rows of the expansion-4
  ``fc1``). Head counts change no shape, so they share the whole matrices.
* **Bits** — a candidate with weight ``bits < 16`` runs with its block function's matrices
  fake-quantized (``archir.quant.quantize_tensor``) with a straight-through estimator
  ``w + (q(w) - w).detach()``: mixed-precision branches of the same weights (Wu et al.,
  2018, "Mixed Precision Quantization of ConvNets via Differentiable Neural Architecture
  Search").
* **Depth decisions** — ``repeat: {int: [lo, hi]}`` / ``{choice: [...]}`` on a sequential
  layer group builds ``hi`` layers; layer ``r >= lo`` is gated,
  ``y = g·f(x) + (1 - g)·x`` with ``g = P(repeat > r)`` (soft) or a sampled 0/1 gate
  (hard): the optional layers have an identity candidate.
* **Held decisions** — every other node (``d_model``, ``vocab_size``, group-level
  ``residual``/``share_weights``, ``train.lr`` ...) changes tensors that all candidates share
  and is **not searched**: it is held at one value while the supernet trains and every
  discrete architecture keeps that value. The value is the one given in
  ``build_supernet(spec, held={name: value})`` (``run_search(..., held=...)``), else the
  first option of a choice, the low end of an int range or the middle of a float range.
  ``SuperNet.held`` lists them (the one-shot searchers print and record them). To search such a
  decision, run one one-shot search per value, or use a trial-based searcher.
  Float nodes inside blocks are searched over a 4-point grid.

Paths. ``set_path(...)`` selects how the next forward mixes candidates: ``soft`` (DARTS:
every candidate weighted by its probability), ``hard`` (GDAS / SPOS: exactly one candidate
per block runs, with a straight-through one-hot weight that carries the gradient to
``alpha`` when one is given) or a fixed architecture (inherited-weight evaluation).

Limits. Every candidate of a soft forward is computed (cost grows with the number of
configurations per block; a block with more than :data:`MAX_CONFIGS` is refused). Depth
choices on ``residual: parallel`` groups gate the layer's merge. Held decisions are not
searched by the supernet. Sliced candidates share the leading channels of the largest one
(channel order is arbitrary, so this is the usual "weight entanglement" assumption).

Costs. :meth:`SuperNet.expected_costs` gives differentiable expectations of ``params``,
``flops_per_token``, ``state_bytes``, ``weight_bytes`` and ``weight_bits_avg`` under the
architecture distribution, from the exact per-candidate rows of ``archir.cost.node_cost``
(the registry's cost rules) — the hardware-aware loss of :mod:`searchers.archloss`.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.func import functional_call

from archir import registry
from archir.compiler import Merge, Residual, sum_aux_losses
from archir.cost import NodeCost, node_cost
from archir.errors import SearchError
from archir.ir import Graph, Node, build_graph
from archir.spec.loader import Spec
from archir.spec.space import SearchNode

MAX_CONFIGS = 64
MAX_VALUES = 32
FLOAT_GRID = 4
COST_KEYS = ("params", "flops_per_token", "state_bytes", "weight_bytes", "bits_x_params")


# -- decisions ---------------------------------------------------------------------------
@dataclass
class Decision:
    """One searched decision (all nodes of one name).

    Attributes:
        name: decision name (tie name or field path).
        category: ``"block"`` (inside blocks), ``"depth"`` (a group's ``repeat``) or
            ``"held"`` (not searched by the supernet; held at ``reference``).
        values: decision values as ``Spec.fix`` accepts them (option, option index, number).
        labels: readable names of the values.
        node: the first node of this name.
        reference: the value used while the supernet trains for held decisions.
    """

    name: str
    category: str
    values: list[Any]
    labels: list[str]
    node: SearchNode
    reference: Any = None
    param_free: list[bool] = field(default_factory=list)

    def index(self, value: Any) -> int:
        for i, v in enumerate(self.values):
            if v == value and type(v) is type(value) or v == value:
                return i
        raise KeyError(value)


def _label(opt: Any) -> str:
    if isinstance(opt, dict):
        kind = opt.get("kind")
        rest = {
            k: v for k, v in opt.items() if k != "kind" and isinstance(v, bool | int | float | str)
        }
        return f"{kind}{rest}" if kind and rest else str(kind or opt)
    return str(opt)


def _values(node: SearchNode) -> tuple[list[Any], list[str]]:
    """The values the supernet searches for ``node`` and their labels: every option, every
    step of an int range, :data:`FLOAT_GRID` points of a float range.

    Raises:
        SearchError: an int range with more than :data:`MAX_VALUES` steps.
    """
    allowed = node.allowed()
    if node.type == "choice" and not node.scalar_options:
        return list(allowed or ()), [_label(o) for o in node.options or ()]
    if allowed is not None:
        if node.type == "int" and len(allowed) > MAX_VALUES:
            raise SearchError(
                f"'{node.name}' has {len(allowed)} values; a one-shot supernet takes at most "
                f"{MAX_VALUES} per decision",
                hint="add a 'step' or narrow the range, or use --searcher tpe",
            )
        return list(allowed), [str(v) for v in allowed]
    assert node.low is not None and node.high is not None
    lo, hi = float(node.low), float(node.high)
    if node.log:
        fvals = [lo * (hi / lo) ** (i / (FLOAT_GRID - 1)) for i in range(FLOAT_GRID)]
    else:
        fvals = [lo + (hi - lo) * i / (FLOAT_GRID - 1) for i in range(FLOAT_GRID)]
    return fvals, [f"{v:.4g}" for v in fvals]


def _held_reference(node: SearchNode) -> Any:
    """A held decision's default: the first option, the low end of an int range, the middle
    of a float range (geometric on a log scale)."""
    allowed = node.allowed()
    if allowed is not None:
        return allowed[0]
    assert node.low is not None and node.high is not None
    if node.log:
        return math.sqrt(float(node.low) * float(node.high))
    return (float(node.low) + float(node.high)) / 2


def _block_pos(path: tuple[Any, ...]) -> tuple[int, int] | None:
    if len(path) >= 5 and path[0] == "model" and path[1] == "layers" and path[3] == "blocks":
        return int(path[2]), int(path[4])
    return None


def _held_value(node: SearchNode, value: Any) -> Any:
    """A user's value for a held decision, as ``Spec.fix`` takes it.

    Raises:
        SearchError: the value is not one of the node's options / outside its range.
    """
    if node.type == "choice":
        opts = list(node.options or ())
        if node.scalar_options:
            for o in opts:
                if o == value and type(o) is type(value):
                    return o
            for o in opts:
                if o == value:
                    return o
            raise SearchError(
                f"held value {value!r} for '{node.name}' is not one of its options {opts}"
            )
        if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < len(opts):
            return value
        raise SearchError(
            f"held value {value!r} for '{node.name}': give the option index 0..{len(opts) - 1}",
            hint="options: " + ", ".join(f"{i}: {_label(o)}" for i, o in enumerate(opts)),
        )
    assert node.low is not None and node.high is not None
    if not isinstance(value, int | float) or isinstance(value, bool):
        raise SearchError(f"held value {value!r} for '{node.name}' is not a number")
    if not float(node.low) <= float(value) <= float(node.high):
        raise SearchError(
            f"held value {value!r} for '{node.name}' is outside [{node.low}, {node.high}]"
        )
    if node.type == "int":
        step = int(node.step or 1)
        if int(value) != value or (int(value) - int(node.low)) % step:
            raise SearchError(
                f"held value {value!r} for '{node.name}' is not on its int grid "
                f"({node.low}..{node.high} step {step})"
            )
        return int(value)
    return float(value)


def classify(nodes: list[SearchNode], held: Mapping[str, Any] | None = None) -> dict[str, Decision]:
    """Decisions of a spec by name, each classified as block, depth or held.

    Args:
        nodes: the spec's search nodes.
        held: values for held decisions (decision name -> option value / option index for
            non-scalar choices / number); others take their default reference value.

    Raises:
        SearchError: ``held`` names a decision that does not exist or that the supernet
            searches, or gives a value the node does not allow.
    """
    by_name: dict[str, list[SearchNode]] = {}
    for n in nodes:
        by_name.setdefault(n.name, []).append(n)
    out: dict[str, Decision] = {}
    for name, group in by_name.items():
        cats = set()
        for n in group:
            p = n.path
            if len(p) == 4 and p[:2] == ("model", "layers") and p[3] == "repeat":
                cats.add("depth")
            elif _block_pos(p) is not None:
                cats.add("block")
            else:
                cats.add("held")
        cat = cats.pop() if len(cats) == 1 else "held"
        node = group[0]
        if cat == "held":
            ref = _held_reference(node)
            vals, labels = [ref], [str(ref)]
        else:
            vals, labels = _values(node)
            ref = vals[-1] if cat == "depth" else vals[0]
        if cat == "depth" and not all(isinstance(v, int) for v in vals):
            cat, vals, labels, ref = "held", [vals[-1]], [str(vals[-1])], vals[-1]
        out[name] = Decision(name, cat, vals, labels, node, ref)
    held_names = sorted(n for n, d in out.items() if d.category == "held")
    for name, value in (held or {}).items():
        d = out.get(name)
        if d is None:
            raise SearchError(
                f"held decision '{name}' is not a search node of the spec",
                hint="held decisions: " + (", ".join(held_names) or "none"),
            )
        if d.category != "held":
            raise SearchError(
                f"'{name}' is searched by the supernet ({d.category} decision); only held "
                "decisions can be set",
                hint="held decisions: " + (", ".join(held_names) or "none"),
            )
        v = _held_value(d.node, value)
        d.reference, d.values, d.labels = v, [v], [str(v)]
    return out


def held_options(d: Decision) -> str:
    """The values a held decision allows, for messages (``choice [64, 96]``,
    ``int [1, 4]``)."""
    node = d.node
    if node.type == "choice" and not node.scalar_options:
        return "option index: " + ", ".join(
            f"{i}={_label(o)}" for i, o in enumerate(node.options or ())
        )
    return node.describe()


# -- straight-through fake quantization --------------------------------------------------
def fake_quant_ste(w: torch.Tensor, bits: float) -> torch.Tensor:
    """``w`` fake-quantized at ``bits`` in the forward pass, identity in the backward pass
    (straight-through estimator; Bengio et al., 2013). Uses ``archir.quant`` schemes."""
    if float(bits) >= 16:
        return w
    from archir.quant import quantize_tensor

    return w + (quantize_tensor(w, bits) - w).detach()


# -- modules -----------------------------------------------------------------------------
@dataclass
class Candidate:
    """One configuration of one block position: its decisions, IR node and cost row."""

    decisions: dict[str, int]  # decision name -> value index
    node: Node
    cost: NodeCost
    fn_params: int
    bits: float
    anchor: int = -1  # index of the candidate whose weights it uses (itself if owner)
    shapes: dict[str, torch.Size] = field(default_factory=dict)


def _residual(n: Node, dropout: float) -> Residual:
    assert n.ctx is not None
    fn = registry.get(n.kind or "").build(n.params, n.ctx)

    def norm() -> nn.Module | None:
        if n.norm is None:
            return None
        k = registry.get(n.norm)
        assert n.ctx is not None
        return k.build(k.params(), n.ctx)

    norm_out = norm() if n.residual == "peri_norm" else None
    return Residual(fn, norm(), n.residual, n.residual_scale, norm_out, dropout)


class PathState:
    """How the next forward chooses: per decision a weight vector and, for hard paths, the
    sampled index."""

    def __init__(self, weights: list[torch.Tensor], hard: list[int] | None) -> None:
        self.weights = weights
        self.hard = hard


class MixedBlock(nn.Module):
    """One block position holding every candidate configuration.

    ``forward(x [B, T, d], state) -> [B, T, d]``: soft paths return
    ``Σ_c w_c · block_c(x)`` (``w_c`` the product of its decisions' probabilities); hard
    paths run the one candidate whose decisions match the sample, times its (straight-
    through) weight.
    """

    def __init__(self, cands: list[Candidate], index: dict[str, int], dropout: float) -> None:
        super().__init__()
        self.cands = cands
        self.dec_index = index  # decision name -> position in the supernet's decision list
        self.mods = nn.ModuleList([_residual(c.node, dropout) for c in cands])
        self._share()

    def _share(self) -> None:
        anchors: list[int] = []
        order = sorted(
            range(len(self.cands)),
            key=lambda i: -sum(p.numel() for p in self.mods[i].parameters()),
        )
        for i in order:
            c = self.cands[i]
            mine = dict(self.mods[i].named_parameters())
            c.shapes = {k: v.shape for k, v in mine.items()}
            for a in anchors:
                ca = self.cands[a]
                if ca.node.kind != c.node.kind or set(ca.shapes) != set(c.shapes):
                    continue
                if all(
                    len(ca.shapes[k]) == len(s) and all(x <= y for x, y in zip(s, ca.shapes[k]))
                    for k, s in c.shapes.items()
                ):
                    c.anchor = a
                    break
            if c.anchor < 0:
                c.anchor = i
                anchors.append(i)
            else:  # free the candidate's own copies: it runs on slices of the anchor's
                for name in c.shapes:
                    mod = self.mods[i].get_submodule(name.rpartition(".")[0])
                    leaf = name.rpartition(".")[2]
                    mod._parameters[leaf] = nn.Parameter(torch.empty(0), requires_grad=False)

    @property
    def n_owners(self) -> int:
        return sum(1 for i, c in enumerate(self.cands) if c.anchor == i)

    def run(self, i: int, x: torch.Tensor) -> torch.Tensor:
        c = self.cands[i]
        mod = self.mods[i]
        if c.anchor == i and c.bits >= 16:
            return mod(x)
        src = dict(self.mods[c.anchor].named_parameters())
        params: dict[str, torch.Tensor] = {}
        for name, shape in c.shapes.items():
            p: torch.Tensor = src[name]
            if p.shape != shape:
                p = p[tuple(slice(0, s) for s in shape)]
            if c.bits < 16 and p.dim() >= 2 and name.startswith("fn."):
                p = fake_quant_ste(p, c.bits)
            params[name] = p
        return functional_call(mod, params, (x,), strict=False)

    def weight(self, i: int, state: PathState) -> torch.Tensor | None:
        w: torch.Tensor | None = None
        for d, vi in self.cands[i].decisions.items():
            f = state.weights[self.dec_index[d]][vi]
            w = f if w is None else w * f
        return w

    def active(self, state: PathState) -> int:
        assert state.hard is not None
        for i, c in enumerate(self.cands):
            if all(state.hard[self.dec_index[d]] == vi for d, vi in c.decisions.items()):
                return i
        raise RuntimeError("no candidate matches the sampled path")  # pragma: no cover

    def forward(self, x: torch.Tensor, state: PathState) -> torch.Tensor:
        if state.hard is not None:
            i = self.active(state)
            y = self.run(i, x)
            w = self.weight(i, state)
            return y if w is None else y * w
        out: torch.Tensor | None = None
        for i in range(len(self.cands)):
            w = self.weight(i, state)
            y = self.run(i, x)
            y = y if w is None else y * w
            out = y if out is None else out + y
        assert out is not None
        return out


@dataclass
class _Op:
    op: str  # embed | block | merge | norm | head
    module: int  # index into blocks / merges
    ins: tuple[int, ...]
    gate: tuple[int, int] | None = None  # (depth decision index, repeat position r)
    node: str = ""


class SuperNet(nn.Module):
    """The supernet of an open spec (see the module docstring).

    ``forward(x)``: tokens ``[batch, seq]`` -> logits, like ``CompiledModel``, along the path
    set by :meth:`set_path`. ``forward_features`` stops before the head.

    Attributes:
        decisions: searched decisions (block and depth), in ``alphas`` order.
        held: held decisions with their reference values.
        alphas: architecture logits, one vector per searched decision.
        spec: the reference concrete spec model (all held values, maximal depth).
    """

    def __init__(
        self,
        spec: Spec,
        *,
        seq_len: int | None = None,
        dropout: float = 0.0,
        held: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__()
        table = classify(spec.nodes, held)
        self.held_by_user = sorted(held or {})
        self.open_spec = spec
        self.decisions = [d for d in table.values() if d.category != "held"]
        self.held = {d.name: d.reference for d in table.values() if d.category == "held"}
        self._all = table
        index = {d.name: i for i, d in enumerate(self.decisions)}
        self.alphas = nn.ParameterList(
            [nn.Parameter(torch.zeros(len(d.values))) for d in self.decisions]
        )
        ref = self.reference_spec()
        self.ref_spec = ref
        self.spec = ref.model
        graph = build_graph(ref)
        down = [n.name for n in graph if n.op == "downsample"]
        if down:
            raise SearchError(
                f"a one-shot supernet cannot hold a vision hierarchy (stages with a "
                f"downsample: {', '.join(down)})",
                hint="search it with --searcher tpe, nsga2, random, gp or evolution",
            )
        self.graph = graph
        L = int(seq_len or min(ref.model.train.seq_len, ref.model.model.max_seq_len))
        self.seq_len = L
        m = ref.model.model
        dropout = dropout or m.dropout

        # which depth decision and repeat position every layer index has
        layer_info: dict[int, tuple[int, int, int]] = {}  # layer -> (group, rep, depth idx)
        layer = 0
        for gi, group in enumerate(ref.model.model.layers):
            dpath = ("model", "layers", gi, "repeat")
            ddec = next(
                (
                    index[d.name]
                    for d in self.decisions
                    if d.category == "depth"
                    and any(n.path == dpath for n in spec.nodes if n.name == d.name)
                ),
                -1,
            )
            for rep in range(group.repeat):
                layer_info[layer] = (gi, rep, ddec)
                layer += 1

        # candidates per block position (group, block), from the spec fixed per configuration
        configs: dict[tuple[int, int], list[tuple[dict[str, int], Graph]]] = {}
        for gi, group in enumerate(ref.model.model.layers):
            for bi in range(len(group.blocks)):
                configs[(gi, bi)] = self._configs(gi, bi, index)

        self.embed: nn.Module = nn.Identity()
        self.final_norm: nn.Module = nn.Identity()
        self.head: nn.Module = nn.Identity()
        self.blocks = nn.ModuleList()
        self.merges = nn.ModuleList()
        self._plan: list[_Op] = []
        self._const: dict[str, float] = dict.fromkeys(COST_KEYS, 0.0)
        self._block_rows: list[tuple[int, tuple[int, int] | None, list[NodeCost]]] = []
        # per block row: the IR node name and each candidate's configuration graph (for
        # per-candidate quantities other than the cost rows, e.g. predicted latency)
        self._block_nodes: list[str] = []
        self._block_graphs: list[list[Graph]] = []
        owner: dict[str, int] = {}
        slot: dict[str, int] = {}
        for n in graph:
            ins = tuple(slot[s] for s in n.inputs)
            slot[n.name] = len(slot)
            assert n.ctx is not None
            if n.op == "block":
                lay = int(n.name.split(".")[1])
                bi = int(n.name.split(".")[3])
                gi, rep, ddec = layer_info[lay]
                gate = None
                parallel = ref.model.model.layers[gi].residual == "parallel"
                if ddec >= 0 and not parallel and rep >= min(self.decisions[ddec].values):
                    gate = (ddec, rep)
                cands = []
                for decs, g in configs[(gi, bi)]:
                    cn = g[n.name]
                    kind = registry.get(cn.kind or "")
                    assert cn.ctx is not None
                    cands.append(
                        Candidate(
                            decs,
                            cn,
                            node_cost(cn, L),
                            kind.n_params(cn.params, cn.ctx),
                            cn.bits,
                        )
                    )
                if n.weights_of is not None:
                    idx = owner[n.weights_of]
                else:
                    self.blocks.append(MixedBlock(cands, index, dropout))
                    idx = len(self.blocks) - 1
                    owner[n.name] = idx
                self._plan.append(_Op("block", idx, ins, gate, n.name))
                self._block_rows.append((idx, gate, [c.cost for c in cands]))
                self._block_nodes.append(n.name)
                self._block_graphs.append([g for _, g in configs[(gi, bi)]])
                self._block_decs = None
                continue
            row = node_cost(n, L)
            self._add_const(row)
            if n.op == "embed":
                self.embed = registry.get(n.kind or "").build(n.params, n.ctx)
                self._plan.append(_Op("embed", 0, ins, None, n.name))
            elif n.op == "merge":
                self.merges.append(Merge(len(n.inputs), n.merge))
                gate = None
                if n.name.endswith(".parallel"):
                    gi, rep, ddec = layer_info[int(n.name.split(".")[1])]
                    if ddec >= 0 and rep >= min(self.decisions[ddec].values):
                        gate = (ddec, rep)
                self._plan.append(_Op("merge", len(self.merges) - 1, ins, gate, n.name))
            elif n.op == "norm":
                k = registry.get(n.kind or "")
                self.final_norm = k.build(k.params(), n.ctx)
                self._plan.append(_Op("norm", 0, ins, None, n.name))
            elif n.op == "head":
                self.head = registry.get(n.kind or "").build(n.params, n.ctx)
                if getattr(n.params, "tie_embeddings", False):
                    self.head.tie(self.embed)  # type: ignore[operator]
                self._plan.append(_Op("head", 0, ins, None, n.name))
        self._aux_modules = [m for m in self.modules() if getattr(m, "has_aux_loss", False)]
        self._param_free()
        self.set_path("soft")

    # -- construction helpers --------------------------------------------------------------
    def _decider(self, chosen: Mapping[str, Any]) -> Callable[[SearchNode], Any]:
        table = self._all

        def decide(node: SearchNode) -> Any:
            if node.name in chosen:
                return chosen[node.name]
            d = table.get(node.name)
            if d is None:  # pragma: no cover - every node is classified
                return _held_reference(node)
            return d.reference

        return decide

    def reference_spec(self) -> Spec:
        """The spec with held values, maximal depths and the first value of block decisions."""
        return self.open_spec.fix(self._decider({}))

    def _configs(
        self, gi: int, bi: int, index: dict[str, int]
    ) -> list[tuple[dict[str, int], Graph]]:
        """Every configuration of block ``(gi, bi)``: ``(decision indices, graph)``."""
        local = {
            n.name
            for n in self.open_spec.nodes
            if _block_pos(n.path) == (gi, bi) and n.name in index
        }
        out: list[tuple[dict[str, int], Graph]] = []

        def rec(prefix: dict[str, int]) -> None:
            new: list[str] = []
            base = self._decider({})

            def decide(node: SearchNode) -> Any:
                if node.name in prefix:
                    return self.decisions[index[node.name]].values[prefix[node.name]]
                if node.name in local:
                    new.append(node.name)
                return base(node)

            fixed = self.open_spec.fix(decide)
            if new:
                d = self.decisions[index[new[0]]]
                for vi in range(len(d.values)):
                    rec({**prefix, new[0]: vi})
                return
            out.append((prefix, build_graph(fixed)))
            if len(out) > MAX_CONFIGS:
                raise SearchError(
                    f"block layers.{gi}.blocks.{bi} has more than {MAX_CONFIGS} configurations;"
                    " a one-shot supernet would compute them all",
                    hint="narrow the block's choices, or use --searcher tpe",
                )

        rec({})
        return out

    def _add_const(self, row: NodeCost) -> None:
        self._const["params"] += row.params
        self._const["flops_per_token"] += row.flops_per_token
        self._const["state_bytes"] += row.state_bytes
        self._const["weight_bytes"] += row.weight_bytes
        self._const["bits_x_params"] += row.params * row.bits

    def _param_free(self) -> None:
        """Mark decision values whose every candidate has a parameter-free block function."""
        for di, d in enumerate(self.decisions):
            if d.category == "depth":
                d.param_free = [False] * len(d.values)
                continue
            free = [True] * len(d.values)
            seen = [False] * len(d.values)
            for mb in self.blocks:
                assert isinstance(mb, MixedBlock)
                for c in mb.cands:
                    vi = c.decisions.get(d.name)
                    if vi is None:
                        continue
                    seen[vi] = True
                    if c.fn_params > 0:
                        free[vi] = False
            d.param_free = [f and s for f, s in zip(free, seen)]
            del di

    # -- paths -----------------------------------------------------------------------------
    def probs(self, tau: float = 1.0) -> list[torch.Tensor]:
        """``softmax(alpha / tau)`` per decision."""
        return [torch.softmax(a / tau, dim=0) for a in self.alphas]

    def set_path(
        self,
        mode: str,
        *,
        tau: float = 1.0,
        arch: Mapping[str, int] | None = None,
        grad: bool = True,
        gen: torch.Generator | None = None,
    ) -> list[int] | None:
        """Choose how the next forward mixes candidates.

        Args:
            mode: ``soft`` (DARTS softmax), ``gumbel`` (hard Gumbel-softmax sample with a
                straight-through weight; GDAS), ``uniform`` (one uniformly sampled path, no
                architecture gradient; SPOS) or ``fixed`` (``arch``: decision -> index).
            tau: softmax / Gumbel temperature.
            grad: let the weights carry gradients to ``alpha`` (architecture steps).

        Returns:
            The sampled indices for hard modes, else None.
        """
        n = len(self.decisions)
        if mode == "soft":
            ws = self.probs(tau)
            self._state = PathState([w if grad else w.detach() for w in ws], None)
            return None
        if mode == "gumbel":
            hard: list[int] = []
            weights: list[torch.Tensor] = []
            for a in self.alphas:
                u = torch.rand(a.shape, generator=gen).clamp_(1e-9, 1 - 1e-9)
                g = -torch.log(-torch.log(u))
                soft = torch.softmax((a + g) / tau, dim=0)
                i = int(soft.argmax())
                one = torch.zeros_like(soft)
                one[i] = 1.0
                w = one - soft.detach() + soft if grad else one
                hard.append(i)
                weights.append(w)
            self._state = PathState(weights, hard)
            return hard
        if mode == "uniform":
            idx = [int(torch.randint(len(d.values), (1,), generator=gen)) for d in self.decisions]
            return self.set_path("fixed", arch={d.name: i for d, i in zip(self.decisions, idx)})
        if mode == "fixed":
            assert arch is not None
            idx = [int(arch[d.name]) for d in self.decisions]
            weights = []
            for d, i in zip(self.decisions, idx):
                one = torch.zeros(len(d.values))
                one[i] = 1.0
                weights.append(one)
            self._state = PathState(weights, idx)
            return idx
        raise ValueError(f"unknown path mode '{mode}' (soft, gumbel, uniform, fixed)")
        del n

    def _gate(self, gate: tuple[int, int]) -> torch.Tensor:
        di, rep = gate
        d = self.decisions[di]
        w = self._state.weights[di]
        mask = torch.tensor([1.0 if v > rep else 0.0 for v in d.values])
        return (w * mask).sum()

    # -- forward ---------------------------------------------------------------------------
    def _run(self, x: torch.Tensor, stop_before_head: bool) -> torch.Tensor:
        vals: list[torch.Tensor] = []
        state = self._state
        for m in self._aux_modules:  # a candidate off this path must not keep an old loss
            m.aux_loss = None  # type: ignore[assignment]
            if hasattr(m, "aux_stats"):
                m.aux_stats = None  # type: ignore[assignment]
        for op in self._plan:
            if op.op == "embed":
                vals.append(self.embed(x))
                continue
            if op.op == "head":
                if stop_before_head:
                    return vals[op.ins[0]]
                vals.append(self.head(vals[op.ins[0]]))
                continue
            if op.op == "norm":
                vals.append(self.final_norm(vals[op.ins[0]]))
                continue
            xin = vals[op.ins[0]]
            g = self._gate(op.gate) if op.gate is not None else None
            if g is not None and state.hard is not None and float(g.detach()) == 0.0:
                vals.append(xin)  # the optional layer is skipped on this path
                continue
            if op.op == "block":
                y = self.blocks[op.module](xin, state)
            else:
                y = self.merges[op.module]([vals[i] for i in op.ins])
            if g is not None:
                y = g * y + (1 - g) * xin
            vals.append(y)
        return vals[-1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._run(x, stop_before_head=False)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self._run(x, stop_before_head=True)

    def aux_loss(self) -> torch.Tensor | None:
        return sum_aux_losses(self._aux_modules)

    # -- parameters and costs ----------------------------------------------------------------
    def weight_parameters(self) -> list[nn.Parameter]:
        """Trainable network weights (architecture logits excluded), each tensor once."""
        alpha_ids = {id(a) for a in self.alphas}
        seen: set[int] = set()
        out = []
        for p in self.parameters():
            if p.requires_grad and id(p) not in alpha_ids and id(p) not in seen:
                seen.add(id(p))
                out.append(p)
        return out

    def _candidate_weights(
        self, probs: list[torch.Tensor] | None = None
    ) -> Iterator[tuple[int, int, torch.Tensor]]:
        """``(row, candidate, weight)`` over ``block_rows()``: the candidate's probability
        under the architecture distribution, times ``P(repeat > r)`` for depth-gated rows."""
        probs = probs if probs is not None else self.probs()
        state = PathState(probs, None)
        for r, (idx, gate, rows) in enumerate(self._block_rows):
            mb = self.blocks[idx]
            assert isinstance(mb, MixedBlock)
            g = None
            if gate is not None:
                di, rep = gate
                mask = torch.tensor([1.0 if v > rep else 0.0 for v in self.decisions[di].values])
                g = (probs[di] * mask).sum()
            for i in range(len(rows)):
                w = mb.weight(i, state)
                w = torch.tensor(1.0) if w is None else w
                yield r, i, (w * g if g is not None else w)

    def expected_costs(self, probs: list[torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """Expected cost metrics under the architecture distribution (differentiable in
        ``alpha``): ``params``, ``flops_per_token``, ``state_bytes``, ``weight_bytes`` and
        ``weight_bits_avg`` (ratio of expectations). Units as in :mod:`archir.cost`."""
        tot = {k: torch.tensor(v) for k, v in self._const.items()}
        for r, i, w in self._candidate_weights(probs):
            row = self._block_rows[r][2][i]
            tot["params"] = tot["params"] + w * row.params
            tot["flops_per_token"] = tot["flops_per_token"] + w * row.flops_per_token
            tot["state_bytes"] = tot["state_bytes"] + w * row.state_bytes
            tot["weight_bytes"] = tot["weight_bytes"] + w * row.weight_bytes
            tot["bits_x_params"] = tot["bits_x_params"] + w * row.params * row.bits
        out = {k: tot[k] for k in ("params", "flops_per_token", "state_bytes", "weight_bytes")}
        out["weight_bits_avg"] = tot["bits_x_params"] / tot["params"].clamp_min(1.0)
        return out

    def expected_sum(
        self,
        per_candidate: list[list[float]],
        const: float = 0.0,
        probs: list[torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Expectation of an additive per-block quantity under the architecture distribution
        (differentiable in ``alpha``): ``const + Σ_rows Σ_c gate · w_c · per_candidate[row][c]``
        with rows in ``block_rows()`` order (depth-gated layers weighted by
        ``P(repeat > r)``). Used for predicted latency."""
        total = torch.tensor(float(const))
        for r, i, w in self._candidate_weights(probs):
            total = total + w * float(per_candidate[r][i])
        return total

    def held_doc(self) -> dict[str, dict[str, Any]]:
        """Held decisions as plain data: ``{name: {value, label, allowed, source}}``
        (``source``: ``"user"`` when given in ``held=``, else ``"default"``)."""
        out: dict[str, dict[str, Any]] = {}
        for name in self.held:
            d = self._all[name]
            node = d.node
            label = str(d.reference)
            if node.type == "choice" and not node.scalar_options:
                label = _label((node.options or ())[int(d.reference)])
            out[name] = {
                "value": d.reference,
                "label": label,
                "allowed": held_options(d),
                "source": "user" if name in self.held_by_user else "default",
            }
        return out

    def block_rows(self) -> list[tuple[str, list[Graph]]]:
        """Every block node of the reference graph (maximal depth) with the configuration
        graph of each of its candidates, in :meth:`expected_sum` order."""
        return list(zip(self._block_nodes, self._block_graphs))

    # -- discretization -------------------------------------------------------------------
    def argmax(self) -> dict[str, int]:
        """The most probable value index of every searched decision."""
        return {d.name: int(a.detach().argmax()) for d, a in zip(self.decisions, self.alphas)}

    def decisions_for(self, arch: Mapping[str, int]) -> Callable[[SearchNode], Any]:
        """A decider for ``Spec.fix``: searched decisions from ``arch`` (value indices),
        held decisions at their reference values."""
        chosen = {d.name: d.values[int(arch[d.name])] for d in self.decisions if d.name in arch}
        return self._decider(chosen)

    def fix(self, arch: Mapping[str, int]) -> Spec:
        """The concrete spec of an architecture (``decision name -> value index``)."""
        return self.open_spec.fix(self.decisions_for(arch))

    def arch_space(self) -> list[dict[str, int]]:
        """Every architecture (for small spaces)."""
        ranges = [range(len(d.values)) for d in self.decisions]
        return [
            {d.name: i for d, i in zip(self.decisions, combo)}
            for combo in itertools.product(*ranges)
        ]

    def describe(self) -> dict[str, Any]:
        """Decisions, candidates per block and weight sharing, as plain data."""
        blocks = []
        for op in self._plan:
            if op.op != "block":
                continue
            mb = self.blocks[op.module]
            assert isinstance(mb, MixedBlock)
            blocks.append(
                {
                    "node": op.node,
                    "candidates": len(mb.cands),
                    "weight_owners": mb.n_owners,
                    "gated_by": self.decisions[op.gate[0]].name if op.gate else None,
                }
            )
        return {
            "decisions": [
                {"name": d.name, "category": d.category, "values": d.labels} for d in self.decisions
            ],
            "held": self.held_doc(),
            "blocks": blocks,
            "params": sum(p.numel() for p in self.weight_parameters()),
        }


def build_supernet(
    spec: Spec, *, seq_len: int | None = None, held: Mapping[str, Any] | None = None
) -> SuperNet:
    """Build the supernet of an open spec.

    Args:
        spec: an open spec.
        seq_len: sequence length of the cost rows (default ``train.seq_len``).
        held: values for held decisions (see :func:`classify`); the others keep their
            default reference (first option, low end of an int range, middle of a float
            range).

    Raises:
        SearchError: the spec has no searchable decision, a block has too many
            configurations for a one-shot supernet, or a bad ``held`` entry.
    """
    net = SuperNet(spec, seq_len=seq_len, held=held)
    if not net.decisions:
        raise SearchError(
            "the spec has no decision a supernet can search (only held ones: "
            f"{', '.join(net.held) or 'none'})",
            hint="one-shot search needs choices inside blocks or over a group's repeat",
        )
    return net
