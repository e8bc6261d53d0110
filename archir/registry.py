"""The block registry: the one place that knows every block kind.

A block kind registers its role, its typed parameter model, how to build its module, its
cost rules (exact parameter count, forward FLOPs per token, inference state bytes) and what it
is (:class:`BlockKind`'s ``recurrent``, ``state_grows``, ``flops_exact`` and ``lacks``). The
spec loader, the IR passes, the compiler, the searchers, the exporters and the tests all ask
the registry; adding a kind touches one file under ``archir/blocks/`` and its test.

Module conventions (all roles but embedding/head):
    ``forward(x)`` with ``x: [batch, seq, d_model]`` returns ``[batch, seq, d_model]``.
Token mixers (and channel mixers that carry state, e.g. RWKV's) also decode one token at a
time with a carried state (issue 14), unless the kind declares ``lacks={"step": reason}``:
    ``init_state(batch, device=None, dtype=None) -> state`` and
    ``step(x_t: [batch, d_model], state) -> (y_t: [batch, d_model], state)``,
agreeing with ``forward`` to 1e-5 (a channel mixer without them is applied per token).
Modules may set ``self.aux_loss`` (a scalar tensor) during ``forward``; the compiled model
sums them (e.g. the MoE load-balancing loss).

The registry-driven tests read these declarations, so a new kind is covered without editing
a test: every kind exports to ONNX (``tests/test_export_matrix.py``), every mixer decodes
like its forward in PyTorch and ONNX (``tests/test_decode.py``), every ``recurrent`` kind with
a fixed state gets the step/parallel, causality, state-size and export checks of
``tests/test_blocks_recurrent.py``, every ``flops_exact`` kind is counted against
``torch.utils.flop_counter`` and every kind's state size grows with the length exactly when
it declares ``state_grows`` (``tests/test_cost.py``). A kind that cannot meet one of them says
so in ``lacks`` with the reason, which the tests print when they skip it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict

if TYPE_CHECKING:  # torch is imported with the blocks (``_load``), not to read a spec
    from torch import nn

Role = Literal["token_mixer", "channel_mixer", "norm", "embedding", "head"]
ROLES: tuple[str, ...] = ("token_mixer", "channel_mixer", "norm", "embedding", "head")

# Bits a block's weights may be stored at. 1.58 is ternary {-1, 0, 1} (BitNet b1.58).
ALLOWED_BITS: tuple[float, ...] = (32, 16, 8, 4, 2, 1.58, 1)


#: Upper bound of a width-like parameter of a kind (``d_model``, ``d_ff``, ``n_heads``,
#: ``d_state``, ``window`` ...): far beyond any real model, low enough that cost formulas stay
#: exact integers and nothing is allocated for an absurd value.
MAX_DIM = 65_536
#: Upper bound of a hidden width that multiplies ``d_model`` (``d_ff``, ``dt_rank`` ...).
MAX_HIDDEN = 1 << 20


class KindParams(BaseModel):
    """Base of every kind's parameter model: unknown keys are errors, values are strict
    (``n_heads: true`` or ``"8"`` are not integers, ``bias: "yes"`` is not a boolean) and
    floats must be finite. Subclasses bound every size (see :data:`MAX_DIM`)."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, allow_inf_nan=False)

    #: fields added after studies were stored: left out of the canonical hash while at their
    #: default, so a spec that does not use them hashes as it did before they existed
    added_later: ClassVar[frozenset[str]] = frozenset()

    def hash_dump(self) -> dict[str, Any]:
        """``model_dump()`` without the :attr:`added_later` fields at their default."""
        out = self.model_dump()
        for name in self.added_later:
            if out.get(name) == type(self).model_fields[name].default:
                out.pop(name, None)
        return out


class NoParams(KindParams):
    """A kind without parameters of its own."""


@dataclass(frozen=True)
class BuildContext:
    """Model-wide facts a block needs to be built and costed.

    Attributes:
        d_model: residual width.
        vocab_size: token vocabulary (0 for image tasks).
        max_seq_len: longest sequence the model must accept (positions, causal masks).
        causal: token mixers must not look ahead (language models).
        n_classes: classes of a classification head (0 otherwise).
        image_size, channels: input geometry for patch embeddings.
        bits: weight bits of the node being built.
        path: the node's stable path, e.g. ``layers.2.blocks.0`` (for messages).
        norm_eps: epsilon of the norms the model builds (``None``: the norm kind's default).
    """

    d_model: int
    vocab_size: int = 0
    max_seq_len: int = 2048
    causal: bool = True
    n_classes: int = 0
    image_size: int = 0
    channels: int = 1
    bits: float = 16
    path: str = ""
    norm_eps: float | None = None


#: Forms a kind provides unless it declares them in :attr:`BlockKind.lacks`:
#:
#: * ``step``: ``init_state``/``step``, decoding one token at a time with a carried state in
#:   PyTorch (token mixers; channel mixers that carry state);
#: * ``onnx``: the full-sequence ONNX export with dynamic batch and sequence axes that
#:   matches PyTorch in onnxruntime at lengths it was not traced at;
#: * ``onnx_decode``: the ONNX decode (step) graph with its states as inputs and outputs.
FORMS: tuple[str, ...] = ("step", "onnx", "onnx_decode")

ParamsFn = Callable[[Any, BuildContext], int]
FlopsFn = Callable[[Any, BuildContext, int], float]
StateFn = Callable[[Any, BuildContext, int], int]
CheckFn = Callable[[Any, BuildContext], None]
BuildFn = Callable[[Any, BuildContext], "nn.Module"]


def _zero(*_: Any) -> int:
    return 0


def _ok(*_: Any) -> None:
    return None


@dataclass(frozen=True)
class BlockKind:
    """A registered block kind.

    Attributes:
        name: the spec's ``kind`` value, e.g. ``"attention"``.
        role: the spec's ``role``.
        params: pydantic model of the kind's own parameters.
        build: ``(params, ctx) -> nn.Module``.
        n_params: exact trainable parameter count of the built module.
        flops: forward FLOPs per token at sequence length ``L`` (a multiply-add is 2 FLOPs).
        state_bytes: inference state held per sequence at length ``L`` (fp32 elements × 4):
            KV cache grows with ``L``; recurrent state does not.
        check: raises ``ValueError(message)`` when params do not fit the context
            (e.g. heads not dividing ``d_model``: use :func:`archir.blocks.common.check_heads`).
            A message starting with a field name is located at that field in the spec.
        paper: the source paper (authors, year, title).
        summary: one line for ``archir blocks``.
        recurrent: the kind is a recurrence (RNN, state-space model, linear attention …) whose
            parallel or chunked ``forward`` and its ``step`` are two computations of one
            function; with a fixed-size state (``state_grows`` false) it gets the recurrent
            contract of ``tests/test_blocks_recurrent.py`` (step equals forward in fp64 and
            fp32, causal, ``state_bytes`` equals the real state, export parity).
        state_grows: the decoding state grows with the number of tokens seen (attention's KV
            cache, a long convolution's history); ``False``: fixed size or none.
            ``state_bytes`` must agree (``tests/test_cost.py`` checks both ways).
        flops_exact: the ``flops`` rule equals ``torch.utils.flop_counter``'s count of the
            module (matmul-class operations only) at the default parameters — tested for
            every such kind. (``extra={"flops_exact": True}``, its spelling before it was a
            field, is read as this field.)
        lacks: forms of :data:`FORMS` the kind does not provide, each with the reason, e.g.
            ``{"onnx": "no loopless form with a dynamic sequence length"}``; the registry-
            driven tests skip the kind for that form and print the reason. Empty (the
            default): the kind provides every form.
        extra: further facts other passes read by name: ``out_shape(params, ctx, in_shape)``
            for embeddings and heads whose output is not ``[batch, seq, d_model]``;
            ``flops_counts`` (a note on what the FLOPs rule counts; read by no pass).
    """

    name: str
    role: str
    params: type[KindParams]
    build: BuildFn
    n_params: ParamsFn
    flops: FlopsFn
    paper: str
    summary: str
    state_bytes: StateFn = _zero
    check: CheckFn = _ok
    recurrent: bool = False
    state_grows: bool = False
    flops_exact: bool = False
    lacks: Mapping[str, str] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.extra.get("flops_exact") and not self.flops_exact:
            object.__setattr__(self, "flops_exact", True)

    def provides(self, form: str) -> bool:
        """Whether the kind provides ``form`` (one of :data:`FORMS`; ``ValueError`` for any
        other name)."""
        if form not in FORMS:
            raise ValueError(f"unknown form '{form}' (forms: {', '.join(FORMS)})")
        return form not in self.lacks

    @property
    def param_free(self) -> bool:
        """True when the kind has no weights under its default parameters."""
        try:
            return self.n_params(self.params(), BuildContext(d_model=64, vocab_size=16)) == 0
        except Exception:  # noqa: BLE001 - params without defaults are not free
            return False


_REGISTRY: dict[str, BlockKind] = {}


def register(kind: BlockKind) -> BlockKind:
    """Add a kind to the registry.

    Raises:
        ValueError: a duplicate name, an unknown role, a form in ``lacks`` that is not one of
            :data:`FORMS` or given without a reason, or ``recurrent``/``state_grows`` on a
            kind that is not a token or channel mixer.
    """
    if kind.name in _REGISTRY:
        raise ValueError(f"block kind '{kind.name}' is registered twice")
    if kind.role not in ROLES:
        raise ValueError(f"block kind '{kind.name}' has unknown role '{kind.role}'")
    for form, why in kind.lacks.items():
        if form not in FORMS:
            raise ValueError(
                f"block kind '{kind.name}' lacks unknown form '{form}' (forms: {', '.join(FORMS)})"
            )
        if not isinstance(why, str) or not why.strip():
            raise ValueError(f"block kind '{kind.name}' lacks '{form}' without a reason")
    if (kind.recurrent or kind.state_grows) and kind.role not in ("token_mixer", "channel_mixer"):
        raise ValueError(
            f"block kind '{kind.name}': recurrent/state_grows are for token and channel mixers"
        )
    _REGISTRY[kind.name] = kind
    return kind


def _load() -> None:
    import archir.blocks  # noqa: F401  (registers every kind)


def get(name: str) -> BlockKind:
    """The kind called ``name``; ``KeyError`` if none."""
    _load()
    return _REGISTRY[name]


def kinds(role: str | None = None) -> list[BlockKind]:
    """All registered kinds (of one role), sorted by role then name."""
    _load()
    out = [k for k in _REGISTRY.values() if role is None or k.role == role]
    return sorted(out, key=lambda k: (ROLES.index(k.role), k.name))


def names(role: str | None = None) -> list[str]:
    """Names of :func:`kinds` (of one role), in the same order."""
    return [k.name for k in kinds(role)]
