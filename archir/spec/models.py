"""Typed models of a *concrete* spec (pydantic v2).

The grammar::

    archir: 1
    name: transformer
    model:
      task: causal_lm            # causal_lm | seq_classification | image_classification
      vocab_size: 256
      d_model: 256
      max_seq_len: 512
      norm: rmsnorm             # default norm kind for every block
      embed: {kind: token_embedding}
      layers:                   # layer groups, each repeated
        - repeat: 6
          share_weights: false  # one set of weights reused by every repeat (Universal Transformer)
          residual: pre_norm    # pre_norm | post_norm | peri_norm | parallel
          # d_model: 32         # vision stages: this group's width, entered through
          # downsample: {kind: downsample, stride: 2}   # a layer that shrinks the token grid
          blocks:
            - {kind: attention, n_heads: 4, pos: rope}
            - {kind: swiglu, expansion: 2.667}
      head: {kind: lm_head, tie_embeddings: true}
    train: {...}
    search: {...}

Each block's own keys (``n_heads``, ``d_state`` ...) are validated by its kind's parameter
model from the registry; common keys (``role``, ``name``, ``inputs``, ``merge``, ``norm``,
``bits``, ``residual``, ``residual_scale``) are defined here.

Values are strict (see :mod:`archir.spec.sections`): ``archir`` is exactly the integer ``1``;
``name`` is an identifier (:data:`archir.paths.NAME_PATTERN`: it becomes a folder name);
sizes have upper bounds (``d_model`` <= :data:`MAX_D_MODEL` ...) and a model has at most
:data:`MAX_BLOCKS` blocks once every layer group is repeated.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, field_validator

from archir.paths import NAME_PATTERN
from archir.registry import ALLOWED_BITS, MAX_DIM, KindParams
from archir.spec.sections import MAX_SEQ_LEN, SearchSection, Strict, TrainSection

#: Largest residual width.
MAX_D_MODEL = MAX_DIM
#: Largest vocabulary and number of classes.
MAX_VOCAB = 1 << 24
#: Largest image side (pixels) and number of image channels.
MAX_IMAGE_SIZE = 16_384
MAX_CHANNELS = 4096
#: Most times a layer group may be repeated.
MAX_REPEAT = 1024
#: Most blocks in a model once every layer group is repeated.
MAX_BLOCKS = 4096
#: A block's ``name`` (and what ``inputs`` may name: block names and ``embed``).
BLOCK_NAME = r"^[A-Za-z_][A-Za-z0-9_\-]*$"

Task = Literal["causal_lm", "seq_classification", "image_classification"]
Residual = Literal["pre_norm", "post_norm", "peri_norm", "parallel"]
Merge = Literal["sum", "mean", "weighted"]

COMMON_BLOCK_KEYS = frozenset(
    {"role", "kind", "name", "inputs", "merge", "norm", "bits", "residual", "residual_scale"}
)


def _check_bits(v: float | None) -> float | None:
    if v is not None and float(v) not in ALLOWED_BITS:
        allowed = ", ".join(str(b) for b in ALLOWED_BITS)
        raise ValueError(f"bits must be one of {allowed}")
    return v


class BlockSpec(BaseModel):
    """One block instance of a layer group; the kind's own parameters sit beside these keys.

    ``role`` may be omitted (it follows from ``kind``). ``name`` makes the output addressable
    by later blocks' ``inputs``; ``inputs`` replaces the default input (the previous block's
    output) by a merge of named outputs (``sum``, ``mean`` or a learned softmax-``weighted``
    average, as in DenseFormer). ``norm`` overrides the model's default norm kind
    (``none`` for no norm). ``residual: false`` drops the skip connection.
    ``residual_scale`` multiplies the branch (0.5 for Macaron half-step FFNs).
    """

    model_config = ConfigDict(extra="allow", strict=True, allow_inf_nan=False)

    role: str | None = None
    kind: str
    name: str | None = Field(None, pattern=BLOCK_NAME)
    inputs: list[Annotated[str, Field(pattern=BLOCK_NAME)]] | None = Field(
        None, min_length=1, max_length=MAX_BLOCKS
    )
    merge: Merge = "sum"
    norm: str | None = None
    bits: float | None = None
    residual: bool = True
    residual_scale: float = 1.0

    _params: KindParams | None = PrivateAttr(default=None)

    _bits = field_validator("bits")(_check_bits)

    @property
    def params(self) -> KindParams:
        assert self._params is not None, "block params not validated"
        return self._params

    def kind_params(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


class ComponentSpec(BaseModel):
    """An embedding or a head: ``kind`` plus that kind's parameters."""

    model_config = ConfigDict(extra="allow", strict=True, allow_inf_nan=False)
    kind: str
    bits: float | None = None
    _params: KindParams | None = PrivateAttr(default=None)
    _bits = field_validator("bits")(_check_bits)

    @property
    def params(self) -> KindParams:
        assert self._params is not None, "params not validated"
        return self._params

    def kind_params(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


class LayerGroup(Strict):
    """``blocks`` applied in order, the whole group repeated ``repeat`` times.

    A group can start a **stage** of a vision hierarchy (PoolFormer, ConvFormer, CAFormer,
    EdgeNeXt): ``downsample`` (a component of a kind that downsamples: ``downsample`` —
    a strided convolution —, ``patch_merging``) runs once before the group's first
    repeat, shrinking the image's token grid and changing the width to the group's
    ``d_model`` (default: the width before it); every block of the group, and of later
    groups until the next ``d_model``, works at that width. ``d_model`` that differs from
    the width before the group without a ``downsample`` is an error (a residual cannot add
    two widths), and so is a ``downsample`` in a model whose tokens are not an image's grid.
    See :mod:`archir.blocks.vision`.
    """

    repeat: int = Field(1, ge=1, le=MAX_REPEAT)
    share_weights: bool = False
    residual: Residual = "pre_norm"
    d_model: int | None = Field(None, gt=0, le=MAX_D_MODEL)
    downsample: ComponentSpec | None = None
    blocks: list[BlockSpec] = Field(min_length=1)


class ModelSpec(Strict):
    task: Task = "causal_lm"
    vocab_size: int = Field(0, ge=0, le=MAX_VOCAB)
    n_classes: int = Field(0, ge=0, le=MAX_VOCAB)
    image_size: int = Field(0, ge=0, le=MAX_IMAGE_SIZE)
    channels: int = Field(1, ge=1, le=MAX_CHANNELS)
    d_model: int = Field(gt=0, le=MAX_D_MODEL)
    max_seq_len: int = Field(2048, gt=0, le=MAX_SEQ_LEN)
    norm: str = "rmsnorm"
    final_norm: str | None = None
    #: epsilon of every norm the model builds (block norms and the final norm); ``null``:
    #: each norm kind's default (1e-5). Llama and Mistral use 1e-6.
    norm_eps: float | None = Field(None, gt=0, lt=1)
    bits: float = 16
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    embed: ComponentSpec
    layers: list[LayerGroup] = Field(min_length=1)
    head: ComponentSpec

    _bits = field_validator("bits")(_check_bits)

    @field_validator("layers")
    @classmethod
    def _block_count(cls, layers: list[LayerGroup]) -> list[LayerGroup]:
        n = sum(len(g.blocks) * g.repeat for g in layers)
        if n > MAX_BLOCKS:
            raise ValueError(
                f"the model has {n} blocks once layer groups are repeated, "
                f"over the limit of {MAX_BLOCKS}"
            )
        return layers


class SpecModel(Strict):
    """A whole concrete spec file."""

    archir: Literal[1] = 1
    name: str = Field(json_schema_extra={"pattern": NAME_PATTERN})
    description: str | None = None
    model: ModelSpec
    train: TrainSection = Field(default_factory=TrainSection)
    search: SearchSection | None = None

    @field_validator("archir", mode="before")
    @classmethod
    def _version(cls, v: Any) -> Any:
        if type(v) is not int or v != 1:  # not True, not 1.0, not "1"
            raise ValueError("must be 1")
        return v

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not re.fullmatch(NAME_PATTERN, v):
            raise ValueError("must be a valid name")
        return v
