"""Import a Hugging Face model folder into archir, and export a spec back to one.

``import_hf(src, out)``: ``src/config.json`` + weights (``model.safetensors``, sharded
safetensors with their index, or ``pytorch_model.bin`` read with PyTorch's restricted
``weights_only`` unpickler, which builds tensors and nothing else) become ``out/spec.yaml``
(concrete, validates on its own; ``train.init: model.safetensors``, so training it goes on
from the imported weights) + ``out/model.safetensors`` (archir's state-dict names),
with the tokenizer files copied alongside and ``out/import.json`` recording the source and
the parity numbers. When ``transformers`` is installed the logits of both models on the same
tokens are compared first, and a mismatch above :data:`PARITY_RTOL` (relative to the largest
logit) is refused before anything is written.

``export_hf(spec, weights, out)``: a spec that maps onto a family becomes ``out/config.json``
+ ``out/model.safetensors`` that ``transformers`` loads (checked the same way).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import stat
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch

from archir.errors import ArchirError, InteropError, Location
from archir.interop.base import Family, HFConfig, families, family_of
from archir.paths import NAME_PATTERN, Created, check_out_dir, write_file, write_text
from archir.spec.models import SpecModel

#: largest relative logit difference (``max |ours − theirs| / max |theirs|``) accepted
PARITY_RTOL = 1e-4
#: a config.json larger than this is refused unread
MAX_CONFIG_BYTES = 4 * 2**20
#: tokenizer files copied beside the import (regular files only, each at most this big)
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "added_tokens.json",
    "generation_config.json",
)
MAX_TOKENIZER_BYTES = 256 * 2**20
_SHARD_RE = re.compile(r"^[A-Za-z0-9_.\-]{1,200}\.(safetensors|bin)$")


def _regular(p: Path) -> bool:
    """A regular file, not a link (a link could point anywhere)."""
    try:
        st = os.lstat(p)
    except OSError:
        return False
    return stat.S_ISREG(st.st_mode)


def read_config(src: Path) -> HFConfig:
    """``src/config.json`` as an :class:`HFConfig`.

    Raises:
        InteropError: not a folder, no config.json, too large, not a JSON object.
    """
    if not src.is_dir():
        raise InteropError(
            f"'{src}' is not a folder",
            hint="give a Hugging Face model folder (config.json + weights)",
        )
    p = src / "config.json"
    if not _regular(p):
        raise InteropError(
            f"'{src}' has no config.json (as a regular file)",
            hint="give a folder written by save_pretrained",
        )
    if p.stat().st_size > MAX_CONFIG_BYTES:
        raise InteropError(f"'{p}' is larger than {MAX_CONFIG_BYTES} bytes", Location(file=str(p)))
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InteropError(f"'{p}' is not valid JSON: {exc}"[:300], Location(file=str(p))) from None
    if not isinstance(data, dict):
        raise InteropError(f"'{p}' is not a JSON object", Location(file=str(p)))
    cfg = HFConfig(data, str(p))
    q = data.get("quantization_config")
    if q:
        raise InteropError(
            "the checkpoint is quantized (quantization_config): archir imports full-precision "
            "weights",
            cfg.where("quantization_config"),
            "import the unquantized model; archir export quantizes to int8/int4 itself",
        )
    return cfg


def _shards(src: Path, index: str) -> list[Path]:
    p = src / index
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
        names = sorted(set(data["weight_map"].values()))
    except Exception:  # noqa: BLE001 - any malformed index is the same user error
        raise InteropError(
            f"'{p}' is not a weight index (weight_map)", Location(file=str(p))
        ) from None
    for n in names:
        if not isinstance(n, str) or not _SHARD_RE.match(n):
            raise InteropError(
                f"'{p}' names a shard {n!r} that is not a plain file name in the folder"[:300],
                Location(file=str(p)),
            )
    return [src / n for n in names]


def weight_files(src: Path) -> list[Path]:
    """The checkpoint's weight files, safetensors preferred.

    Raises:
        InteropError: none found, or an index naming a missing or non-regular shard.
    """
    for single, index in (
        ("model.safetensors", "model.safetensors.index.json"),
        ("pytorch_model.bin", "pytorch_model.bin.index.json"),
    ):
        if _regular(src / single):
            return [src / single]
        if _regular(src / index):
            files = _shards(src, index)
            bad = [f.name for f in files if not _regular(f)]
            if bad:
                raise InteropError(f"'{src / index}' names missing shard(s): {', '.join(bad[:3])}")
            return files
    raise InteropError(
        f"'{src}' has no weights (model.safetensors, pytorch_model.bin or their sharded index)",
        hint="save the model with save_pretrained",
    )


def read_tensors(files: list[Path]) -> dict[str, torch.Tensor]:
    """Every tensor of the weight files, as float32 on the CPU (bf16/fp16 checkpoints are
    widened; archir trains and checks parity in fp32).

    ``.bin`` files are read with ``torch.load(weights_only=True)``: PyTorch's restricted
    unpickler, which rebuilds tensors and plain containers and refuses any other object.

    Raises:
        InteropError: an unreadable file, a non-tensor entry, or a name in two files.
    """
    out: dict[str, torch.Tensor] = {}
    for f in files:
        try:
            if f.suffix == ".safetensors":
                from safetensors.torch import load_file

                part = load_file(str(f))
            else:
                part = torch.load(str(f), map_location="cpu", weights_only=True, mmap=True)
        except Exception as exc:  # noqa: BLE001 - truncated, corrupt or refused by the unpickler
            raise InteropError(
                f"weights '{f}' cannot be read safely: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}"[
                    :400
                ],
                Location(file=str(f)),
            ) from None
        if not isinstance(part, dict):
            raise InteropError(f"weights '{f}' are not a dict of tensors", Location(file=str(f)))
        for k, v in part.items():
            if not isinstance(k, str) or not isinstance(v, torch.Tensor):
                raise InteropError(f"weights '{f}': entry {k!r} is not a tensor"[:300])
            if k in out:
                raise InteropError(f"tensor '{k}' appears in two weight files")
            out[k] = v.to(torch.float32) if v.is_floating_point() else v
    return out


def hf_to_archir(
    fam: Family, spec: SpecModel, tensors: dict[str, torch.Tensor], where: str
) -> dict[str, torch.Tensor]:
    """Map checkpoint tensors onto archir's state-dict names by the family's rules.

    Raises:
        InteropError: a tensor the rules need is missing or misshapen, or the checkpoint
            holds tensors no rule reads (the spec would silently drop part of the model).
    """
    rules = fam.rules(spec, set(tensors))
    out: dict[str, torch.Tensor] = {}
    used: set[str] = set()
    if spec.model.head.params.tie_embeddings:  # type: ignore[attr-defined]
        # a tied checkpoint may store the head too (torch.save of a state_dict); transformers
        # ties it to the embedding on load, and so does archir
        used.add("lm_head.weight")
    for r in rules:
        missing = [k for k in r.hf if k not in tensors]
        if missing:
            if all(fam.optional_hf(k) for k in missing):
                continue
            raise InteropError(
                f"{where}: tensor '{missing[0]}' is missing from the checkpoint",
                hint="the weights do not belong to this config",
            )
        try:
            vals = r.to_archir([tensors[k] for k in r.hf])
        except Exception as exc:  # noqa: BLE001 - a misshapen tensor
            raise InteropError(
                f"{where}: tensors {', '.join(r.hf)} have unexpected shapes "
                f"({', '.join(str(tuple(tensors[k].shape)) for k in r.hf)}): {exc}"[:400]
            ) from None
        used.update(r.hf)
        out.update(zip(r.archir, vals))
    extra = sorted(k for k in tensors if k not in used and not fam.unused_hf(k))
    if extra:
        raise InteropError(
            f"{where}: {len(extra)} checkpoint tensor(s) have no place in the archir model "
            f"(first: '{extra[0]}')",
            hint="the config does not describe these weights (a head or layer archir does not map)",
        )
    return out


def archir_to_hf(
    fam: Family, spec: SpecModel, state: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """The inverse map (export). Raises ``InteropError`` if a tensor the rules need is
    missing from ``state``."""
    out: dict[str, torch.Tensor] = {}
    for r in fam.rules(spec, None):
        missing = [k for k in r.archir if k not in state]
        if missing:
            raise InteropError(f"the model has no tensor '{missing[0]}'")
        vals = r.to_hf([state[k] for k in r.archir])
        out.update({k: v.contiguous() for k, v in zip(r.hf, vals)})
    return out


# -- parity with transformers ---------------------------------------------------------------


def have_transformers() -> bool:
    try:
        import transformers  # noqa: F401
    except ImportError:
        return False
    return True


def parity_tokens(vocab: int, max_len: int, seed: int = 0) -> torch.Tensor:
    """``[2, T]`` int64 token ids (T = min(64, max_len)): one row of real text (the bytes
    of a fixed English sentence, mod vocab) and one of seeded random ids."""
    T = min(64, max_len)
    text = b"The quick brown fox jumps over the lazy dog; def f(x): return x * 2 + 1. " * 2
    row0 = torch.tensor(list(text[:T]), dtype=torch.long) % vocab
    g = torch.Generator().manual_seed(seed)
    row1 = torch.randint(0, vocab, (T,), generator=g)
    return torch.stack([row0, row1])


def hf_model(folder: Path) -> torch.nn.Module:
    """Load a folder with ``transformers`` (local files only, no remote code), fp32, eval.

    Raises:
        InteropError: transformers cannot load it.
    """
    import transformers

    transformers.logging.set_verbosity_error()  # no config warnings, no progress bars
    transformers.logging.disable_progress_bar()
    try:
        try:
            model = transformers.AutoModelForCausalLM.from_pretrained(
                str(folder), local_files_only=True, trust_remote_code=False, dtype=torch.float32
            )
        except TypeError:  # transformers < 4.56 names it torch_dtype
            model = transformers.AutoModelForCausalLM.from_pretrained(
                str(folder),
                local_files_only=True,
                trust_remote_code=False,
                torch_dtype=torch.float32,
            )
    except Exception as exc:  # noqa: BLE001 - transformers raises many types
        raise InteropError(
            f"transformers cannot load '{folder}': {str(exc).splitlines()[0] if str(exc) else exc!r}"[
                :400
            ]
        ) from None
    return model.eval()


@dataclass
class Parity:
    """Logit agreement of archir and transformers on the same tokens.

    ``max_abs``: largest absolute logit difference; ``rel``: that divided by the largest
    absolute transformers logit; ``argmax_agree``: fraction of positions whose top token
    is the same.
    """

    max_abs: float
    rel: float
    argmax_agree: float
    tokens: list[int] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.rel <= PARITY_RTOL

    def to_dict(self) -> dict[str, Any]:
        return {
            "max_abs": self.max_abs,
            "rel": self.rel,
            "argmax_agree": self.argmax_agree,
            "rtol": PARITY_RTOL,
            "tokens_shape": self.tokens,
        }


@torch.no_grad()
def parity(ours: torch.nn.Module, theirs: torch.nn.Module, vocab: int, max_len: int) -> Parity:
    tokens = parity_tokens(vocab, max_len)
    ours.eval()
    a = ours(tokens).float()
    b = theirs(input_ids=tokens).logits.float()
    diff = float((a - b).abs().max())
    scale = float(b.abs().max()) or 1.0
    agree = float((a.argmax(-1) == b.argmax(-1)).float().mean())
    return Parity(diff, diff / scale, agree, list(tokens.shape))


# -- import ---------------------------------------------------------------------------------


@dataclass
class ImportReport:
    family: str
    source: str
    out: str
    params: int
    parity: Parity | None
    tokenizer_files: list[str]
    note: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {
            "family": self.family,
            "source": self.source,
            "out": self.out,
            "params": self.params,
            "parity": self.parity.to_dict() if self.parity else None,
            "tokenizer_files": self.tokenizer_files,
            "note": self.note,
        }

    def __str__(self) -> str:
        lines = [
            f"imported {self.family} from {self.source}: {self.params:,} parameters",
            f"  wrote {self.out}/spec.yaml, {self.out}/model.safetensors"
            + (
                f" and {len(self.tokenizer_files)} tokenizer file(s)"
                if self.tokenizer_files
                else ""
            ),
        ]
        if self.parity is not None:
            p = self.parity
            lines.append(
                f"  parity with transformers: max |Δlogit| {p.max_abs:.2e} (relative {p.rel:.2e} "
                f"<= {PARITY_RTOL:g}), top-1 agreement {p.argmax_agree:.3f}"
            )
        if self.note:
            lines.append(f"  note: {self.note}")
        return "\n".join(lines)


def _spec_name(src: Path, family: str, name: str | None) -> str:
    if name is not None:
        if not re.fullmatch(NAME_PATTERN, name):
            raise InteropError(
                f"--name {name!r} is not a valid spec name"[:200], hint="letters, digits, - and _"
            )
        return name
    base = re.sub(r"[^A-Za-z0-9_\-]+", "-", src.resolve().name).strip("-_")[:64]
    return base if base and re.fullmatch(NAME_PATTERN, base) else family


def import_hf(
    src: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    check: bool = True,
    name: str | None = None,
) -> ImportReport:
    """Import a Hugging Face causal-LM folder (see the module docstring).

    Args:
        src: the folder (``config.json`` + weights [+ tokenizer files]).
        out: where ``spec.yaml``, ``model.safetensors``, ``import.json`` and the tokenizer
            files go (created if missing; only these files are written).
        check: compare logits with ``transformers`` when it is installed (refuse above
            :data:`PARITY_RTOL`).
        name: the spec's ``name`` (default: the folder's name, made valid).

    Raises:
        InteropError: an unknown family, a config field without archir equivalent (located
            in config.json), weights that do not fit, a parity failure.
        BudgetError: the model is larger than ``ARCHIR_MAX_PARAMS`` (before loading weights).
    """
    from archir.compiler import compile
    from archir.cost import check_budget
    from archir.ir import build_graph
    from archir.spec.loader import spec_from_dict

    src_p, out_p = Path(src), Path(out)
    check_out_dir(out_p)
    if out_p.exists() and src_p.exists() and out_p.resolve() == src_p.resolve():
        raise InteropError(
            f"--out '{out_p}' is the folder being imported: its model.safetensors would be "
            "replaced",
            hint="give another output folder",
        )
    cfg = read_config(src_p)
    fam = family_of(cfg)
    data = fam.to_spec(cfg)
    unread = cfg.unread(fam.ignored)
    if unread:
        raise InteropError(
            f"config field(s) {', '.join(repr(k) for k in unread[:6])} have no archir "
            f"equivalent in the {fam.name} mapping",
            cfg.where(unread[0]),
            "archir refuses what it cannot reproduce; remove the field if it is inert",
        )
    data["name"] = _spec_name(src_p, fam.name, name)
    data["description"] = f"imported from the Hugging Face {fam.name} model '{src_p.name}'"
    # training the imported spec goes on from the imported weights (relative to the spec)
    data["train"] = {"task": "text:pydoc", "init": "model.safetensors"}
    if _regular(src_p / "tokenizer.json") and data["model"]["vocab_size"] != 256:
        # a model with its own vocabulary trains on text through its own tokenizer (copied
        # beside the spec); a byte-level model (vocabulary 256) needs none
        tok = (out_p / "tokenizer.json").resolve()
        data["train"]["task_options"] = {"tokenizer": str(tok)}
    spec = spec_from_dict(data)
    check_budget(build_graph(spec))
    tensors = read_tensors(weight_files(src_p))
    state = hf_to_archir(fam, spec.model, tensors, str(src_p))
    del tensors
    model = compile(spec)
    _load_exact(model, state, str(src_p))
    par = None
    note = ""
    if check and have_transformers():
        mm = spec.model.model
        par = parity(model, hf_model(src_p), mm.vocab_size, mm.max_seq_len)
        if not par.ok:
            raise InteropError(
                f"archir's {fam.name} model does not match transformers on '{src_p}': max "
                f"|Δlogit| {par.max_abs:.3g}, relative {par.rel:.3g} > {PARITY_RTOL:g}",
                hint="nothing was written; report the config (a field archir reads differently)",
            )
    elif check:
        note = "transformers is not installed: logits were not compared (pip install archir[hf])"
    created = Created()
    try:
        created.mkdir(out_p)
        from safetensors.torch import save_model

        for f in ("spec.yaml", "model.safetensors", "import.json", *TOKENIZER_FILES):
            if not (out_p / f).exists():  # removed again if the import fails from here on
                created.file(out_p / f)
        write_text(out_p / "spec.yaml", spec.to_yaml())
        write_file(out_p / "model.safetensors", lambda tmp: save_model(model, tmp))
        copied = _copy_tokenizer(src_p, out_p)
        report = ImportReport(fam.name, str(src_p), str(out_p), _n_params(model), par, copied, note)
        write_text(out_p / "import.json", json.dumps(report.to_dict(), indent=2))
    except BaseException:
        created.undo()
        raise
    return report


def _n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _load_exact(
    model: torch.nn.Module,
    state: dict[str, torch.Tensor],
    where: str,
    hint: str = "the weights do not match config.json",
) -> None:
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    if missing:
        raise InteropError(f"{where}: the mapping gives no value for '{missing[0]}'")
    for k, v in state.items():
        if k not in own:
            raise InteropError(f"{where}: the mapping writes '{k}', which the model lacks")
        if tuple(own[k].shape) != tuple(v.shape):
            raise InteropError(
                f"{where}: '{k}' is {tuple(v.shape)} in the checkpoint, "
                f"{tuple(own[k].shape)} in the spec",
                hint=hint,
            )
    model.load_state_dict(state, strict=True)


def _copy_to(src: Path, tmp: str) -> None:
    shutil.copyfile(src, tmp)


def _copy_tokenizer(src: Path, out: Path) -> list[str]:
    copied = []
    for n in TOKENIZER_FILES:
        p = src / n
        if _regular(p) and p.stat().st_size <= MAX_TOKENIZER_BYTES:
            write_file(out / n, partial(_copy_to, p))
            copied.append(n)
    return copied


# -- export ---------------------------------------------------------------------------------


def family_for_spec(spec: SpecModel) -> tuple[Family, dict[str, Any]]:
    """The first family whose ``to_config`` accepts the spec, and that config.

    Raises:
        InteropError: no family does; the message gives each family's reason.
    """
    reasons = []
    for fam in families():
        try:
            return fam, fam.to_config(spec)
        except ArchirError as exc:
            reasons.append(f"{fam.name}: {exc.message.removeprefix(f'not a {fam.name} model: ')}")
    raise InteropError(
        f"'{spec.name}' maps onto no Hugging Face family: " + "; ".join(reasons),
        hint="--format hf writes Llama, Mistral, Qwen2, Mixtral, GPT-2, Mamba and RWKV-4 "
        "shaped specs",
    )


@dataclass
class HFExportReport:
    family: str
    out: str
    params: int
    parity: Parity | None
    note: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {
            "family": self.family,
            "out": self.out,
            "params": self.params,
            "parity": self.parity.to_dict() if self.parity else None,
            "note": self.note,
        }

    def __str__(self) -> str:
        s = f"wrote a Hugging Face {self.family} folder {self.out} ({self.params:,} parameters)"
        if self.parity is not None:
            s += (
                f"\n  transformers loads it: max |Δlogit| {self.parity.max_abs:.2e} (relative "
                f"{self.parity.rel:.2e}), top-1 agreement {self.parity.argmax_agree:.3f}"
            )
        if self.note:
            s += f"\n  note: {self.note}"
        return s


def export_hf(
    spec: Any, out: str | os.PathLike[str], *, weights: str | None = None, check: bool = True
) -> HFExportReport:
    """Write ``out/config.json`` + ``out/model.safetensors`` for a spec of a known family.

    Args:
        spec: a concrete :class:`~archir.spec.loader.Spec`.
        weights: archir safetensors for it (``None``: the spec's fresh initialization).
        check: load the folder with ``transformers`` (when installed) and compare logits;
            a mismatch removes what was written and raises.

    Raises:
        InteropError: the spec maps onto no family, weights that do not fit the spec,
            ``out`` holding those weights, a parity failure.
    """
    from safetensors.torch import save_file

    from archir.compiler import compile

    sm: SpecModel = spec.model if not isinstance(spec, SpecModel) else spec
    fam, config = family_for_spec(sm)
    out_p = Path(out)
    check_out_dir(out_p)
    if weights is not None and out_p.exists() and Path(weights).resolve().parent == out_p.resolve():
        raise InteropError(
            f"--out '{out_p}' holds the weights being exported ({weights}): they would be "
            "replaced by the Hugging Face layout",
            hint="give another output folder",
        )
    model = compile(spec)
    note = ""
    if weights is not None:
        _load_exact(
            model,
            read_tensors([_weights_file(weights)]),
            str(weights),
            hint="give the model.safetensors saved beside this spec",
        )
    else:
        note = "weights: random (untrained)"
    hf_state = archir_to_hf(fam, sm, {k: v.detach() for k, v in model.state_dict().items()})
    created = Created()
    try:
        created.mkdir(out_p)
        for f in ("config.json", "model.safetensors"):
            if not (out_p / f).exists():  # removed again if the export fails from here on
                created.file(out_p / f)
        write_text(out_p / "config.json", json.dumps(config, indent=2, sort_keys=True) + "\n")
        write_file(
            out_p / "model.safetensors",
            lambda tmp: save_file(hf_state, tmp, metadata={"format": "pt"}),
        )
        par = None
        if check and have_transformers():
            par = parity(model, hf_model(out_p), sm.model.vocab_size, sm.model.max_seq_len)
            if not par.ok:
                raise InteropError(
                    f"transformers' {fam.name} model does not reproduce '{sm.name}': max "
                    f"|Δlogit| {par.max_abs:.3g}, relative {par.rel:.3g} > {PARITY_RTOL:g}",
                    hint="nothing was kept; the spec uses an option the family maps differently",
                )
        elif check:
            note = (note + "; " if note else "") + (
                "transformers is not installed: logits were not compared (pip install archir[hf])"
            )
    except BaseException:
        created.undo()
        raise
    return HFExportReport(fam.name, str(out_p), _n_params(model), par, note)


def _weights_file(weights: str) -> Path:
    p = Path(weights)
    if not _regular(p) or p.suffix != ".safetensors":
        raise InteropError(
            f"weights '{p}' are not a .safetensors file", hint="give archir's model.safetensors"
        )
    return p
