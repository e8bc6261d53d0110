"""Causal attention in the exported graph: ``archir::causal_attention`` written as ONNX.

Under ``torch.export`` inside :func:`exporters.graph.export_graph` (which enters
:func:`archir.blocks.attention.chunked_causal_attention`) a causal attention calls the
custom operation :func:`archir.blocks.attention.causal_attention`, which the exporter keeps
whole (:func:`translations` makes it one ``archir.CausalAttention`` node); :func:`expand`
then replaces each such node with plain ONNX:

* up to :data:`~archir.blocks.attention.CHUNK_MIN_LEN` positions, or for a model whose
  ``max_seq_len`` never goes past it: ``softmax(q·scale @ kᵀ + mask) @ v``, the mask the
  additive ``-inf`` upper triangle (one ``Trilu``) or the block's own (ALiBi, a window);
* past it, behind an ``If`` on the length: the queries in ``n`` chunks of ``c = ceil(seq
  / n)`` positions (``n`` 8; 16 past 1,024 positions behind a second ``If`` in the
  first's else-branch, 32 past 2,048 behind a third:
  :data:`~archir.blocks.attention.CHUNK_FORMS`), chunk ``i``
  scoring only keys ``[0, (i+1)·c)`` against its rows of the mask (``Slice``
  clamps the last chunk to the sequence), so ``(n+1)/(2n)`` of the ``seq²`` scores are
  computed and stored; with a sliding window ``w``, only keys from ``i·c − w + 1`` on.
  The plain causal mask of every chunk is a slice of one ``[c, n·c]`` band (``-inf``
  where ``column − row > (n−1)·c``), not of a ``[seq, seq]`` mask: at 4,096 positions
  that was 64 MB written per layer; the band took 3 % off an attention model's time at
  512, 6 % at 1,024 and 11-12 % at 2,048-4,096 (``benchmarks/README.md``).

Same values as eager ``scaled_dot_product_attention`` up to float rounding (the scale is
applied to ``q`` once). The graph stays opset-20 standard ONNX: no ``archir`` domain is
left in a written file.
"""

from __future__ import annotations

from typing import Any

import onnx
from onnx import TensorProto, helper

from archir.blocks.attention import CHUNK_MIN_LEN, chunk_forms

DOMAIN = "archir"
OP = "CausalAttention"


def _register_schema() -> None:
    """Declare ``archir.CausalAttention`` to onnx (onnxscript looks every operation up), once
    per process."""
    from onnx.defs import OpSchema

    if onnx.defs.has(OP, DOMAIN):
        return
    param = OpSchema.FormalParameter
    schema = OpSchema(
        OP,
        DOMAIN,
        1,
        inputs=[
            param("q", "T"),
            param("k", "T"),
            param("v", "T"),
            param("mask", "T", param_option=OpSchema.FormalParameterOption.Optional),
        ],
        outputs=[param("y", "T")],
        type_constraints=[("T", ["tensor(float)", "tensor(float16)"], "float tensors")],
        attributes=[
            OpSchema.Attribute("scale", OpSchema.AttrType.FLOAT, "score scale"),
            OpSchema.Attribute("max_len", OpSchema.AttrType.INT, "longest sequence"),
            OpSchema.Attribute("window", OpSchema.AttrType.INT, "sliding window (0: none)"),
        ],
    )
    onnx.defs.register_schema(schema)


def _translate(
    q: Any, k: Any, v: Any, mask: Any, scale: float, max_len: int, window: int = 0
) -> Any:
    """onnxscript translation of ``archir::causal_attention``: one ``archir`` node."""
    from onnxscript import values

    op = values.Opset(DOMAIN, 1)
    extra = () if mask is None else (mask,)
    return op.CausalAttention(
        q, k, v, *extra, scale=float(scale), max_len=int(max_len), window=int(window)
    )


def translations() -> dict[Any, Any]:
    """``custom_translation_table`` for ``torch.onnx.export(..., dynamo=True)``."""
    import torch

    import archir.blocks.attention  # noqa: F401 - registers the operation

    _register_schema()
    return {torch.ops.archir.causal_attention.default: _translate}


class _Names:
    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.i = 0

    def __call__(self, what: str) -> str:
        self.i += 1
        return f"{self.prefix}/{what}_{self.i}"


def _const(nodes: list[onnx.NodeProto], name: _Names, values: list[int] | float) -> str:
    out = name("const")
    if isinstance(values, float):
        t = helper.make_tensor(out, TensorProto.FLOAT, [], [values])
    else:
        t = helper.make_tensor(out, TensorProto.INT64, [len(values)], values)
    nodes.append(helper.make_node("Constant", [], [out], name=out, value=t))
    return out


def _node(
    nodes: list[onnx.NodeProto], name: _Names, op: str, inputs: list[str], **attrs: Any
) -> str:
    out = name(op)
    nodes.append(helper.make_node(op, inputs, [out], name=out, **attrs))
    return out


def _attend(nodes: list[onnx.NodeProto], name: _Names, q: str, kt: str, v: str, mask: str) -> str:
    s = _node(nodes, name, "MatMul", [q, kt])
    s = _node(nodes, name, "Add", [s, mask])
    p = _node(nodes, name, "Softmax", [s], axis=-1)
    return _node(nodes, name, "MatMul", [p, v])


def _merge_heads(nodes: list[onnx.NodeProto], name: _Names, y: str, out: str) -> None:
    """``[batch, heads, seq, head_dim] -> [batch, seq, heads·head_dim]`` into ``out``."""
    t = _node(nodes, name, "Transpose", [y], perm=[0, 2, 1, 3])
    shape = _const(nodes, name, [0, 0, -1])
    nodes.append(helper.make_node("Reshape", [t, shape], [out], name=name("Reshape")))


def _expand_one(node: onnx.NodeProto, elem_type: int) -> list[onnx.NodeProto]:
    """The plain-ONNX nodes computing one ``archir.CausalAttention`` node whose output has
    the ONNX element type ``elem_type``."""
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    scale, max_len = float(attrs["scale"]), int(attrs["max_len"])
    window = int(attrs.get("window", 0))
    q, k, v = node.input[:3]
    given = node.input[3] if len(node.input) > 3 else ""
    (y,) = node.output
    name = _Names(node.name or "causal_attention")
    top: list[onnx.NodeProto] = []
    T = _node(top, name, "Shape", [q], start=2, end=3)  # [1]

    def future(nodes: list[onnx.NodeProto], rows: str, cols: str, diag: str) -> str:
        """``[rows, cols]``: ``-inf`` where ``column - row >= diag``, 0 elsewhere."""
        shape = _node(nodes, name, "Concat", [rows, cols], axis=0)
        full = _node(nodes, name, "Expand", [_const(nodes, name, float("-inf")), shape])
        return _node(nodes, name, "Trilu", [full, diag], upper=1)

    # the scale and kᵀ inside each branch: onnxruntime fuses them into the MatMul there
    def plain(nodes: list[onnx.NodeProto], out: str) -> list[onnx.NodeProto]:
        # ALiBi, a window: the block's own [T, T] or [heads, T, T]; else the causal one
        mask = given or future(nodes, T, T, _const(nodes, name, [1]))
        qs = _node(nodes, name, "Mul", [q, _const(nodes, name, scale)])
        kt = _node(nodes, name, "Transpose", [k], perm=[0, 1, 3, 2])
        _merge_heads(nodes, name, _attend(nodes, name, qs, kt, v, mask), out)
        return nodes

    def chunked(n: int, out: str) -> list[onnx.NodeProto]:
        nodes: list[onnx.NodeProto] = []
        qs = _node(nodes, name, "Mul", [q, _const(nodes, name, scale)])
        c = _node(
            nodes,
            name,
            "Div",
            [
                _node(nodes, name, "Add", [T, _const(nodes, name, [n - 1])]),
                _const(nodes, name, [n]),
            ],
        )
        zero = _const(nodes, name, [0])
        ends = [_node(nodes, name, "Mul", [c, _const(nodes, name, [i + 1])]) for i in range(n)]
        if not given:
            # one [c, n·c] band instead of the [T, T] mask (64 MB at 4,096 positions, built
            # per layer): chunk i's rows of the causal mask, over keys [0, (i+1)·c), are
            # its columns from (n-1-i)·c on (-inf where key > query, i.e. column - row >=
            # (n-1)·c + 1), the last chunk's rows and keys cut at T
            diag = _node(nodes, name, "Add", [ends[n - 2], _const(nodes, name, [1])])
            band = future(nodes, c, ends[n - 1], diag)
        parts = []
        for i in range(n):
            lo, hi = zero if i == 0 else ends[i - 1], ends[i]
            # the first key chunk i may see: 0, or with a window the first query's window
            first = zero
            if window and i > 0:
                past = _node(nodes, name, "Sub", [lo, _const(nodes, name, [window - 1])])
                first = _node(nodes, name, "Max", [past, zero])
            qi = _node(nodes, name, "Slice", [qs, lo, hi, _const(nodes, name, [2])])
            ki = _node(nodes, name, "Slice", [k, first, hi, _const(nodes, name, [2])])
            ki = _node(nodes, name, "Transpose", [ki], perm=[0, 1, 3, 2])
            vi = _node(nodes, name, "Slice", [v, first, hi, _const(nodes, name, [2])])
            if given:
                lo2 = _node(nodes, name, "Concat", [lo, first], axis=0)
                hi2 = _node(nodes, name, "Concat", [hi, hi], axis=0)
            else:
                # rows [0, min(hi, T) - lo), columns (n-1-i)·c + [0, min(hi, T))
                hi_t = _node(nodes, name, "Min", [hi, T])
                col = zero if i == n - 1 else ends[n - 2 - i]
                lo2 = _node(nodes, name, "Concat", [zero, col], axis=0)
                hi2 = _node(
                    nodes,
                    name,
                    "Concat",
                    [
                        _node(nodes, name, "Sub", [hi_t, lo]),
                        _node(nodes, name, "Add", [col, hi_t]),
                    ],
                    axis=0,
                )
            src = given or band
            mi = _node(nodes, name, "Slice", [src, lo2, hi2, _const(nodes, name, [-2, -1])])
            parts.append(_attend(nodes, name, qi, ki, vi, mi))
        _merge_heads(nodes, name, _node(nodes, name, "Concat", parts, axis=2), out)
        return nodes

    def choose(
        nodes: list[onnx.NodeProto],
        up_to: int,
        short: list[onnx.NodeProto],
        long: list[onnx.NodeProto],
        out: str,
    ) -> None:
        """``If (T <= up_to) short else long`` into ``out``."""

        def graph(branch: list[onnx.NodeProto], what: str) -> onnx.GraphProto:
            result = helper.make_tensor_value_info(branch[-1].output[0], elem_type, None)
            return helper.make_graph(branch, name(what), [], [result])

        cond = _node(nodes, name, "LessOrEqual", [T, _const(nodes, name, [up_to])])
        nodes.append(
            helper.make_node(
                "If",
                [cond],
                [out],
                name=name("If"),
                then_branch=graph(short, f"up_to_{up_to}"),
                else_branch=graph(long, f"past_{up_to}"),
            )
        )

    forms = chunk_forms(max_len)
    if not forms:
        plain(top, y)
    else:
        # If (T <= 192) every score else If (T <= 1,024) 8 chunks else If (T <= 2,048) 16
        # chunks else 32, nested
        # from the longest form in: no torch.export cost, this is written directly
        *shorter, (lo, n) = forms
        inner = chunked(n, name("chunked_y"))
        for lo_i, n_i in reversed(shorter):
            outer: list[onnx.NodeProto] = []
            choose(outer, lo, chunked(n_i, name("chunked_y")), inner, name("chunked_y"))
            inner, lo = outer, lo_i
        choose(top, CHUNK_MIN_LEN, plain([], name("plain_y")), inner, y)
    for n_ in top:
        n_.metadata_props.extend(node.metadata_props)
    return top


def expand(proto: onnx.ModelProto) -> int:
    """Replace every ``archir.CausalAttention`` node of ``proto``'s main graph with plain
    ONNX (module docstring), in place, and drop the ``archir`` opset import. Returns the
    number of nodes replaced."""
    g = proto.graph
    if not any(n.domain == DOMAIN and n.op_type == OP for n in g.node):
        return 0
    types = {v.name: v.type.tensor_type.elem_type for v in g.value_info}
    new: list[onnx.NodeProto] = []
    replaced = 0
    for n in list(g.node):
        if n.domain == DOMAIN and n.op_type == OP:
            new.extend(_expand_one(n, types.get(n.output[0]) or TensorProto.FLOAT))
            replaced += 1
        else:
            new.append(n)
    del g.node[:]
    g.node.extend(new)
    keep = [o for o in proto.opset_import if o.domain != DOMAIN]
    del proto.opset_import[:]
    proto.opset_import.extend(keep)
    for f in [f for f in proto.functions if f.domain == DOMAIN]:
        proto.functions.remove(f)
    return replaced
