"""The intermediate representation: a typed DAG of blocks.

``build_graph(spec)`` expands a concrete spec into a :class:`Graph` — a networkx ``DiGraph``
whose nodes are :class:`Node` objects with stable path names (``embed``,
``layers.3.blocks.1``, ``final_norm``, ``head``) — and runs the shape pass: every node gets
an output :class:`TensorType` and every edge is checked. Errors name the node path, both
shapes and the spec location.

Node kinds:

* a **block** node wraps one registered kind in its residual structure
  (``pre_norm``: ``x + s·f(norm(x))``; ``post_norm``: ``norm(x + s·f(x))``;
  ``peri_norm``: ``x + s·norm(f(norm(x)))``; ``residual: false``: ``f(norm(x))``);
* a **merge** node combines several outputs (``sum``, ``mean`` or learned softmax
  ``weighted`` average) — made for ``inputs:`` lists and for parallel layers
  (``x + f₁(norm(x)) + f₂(norm(x))``, GPT-J / PaLM).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import networkx as nx

from archir import registry
from archir.errors import GraphError, Location, did_you_mean
from archir.registry import BlockKind, BuildContext, KindParams
from archir.spec.models import SpecModel
from archir.spec.source import PathKey, SourceMap

if TYPE_CHECKING:
    from archir.spec.loader import Spec

Dim = int | str


@dataclass(frozen=True)
class TensorType:
    """A symbolic tensor type: shape with named dynamic axes, dtype and bits.

    ``shape`` mixes ints and names, e.g. ``("batch", "seq", 256)``.
    """

    shape: tuple[Dim, ...]
    dtype: str = "float32"
    bits: float = 16

    def __str__(self) -> str:
        return "[" + ", ".join(str(d) for d in self.shape) + "]"


@dataclass
class Node:
    """One node of the IR.

    Attributes:
        name: stable path name, e.g. ``layers.2.blocks.0``.
        op: ``"embed"``, ``"block"``, ``"merge"``, ``"norm"`` (final norm) or ``"head"``.
        kind: registry kind name (``None`` for merge nodes).
        params: the kind's validated parameters.
        inputs: names of input nodes, in order.
        ctx: build context (d_model, bits, path ...).
        norm: pre-norm kind (``None`` for none).
        residual: ``pre_norm``/``post_norm``/``peri_norm``, or ``None`` (no skip).
        residual_scale: branch multiplier.
        merge: for merge nodes: ``sum``/``mean``/``weighted``.
        weights_of: name of the node whose weights this node reuses (``share_weights``),
            ``None`` when it owns its weights.
        spec_path: where the node was written in the spec (for errors).
        out: output type (set by the shape pass).
    """

    name: str
    op: str
    kind: str | None = None
    params: KindParams | None = None
    inputs: list[str] = field(default_factory=list)
    ctx: BuildContext | None = None
    norm: str | None = None
    residual: str | None = None
    residual_scale: float = 1.0
    merge: str = "sum"
    weights_of: str | None = None
    spec_path: PathKey = ()
    out: TensorType | None = None

    @property
    def block_kind(self) -> BlockKind | None:
        return registry.get(self.kind) if self.kind else None

    @property
    def bits(self) -> float:
        return self.ctx.bits if self.ctx else 16


class Graph:
    """A typed DAG of :class:`Node` objects in execution (topological, spec) order."""

    def __init__(self, spec: SpecModel, source: SourceMap | None = None) -> None:
        self.spec = spec
        self.source = source
        self.g: nx.DiGraph = nx.DiGraph()
        self._order: list[str] = []

    # container protocol ---------------------------------------------------------------
    def add(self, node: Node) -> Node:
        self.g.add_node(node.name, node=node)
        for src in node.inputs:
            self.g.add_edge(src, node.name)
        self._order.append(node.name)
        return node

    def __getitem__(self, name: str) -> Node:
        return self.g.nodes[name]["node"]

    def __iter__(self) -> Iterator[Node]:
        return (self[n] for n in self._order)

    def __len__(self) -> int:
        return len(self._order)

    @property
    def output(self) -> str:
        return self._order[-1]

    def locate(self, node: Node, sub: str | None = None) -> Location | None:
        if self.source is None:
            return Location(field=".".join(str(p) for p in node.spec_path) or None)
        return self.source.locate(node.spec_path + ((sub,) if sub else ()))


@dataclass(frozen=True)
class GridContext(BuildContext):
    """The build context of a node whose tokens form an image's grid (vision hierarchies).

    Attributes (besides :class:`~archir.registry.BuildContext`'s, whose ``d_model`` is the
    width of the node's stage):
        grid: ``(H, W)`` of the tokens the node reads, ``[batch, H·W, d]`` row-major; a 2-D
            token mixer (``pooling``, ``sepconv``) reshapes to it.
        d_in: the width entering a downsampling node (its output width is ``d_model``);
            0 for every other node.
    """

    grid: tuple[int, int] | None = None
    d_in: int = 0


def _ctx(
    m: Any,
    bits: float | None,
    path: str,
    *,
    d_model: int | None = None,
    grid: tuple[int, int] | None = None,
    d_in: int = 0,
) -> BuildContext:
    """A node's build context: the model-wide facts at the node's stage width ``d_model``
    (default ``model.d_model``); a :class:`GridContext` when the node reads a token grid."""
    causal = m.task == "causal_lm"
    fields: dict[str, Any] = {
        "d_model": d_model if d_model is not None else m.d_model,
        "vocab_size": m.vocab_size,
        "max_seq_len": m.max_seq_len,
        "causal": causal,
        "n_classes": m.n_classes,
        "image_size": m.image_size,
        "channels": m.channels,
        "bits": float(bits if bits is not None else m.bits),
        "path": path,
        "norm_eps": m.norm_eps,
    }
    if grid is None and not d_in:
        return BuildContext(**fields)
    return GridContext(**fields, grid=grid, d_in=d_in)


def _out_grid(
    kind: BlockKind, params: KindParams | None, ctx: BuildContext
) -> tuple[int, int] | None:
    """The token grid a node of ``kind`` produces (``None``: a sequence, or not a grid)."""
    rule = kind.extra.get("out_grid")
    if rule is None:
        return None
    h, w = rule(params, ctx)
    return (int(h), int(w)) if h >= 1 and w >= 1 else None


def build_graph(
    spec: Spec | SpecModel, *, check: bool = True, source: SourceMap | None = None
) -> Graph:
    """Expand a concrete spec into the IR and run the shape/validation pass.

    Raises:
        SpecError: the spec is open (has search nodes).
        GraphError: (located via ``source``, default: the spec's own source map)
            unknown or forward ``inputs`` names, cycles, a kind's parameters that do
            not fit the model (e.g. heads not dividing ``d_model``), or mismatched shapes.
    """
    if source is None and not isinstance(spec, SpecModel):
        source = spec.smap
    sm = spec.model if not isinstance(spec, SpecModel) else spec
    m = sm.model
    graph = Graph(sm, source)

    def node_loc(path: PathKey) -> Location | None:
        return source.locate(path) if source else Location(field=".".join(map(str, path)))

    image = m.task == "image_classification"
    embed_kind = registry.get(m.embed.kind)
    stem = image and bool(embed_kind.extra.get("downsample"))
    embed_ctx = (
        _ctx(m, m.embed.bits, "embed", grid=(m.image_size, m.image_size), d_in=m.channels)
        if stem
        else _ctx(m, m.embed.bits, "embed")
    )
    embed = graph.add(
        Node(
            "embed",
            "embed",
            m.embed.kind,
            m.embed.params,
            [],
            embed_ctx,
            spec_path=("model", "embed"),
        )
    )
    # vision hierarchies: the token grid and the width of the current stage
    grid = _out_grid(embed_kind, m.embed.params, embed_ctx) if image else None
    width = m.d_model
    names: dict[str, str] = {"embed": embed.name}
    prev = embed.name
    layer = 0
    merges = 0
    for gi, group in enumerate(m.layers):
        first_of_group: dict[int, str] = {}
        if group.downsample is not None:
            dpath: PathKey = ("model", "layers", gi, "downsample")
            if grid is None:
                if not image:
                    why = f"this {m.task} model's tokens are a sequence"
                else:
                    why = f"the tokens of {m.embed.kind} here are not a grid"
                raise GraphError(
                    f"layer group {gi} downsamples, but {why}: a downsample shrinks an "
                    "image's token grid",
                    node_loc(dpath),
                    "downsampling needs model.task: image_classification and an embedding "
                    "that keeps the grid (downsample, or patch_embedding without cls_token)",
                )
            new_width = group.d_model if group.d_model is not None else width
            dname = f"layers.{layer}.downsample"
            down = Node(
                dname,
                "downsample",
                group.downsample.kind,
                group.downsample.params,
                [prev],
                _ctx(m, group.downsample.bits, dname, d_model=new_width, grid=grid, d_in=width),
                spec_path=dpath,
            )
            graph.add(down)
            prev = dname
            assert down.ctx is not None
            grid = _out_grid(registry.get(down.kind or ""), down.params, down.ctx)
            width = new_width
        elif group.d_model is not None and group.d_model != width:
            raise GraphError(
                f"layer group {gi} has d_model {group.d_model} but its input has width "
                f"{width}: a residual cannot add [batch, seq, {width}] and "
                f"[batch, seq, {group.d_model}]",
                node_loc(("model", "layers", gi, "d_model")),
                "give the group a downsample (it changes the width), or remove d_model",
            )
        for rep in range(group.repeat):
            layer_in = prev
            branch_outs: list[str] = []
            seen_here: set[str] = set()
            for bi, block in enumerate(group.blocks):
                spath: PathKey = ("model", "layers", gi, "blocks", bi)
                name = f"layers.{layer}.blocks.{bi}"
                if block.inputs:
                    srcs = []
                    for ref in block.inputs:
                        if ref not in names:
                            later = any(b.name == ref for g in m.layers for b in g.blocks)
                            if ref == block.name:
                                why = " (it is this block's own name: that would make a cycle)"
                            elif later:
                                why = " (it names a later block: that would make a cycle)"
                            else:
                                why = ""
                            raise GraphError(
                                f"input '{ref}' is not the name of an earlier block{why}",
                                node_loc(spath + ("inputs",)),
                                (None if later else did_you_mean(ref, list(names)))
                                or "inputs may name 'embed' or blocks written above this one",
                            )
                        srcs.append(names[ref])
                    if len(srcs) == 1:
                        x_in = srcs[0]
                    else:
                        merges += 1
                        mname = f"{name}.merge"
                        graph.add(
                            Node(
                                mname,
                                "merge",
                                inputs=srcs,
                                merge=block.merge,
                                ctx=_ctx(m, None, mname, d_model=width, grid=grid),
                                spec_path=spath + ("inputs",),
                            )
                        )
                        x_in = mname
                elif group.residual == "parallel":
                    x_in = layer_in
                else:
                    x_in = prev
                if group.residual == "parallel":
                    residual = None
                else:
                    residual = group.residual if block.residual else None
                norm = block.norm if block.norm is not None else m.norm
                node = Node(
                    name,
                    "block",
                    block.kind,
                    block.params,
                    [x_in],
                    _ctx(m, block.bits, name, d_model=width, grid=grid),
                    norm=None if norm == "none" else norm,
                    residual=residual,
                    residual_scale=block.residual_scale,
                    spec_path=spath,
                )
                if group.share_weights and rep > 0:
                    node.weights_of = first_of_group[bi]
                else:
                    first_of_group[bi] = name
                graph.add(node)
                if block.name:
                    if block.name in seen_here or (rep == 0 and block.name in names):
                        raise GraphError(
                            f"block name '{block.name}' is used twice",
                            node_loc(spath + ("name",)),
                            "give every named block its own name",
                        )
                    seen_here.add(block.name)
                    names[block.name] = name
                branch_outs.append(name)
                prev = name
            if group.residual == "parallel":
                mname = f"layers.{layer}.parallel"
                graph.add(
                    Node(
                        mname,
                        "merge",
                        inputs=[layer_in, *branch_outs],
                        merge="sum",
                        ctx=_ctx(m, None, mname, d_model=width, grid=grid),
                        spec_path=("model", "layers", gi, "residual"),
                    )
                )
                prev = mname
            layer += 1
    final = m.final_norm if m.final_norm is not None else m.norm
    if final != "none":
        graph.add(
            Node(
                "final_norm",
                "norm",
                final,
                norm_params(final, m.norm_eps),
                [prev],
                _ctx(m, None, "final_norm", d_model=width, grid=grid),
                spec_path=("model", "final_norm") if m.final_norm else ("model", "norm"),
            )
        )
        prev = "final_norm"
    graph.add(
        Node(
            "head",
            "head",
            m.head.kind,
            m.head.params,
            [prev],
            _ctx(m, m.head.bits, "head", d_model=width, grid=grid),
            spec_path=("model", "head"),
        )
    )
    if not nx.is_directed_acyclic_graph(graph.g):  # pragma: no cover - guarded above
        cycle = " -> ".join(u for u, _ in nx.find_cycle(graph.g))
        raise GraphError(f"the graph has a cycle: {cycle}")
    if check:
        infer_shapes(graph)
    return graph


def norm_params(kind: str, eps: float | None) -> KindParams:
    """The parameters of a norm of ``kind`` built with the model's ``norm_eps`` (``None``:
    the kind's defaults; a kind without an ``eps`` ignores it)."""
    params = registry.get(kind).params
    if eps is not None and "eps" in params.model_fields:
        return params.model_validate({"eps": eps})
    return params()


def _input_type(m: Any) -> TensorType:
    if m.task == "image_classification":
        return TensorType(("batch", m.channels, m.image_size, m.image_size))
    return TensorType(("batch", "seq"), dtype="int64")


def _at(node: Node) -> str:
    """`` (node layers.4.blocks.0)`` when the node path differs from where it was written."""
    written = ".".join(str(p) for p in node.spec_path)
    return "" if written in (node.name, f"model.{node.name}") else f" (node {node.name})"


def infer_shapes(graph: Graph) -> None:
    """Shape inference and validation over the whole graph (in place).

    Raises:
        GraphError: naming the node path, the shapes involved and the spec location.
    """
    m = graph.spec.model
    for node in graph:
        kind = node.block_kind
        if kind is not None and node.ctx is not None:
            try:
                kind.check(node.params, node.ctx)
            except ValueError as exc:
                # "n_heads 6 does not divide ..." points at the n_heads field when written
                word = str(exc).split(" ", 1)[0]
                fields = type(node.params).model_fields if node.params is not None else {}
                sub = word if word in fields else None
                raise GraphError(f"{exc}{_at(node)}", graph.locate(node, sub)) from None
        if node.norm is not None:
            registry.get(node.norm).check(registry.get(node.norm).params(), node.ctx)
        if node.op == "embed":
            assert kind is not None
            in_t = _input_type(m)
            out_shape = kind.extra.get("out_shape")
            node.out = TensorType(
                out_shape(node.params, node.ctx, in_t.shape)
                if out_shape
                else (*in_t.shape[:2], m.d_model),
                bits=node.bits,
            )
            continue
        in_types = [graph[s].out for s in node.inputs]
        assert all(t is not None for t in in_types)
        if node.op == "merge":
            first = in_types[0]
            assert first is not None
            for src, t in zip(node.inputs[1:], in_types[1:]):
                if t is None or t.shape != first.shape:
                    raise GraphError(
                        f"{node.name}: inputs disagree: {node.inputs[0]} gives {first}, "
                        f"{src} gives {t}",
                        graph.locate(node),
                        "merged outputs must have the same shape",
                    )
            node.out = TensorType(first.shape, first.dtype, node.bits)
            continue
        x = in_types[0]
        assert x is not None and node.ctx is not None
        grid = getattr(node.ctx, "grid", None)
        d_in = getattr(node.ctx, "d_in", 0) or node.ctx.d_model
        n_tok: Dim = grid[0] * grid[1] if grid is not None else "seq"
        if node.op == "downsample":
            assert kind is not None and grid is not None
            if len(x.shape) != 3 or x.shape[-1] != d_in or x.shape[1] != n_tok:
                raise GraphError(
                    f"{node.name}: expects the {grid[0]}x{grid[1]} token grid "
                    f"[batch, {n_tok}, {d_in}] but {node.inputs[0]} gives {x}",
                    graph.locate(node),
                    "check the blocks before this downsample",
                )
            node.out = TensorType(
                kind.extra["out_shape"](node.params, node.ctx, x.shape), bits=node.bits
            )
            continue
        d = node.ctx.d_model
        if len(x.shape) != 3 or x.shape[-1] != d or (grid is not None and x.shape[1] != n_tok):
            where = f" (a {grid[0]}x{grid[1]} token grid)" if grid is not None else ""
            raise GraphError(
                f"{node.name}: expects [batch, {n_tok}, {d}]{where} but {node.inputs[0]} gives {x}",
                graph.locate(node),
                "check the embedding and the inputs of this block"
                + (" (inputs from another stage have another grid or width)" if grid else ""),
            )
        if node.op == "head":
            assert kind is not None
            out_shape = kind.extra.get("out_shape")
            node.out = TensorType(
                out_shape(node.params, node.ctx, x.shape) if out_shape else x.shape, bits=node.bits
            )
        else:
            node.out = TensorType(x.shape, bits=node.bits)


def graph_summary(graph: Graph) -> list[dict[str, Any]]:
    """A plain-data description of the nodes (used by ``show`` and the canonical hash)."""
    rows = []
    for n in graph:
        rows.append(
            {
                "name": n.name,
                "op": n.op,
                "kind": n.kind,
                "params": n.params.hash_dump() if n.params is not None else {},
                "inputs": list(n.inputs),
                "norm": n.norm,
                "residual": n.residual,
                "residual_scale": n.residual_scale,
                "merge": n.merge if n.op == "merge" else None,
                "weights_of": n.weights_of,
                "bits": n.bits,
                "shape": [str(d) for d in n.out.shape] if n.out else None,
            }
        )
    return rows
