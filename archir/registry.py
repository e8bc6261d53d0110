"""The block registry: the one place that knows every block kind.

A block kind registers its role, its typed parameter model, how to build its module, and its
cost rules (exact parameter count, forward FLOPs per token, inference state bytes). The spec
loader, the IR passes, the compiler, the searchers and the exporters all ask the registry;
adding a kind touches one file under ``archir/blocks/`` and its test.

Module conventions (all roles but embedding/head):
    ``forward(x)`` with ``x: [batch, seq, d_model]`` returns ``[batch, seq, d_model]``.
Recurrent / state-space token mixers additionally provide
    ``init_state(batch, device=None, dtype=None) -> state`` and
    ``step(x_t: [batch, d_model], state) -> (y_t: [batch, d_model], state)``
and must agree with ``forward`` to 1e-5.
Modules may set ``self.aux_loss`` (a scalar tensor) during ``forward``; the compiled model
sums them (e.g. the MoE load-balancing loss).
"""

from __future__ import annotations

from collections.abc import Callable
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
            (e.g. heads not dividing ``d_model``).
        paper: the source paper (authors, year, title).
        summary: one line for ``archir blocks``.
        recurrent: provides ``init_state``/``step`` (decoding with carried state).
        extra: facts other passes read by name: ``out_shape(params, ctx, in_shape)`` for
            embeddings and heads whose output is not ``[batch, seq, d_model]``,
            ``flops_counts`` (a note on what the FLOPs rule counts; read by no pass),
            ``flops_exact: True`` (the FLOPs rule equals ``torch.utils.flop_counter``'s count
            of the module, matmul-class operations only — tested for every such kind).
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
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def param_free(self) -> bool:
        """True when the kind has no weights under its default parameters."""
        try:
            return self.n_params(self.params(), BuildContext(d_model=64, vocab_size=16)) == 0
        except Exception:  # noqa: BLE001 - params without defaults are not free
            return False


_REGISTRY: dict[str, BlockKind] = {}


def register(kind: BlockKind) -> BlockKind:
    """Add a kind to the registry. Raises ``ValueError`` on a duplicate name or bad role."""
    if kind.name in _REGISTRY:
        raise ValueError(f"block kind '{kind.name}' is registered twice")
    if kind.role not in ROLES:
        raise ValueError(f"block kind '{kind.name}' has unknown role '{kind.role}'")
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
    return [k.name for k in kinds(role)]
