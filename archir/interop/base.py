"""What every model family's mapping shares: reading a Hugging Face ``config.json`` field by
field (so that a field archir cannot honour is refused, located), tensor rules that map
weights in both directions, and the family registry.

A family module (``archir/interop/llama.py`` ...) registers a :class:`Family`: which
``architectures`` / ``model_type`` it reads, how a config becomes a concrete spec, the
:class:`Rule` list that maps the checkpoint's tensors onto the compiled model's
``state_dict`` (and back), and how a spec maps back onto a config (``to_config``, which
raises :class:`~archir.errors.InteropError` when the spec is not of the family).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch

from archir.errors import InteropError, Location, did_you_mean
from archir.spec.models import SpecModel

Tensor = torch.Tensor

#: config fields that never change what a model computes at inference (bookkeeping, token
#: ids, training-only dropout, generation and caching switches, tokenizer and hub metadata)
COMMON_IGNORED = frozenset(
    {
        "_name_or_path",
        "architectures",
        "model_type",
        "transformers_version",
        "torch_dtype",
        "dtype",
        "bos_token_id",
        "eos_token_id",
        "pad_token_id",
        "sep_token_id",
        "decoder_start_token_id",
        "initializer_range",
        "use_cache",
        "return_dict",
        "output_hidden_states",
        "output_attentions",
        "torchscript",
        "id2label",
        "label2id",
        "problem_type",
        "tokenizer_class",
        "prefix",
        "task_specific_params",
        "attention_dropout",
        "tie_word_embeddings",  # read by every family that can tie; harmless where it cannot
        "chunk_size_feed_forward",
        "is_encoder_decoder",
        "is_decoder",
        "add_cross_attention",
        "cross_attention_hidden_size",
        "finetuning_task",
        "quantization_config",  # refused below when it says the weights are quantized
        "_attn_implementation_autoset",
        "auto_map",
        "pretraining_tp",  # a tensor-parallel training detail; the function is the same
    }
)

_MISSING = object()


class HFConfig:
    """A Hugging Face ``config.json``, read field by field.

    ``get`` records each field it reads; :meth:`unread` lists the fields no mapping read
    (and that :data:`COMMON_IGNORED` / the family's own ignore list do not cover), which
    the importer refuses: a field archir does not read may change the function.
    """

    def __init__(self, data: dict[str, Any], file: str) -> None:
        self.data = data
        self.file = file
        self.read: set[str] = set()

    def where(self, key: str) -> Location:
        return Location(file=self.file, field=key)

    def has(self, key: str) -> bool:
        return key in self.data and self.data[key] is not None

    def get(self, key: str, default: Any = _MISSING, kind: type | tuple[type, ...] = int) -> Any:
        """The value of ``key`` (``default`` when absent or null), checked to be of
        ``kind`` (bools are not ints; ints are accepted where a float is expected).

        Raises:
            InteropError: absent without a default, or of the wrong type.
        """
        self.read.add(key)
        v = self.data.get(key)
        if v is None:
            if default is _MISSING:
                raise InteropError(
                    f"config field '{key}' is missing", self.where(key), "a complete config.json"
                )
            return default
        kinds = kind if isinstance(kind, tuple) else (kind,)
        ok = isinstance(v, kinds) and not (isinstance(v, bool) and bool not in kinds)
        if not ok and float in kinds and isinstance(v, int) and not isinstance(v, bool):
            return float(v)
        if not ok:
            names = " or ".join(k.__name__ for k in kinds)
            raise InteropError(
                f"config field '{key}' should be {names}, got {v!r}"[:300], self.where(key)
            )
        return v

    def size(self, key: str, default: Any = _MISSING, *, lo: int = 1, hi: int = 1 << 24) -> Any:
        """An integer size within ``[lo, hi]``."""
        v = self.get(key, default, int)
        if v is not None and not lo <= v <= hi:
            raise InteropError(
                f"config field '{key}' is {v}, outside [{lo}, {hi}]", self.where(key)
            )
        return v

    def expect(self, key: str, allowed: Iterable[Any], default: Any, why: str) -> Any:
        """``key``'s value, refused unless it is one of ``allowed``; ``why`` says what
        another value would mean."""
        v = self.get(key, default, (str, int, float, bool))
        allowed = list(allowed)
        if v not in allowed:
            raise InteropError(
                f"config field '{key}' is {v!r}: {why}; archir supports "
                + ", ".join(repr(a) for a in allowed),
                self.where(key),
                "this checkpoint cannot be imported faithfully",
            )
        return v

    def refuse(self, key: str, why: str, hint: str | None = None) -> InteropError:
        return InteropError(f"config field '{key}': {why}", self.where(key), hint)

    def unread(self, ignored: Iterable[str] = ()) -> list[str]:
        skip = COMMON_IGNORED | set(ignored) | self.read
        return sorted(k for k in self.data if k not in skip)


def _same(ts: list[Tensor]) -> list[Tensor]:
    return ts


@dataclass(frozen=True)
class Rule:
    """Tensors ``hf`` of the checkpoint are ``archir`` tensors of the compiled model.

    ``to_archir(hf tensors) -> archir tensors`` and ``to_hf`` (its inverse) default to the
    identity (one tensor each side, same layout).
    """

    archir: tuple[str, ...]
    hf: tuple[str, ...]
    to_archir: Callable[[list[Tensor]], list[Tensor]] = _same
    to_hf: Callable[[list[Tensor]], list[Tensor]] = _same


def copy(archir_key: str, hf_key: str) -> Rule:
    return Rule((archir_key,), (hf_key,))


def transposed(archir_key: str, hf_key: str) -> Rule:
    """A matrix stored transposed (GPT-2's ``Conv1D``: ``[in, out]``)."""
    t = lambda ts: [ts[0].t().contiguous()]  # noqa: E731
    return Rule((archir_key,), (hf_key,), t, t)


def reshaped(archir_key: str, hf_key: str, hf_shape: tuple[int, ...]) -> Rule:
    """The same values in another shape (RWKV's ``time_mix_* [1, 1, d]`` -> ``[d]``)."""
    return Rule(
        (archir_key,),
        (hf_key,),
        lambda ts: [ts[0].reshape(-1)],
        lambda ts: [ts[0].reshape(hf_shape)],
    )


@dataclass(frozen=True)
class Family:
    """A Hugging Face model family archir can import and export.

    Attributes:
        name: ``llama``, ``gpt2`` ...
        architectures: the ``architectures`` entries of its ``config.json``.
        model_type: its ``model_type``.
        paper: the source paper(s).
        to_spec: ``(config) -> spec dict`` (concrete; reads every field it honours).
        rules: ``(spec, hf_keys) -> [Rule]``: the tensor map for a spec of this family;
            ``hf_keys`` is the checkpoint's tensor names on import (to choose between
            storage layouts), ``None`` on export.
        to_config: ``(spec) -> config dict`` for export; raises ``InteropError`` when the
            spec does not map onto the family (the message says why).
        ignored: config fields of this family that do not change the function.
        optional_hf: checkpoint tensors that may be absent (a tied ``lm_head.weight``).
        unused_hf: checkpoint tensors that carry nothing archir needs (cached buffers).
    """

    name: str
    architectures: tuple[str, ...]
    model_type: str
    paper: str
    to_spec: Callable[[HFConfig], dict[str, Any]]
    rules: Callable[[SpecModel, set[str] | None], list[Rule]]
    to_config: Callable[[SpecModel], dict[str, Any]]
    ignored: frozenset[str] = frozenset()
    optional_hf: Callable[[str], bool] = lambda key: False
    unused_hf: Callable[[str], bool] = lambda key: False
    extra: dict[str, Any] = field(default_factory=dict)


_FAMILIES: dict[str, Family] = {}


def register(family: Family) -> Family:
    if family.name in _FAMILIES:
        raise ValueError(f"family '{family.name}' is registered twice")
    _FAMILIES[family.name] = family
    return family


def _load() -> None:
    import archir.interop.catalog  # noqa: F401  (registers every family)


def families() -> list[Family]:
    """Every registered family, in the order export tries them."""
    _load()
    return list(_FAMILIES.values())


def family_of(cfg: HFConfig) -> Family:
    """The family a config belongs to (by ``architectures``, else ``model_type``).

    Raises:
        InteropError: no registered family reads it.
    """
    _load()
    archs = cfg.data.get("architectures") or []
    if not isinstance(archs, list):
        archs = []
    for fam in _FAMILIES.values():
        if any(a in fam.architectures for a in archs if isinstance(a, str)):
            return fam
    mtype = cfg.data.get("model_type")
    for fam in _FAMILIES.values():
        if mtype == fam.model_type:
            if archs and not any(
                str(a).endswith("ForCausalLM") or a.endswith("LMHeadModel")
                for a in archs
                if isinstance(a, str)
            ):
                raise InteropError(
                    f"architectures {archs!r}: only causal language models import",
                    cfg.where("architectures"),
                    "save the model with its ...ForCausalLM class",
                )
            return fam
    known = sorted(a for f in _FAMILIES.values() for a in f.architectures)
    what = f"architectures {archs!r}" if archs else f"model_type {mtype!r}"
    raise InteropError(
        f"{what}: no archir family reads this model"[:300],
        cfg.where("architectures" if archs else "model_type"),
        (did_you_mean(str(mtype), [f.model_type for f in _FAMILIES.values()]) or "")
        + (" " if mtype else "")
        + "importable: "
        + ", ".join(known),
    )


# -- helpers the family modules share -------------------------------------------------------


def spec_params(spec: SpecModel) -> list[tuple[str, Any, Any]]:
    """``(kind, params, block spec)`` of every block in model order, layer groups repeated."""
    out = []
    for g in spec.model.layers:
        for _ in range(g.repeat):
            for b in g.blocks:
                out.append((b.kind, b.params, b))
    return out


def refuse_spec(family: str, why: str) -> InteropError:
    return InteropError(f"not a {family} model: {why}")


def lm_spec(
    cfg: HFConfig,
    *,
    d_model: int,
    max_seq_len: int,
    norm: str,
    norm_eps: float,
    layers: list[dict[str, Any]],
    tie: bool,
    pos: str = "none",
) -> dict[str, Any]:
    """The spec dict of an imported causal LM (its name and description are set by the
    importer): token embedding (``pos`` absolute positions), ``layers``, the final norm of
    kind ``norm``, an LM head (tied when ``tie``)."""
    embed: dict[str, Any] = {"kind": "token_embedding"}
    if pos != "none":
        embed["pos"] = pos
    return {
        "archir": 1,
        "name": "imported",
        "model": {
            "task": "causal_lm",
            "vocab_size": cfg.size("vocab_size"),
            "d_model": d_model,
            "max_seq_len": max_seq_len,
            "norm": norm,
            "norm_eps": norm_eps,
            "embed": embed,
            "layers": layers,
            "head": {"kind": "lm_head", "tie_embeddings": tie},
        },
    }


def check_plain_spec(spec: SpecModel, family: str, norm: str, pos: str = "none") -> None:
    """Refuse what no Hugging Face family writes: inputs/merges, shared weights, non
    pre-norm residuals, per-block bits; and a model norm other than ``norm`` or absolute
    positions other than ``pos`` (the family's).

    Raises:
        InteropError: naming the first such feature.
    """
    m = spec.model
    if m.task != "causal_lm":
        raise refuse_spec(family, f"model.task is {m.task} (only causal_lm)")
    if m.embed.kind != "token_embedding":
        raise refuse_spec(family, f"the embedding is {m.embed.kind}")
    if m.head.kind != "lm_head":
        raise refuse_spec(family, f"the head is {m.head.kind}")
    if m.norm != norm or (m.final_norm or m.norm) != norm:
        raise refuse_spec(family, f"its norm is {m.norm} ({norm} expected)")
    if m.embed.params.pos != pos:  # type: ignore[attr-defined]
        raise refuse_spec(family, f"its embedding positions are {m.embed.params.pos}, not {pos}")  # type: ignore[attr-defined]
    for gi, g in enumerate(m.layers):
        if g.share_weights:
            raise refuse_spec(family, f"layer group {gi} shares weights")
        if g.residual != "pre_norm":
            raise refuse_spec(family, f"layer group {gi} is {g.residual} (only pre_norm)")
        for b in g.blocks:
            if b.inputs or b.name:
                raise refuse_spec(family, f"a {b.kind} block has inputs/name (a graph)")
            if b.residual_scale != 1.0:
                raise refuse_spec(family, f"a {b.kind} block has residual_scale")
