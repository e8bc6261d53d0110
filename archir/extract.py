"""MatFormer extraction: a trained model with ``matformer`` FFNs -> a smaller concrete spec
plus weights, at one granularity or a per-block mix ("Mix'n'Match"), without retraining
(Devvrit, Kudugunta et al., 2023, "MatFormer: Nested Transformer for Elastic Inference").

The extracted spec replaces every ``matformer`` block by the plain kind it nests
(``swiglu``/``geglu`` when gated with ``silu``/``gelu``, else ``mlp``) with ``d_ff`` the
granularity's width; its weights are the first ``d_ff_g`` rows of the input projections
(and their biases) and the first ``d_ff_g`` columns of the output projection. Its logits equal
the nested forward at that granularity (same operations) and it is costed as its own
concrete kinds.

A per-block mix gives one granularity per distinct ``matformer`` module in model order
(:func:`archir.blocks.mlp.matformer_modules`: a block whose weights a layer group shares is
one module). A repeated layer group whose repeats get different granularities is written as
one group per repeat.
"""

from __future__ import annotations

import copy
import json
import os
import stat
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from archir.errors import ArchirError, Location

#: the manifest an extraction writes last into its folder (marks the folder's files as ours)
MANIFEST = "extract.json"
FORMAT = "archir-extract"
#: the files an extraction writes
FILES = ("spec.yaml", "model.safetensors", MANIFEST)


class ExtractError(ArchirError):
    """A run that cannot be extracted from, or a granularity it was not trained with."""


@dataclass
class Source:
    """A trained run read back: its spec, the compiled model with its weights, the folder."""

    spec: Any
    model: Any
    folder: Path


def load_run(path: str | os.PathLike[str]) -> Source:
    """Read a trained run: a folder (or a file in it) holding ``spec.yaml`` and either
    ``model.safetensors`` (``archir train``, a search's ``best/``) or a checkpoint
    (``checkpoint.json`` + ``checkpoint-<step>.safetensors``). No pickle is ever loaded.

    Raises:
        ExtractError: no such folder, no ``spec.yaml``, no weights, or weights that do not
            fit the spec; SpecError/GraphError: the spec does not load; TrainingError: a
            torn or pickle checkpoint.
    """
    from archir.compiler import compile as compile_spec
    from archir.spec import load_spec

    p = Path(path)
    folder = p.parent if p.is_file() else p
    if not folder.is_dir():
        raise ExtractError(
            f"'{path}' is not a run folder", hint="give the folder `archir train` wrote"
        )
    spec_file = folder / "spec.yaml"
    if not spec_file.is_file():
        raise ExtractError(
            f"'{folder}' has no spec.yaml",
            hint="give the folder `archir train` (or a search's best/) wrote",
        )
    spec = load_spec(spec_file)
    model = compile_spec(spec)
    weights = folder / "model.safetensors"
    if weights.is_file() and not weights.is_symlink():
        _load_safetensors(model, weights)
    else:
        from archir.train import CHECKPOINT, load_checkpoint

        loaded = load_checkpoint(folder)
        if loaded is None:
            raise ExtractError(
                f"'{folder}' has neither model.safetensors nor {CHECKPOINT}",
                hint="train the spec first (archir train --out FOLDER)",
            )
        tensors = {k[6:]: v for k, v in loaded[1].items() if k.startswith("model.")}
        try:
            model.load_state_dict(tensors, strict=True)
        except RuntimeError as exc:
            raise ExtractError(
                f"the checkpoint in '{folder}' does not fit its spec.yaml: "
                f"{str(exc).splitlines()[0][:200]}"
            ) from None
    return Source(spec, model.eval(), folder)


def _load_safetensors(model: torch.nn.Module, path: Path) -> None:
    from safetensors.torch import load_model

    if not stat.S_ISREG(os.stat(path).st_mode):
        raise ExtractError(f"'{path}' is not a regular file")
    try:
        load_model(model, str(path), strict=True)
    except Exception as exc:  # noqa: BLE001 - safetensors raises several types
        first = " ".join(str(exc).split())[:300]
        raise ExtractError(f"weights '{path}' do not fit spec.yaml beside them: {first}") from None


def _owners(model: Any) -> list[Any]:
    """The IR nodes of the distinct matformer modules, in model order."""
    return [
        n for n in model.graph if n.op == "block" and n.kind == "matformer" and n.weights_of is None
    ]


def resolve_mix(spec: Any, model: Any, granularity: float | Sequence[float]) -> list[float]:
    """One granularity per distinct matformer module of ``model``.

    Args:
        granularity: one fraction for every block, or one per block in model order.

    Raises:
        ExtractError: the model has no matformer blocks (located at the spec file); a list
            of the wrong length; a granularity a block was not trained with (located at
            that block's ``granularities``).
    """
    owners = _owners(model)
    if not owners:
        raise ExtractError(
            f"'{spec.name}' has no matformer blocks: there is nothing to extract",
            Location(file=spec.file, field="model.layers"),
            "train a spec whose channel mixers are kind: matformer (specs/zoo/matformer.yaml)",
        )
    if isinstance(granularity, int | float):
        gs = [float(granularity)] * len(owners)
    else:
        gs = [float(g) for g in granularity]
        if len(gs) != len(owners):
            raise ExtractError(
                f"{len(gs)} granularities given, the model has {len(owners)} matformer "
                "blocks (give one for all, or one per block in model order)",
                Location(file=spec.file, field="model.layers"),
            )
    for n, g in zip(owners, gs):
        if g not in n.params.granularities:
            raise ExtractError(
                f"granularity {g:g} of block '{n.name}' is not one it was trained with: "
                f"{n.params.granularities}",
                model.graph.locate(n, "granularities"),
                "pick one of the trained granularities",
            )
    return gs


def _plain_block(block: dict[str, Any], params: Any, width: int) -> dict[str, Any]:
    from archir.blocks.mlp import MATFORMER_GLU_KINDS
    from archir.spec.models import COMMON_BLOCK_KEYS

    out = {k: v for k, v in block.items() if k in COMMON_BLOCK_KEYS}
    if params.gated:
        out["kind"] = MATFORMER_GLU_KINDS[params.activation]
    else:
        out["kind"] = "mlp"
        out["activation"] = params.activation
    out["d_ff"] = width
    if params.bias:
        out["bias"] = True
    return out


def _tag(gs: list[float]) -> str:
    if len(set(gs)) == 1:
        return "g" + f"{gs[0]:g}".replace(".", "p")
    return "mix"


def extracted_spec(spec: Any, model: Any, gs: list[float]) -> Any:
    """The concrete spec of the sub-model at granularities ``gs`` (from
    :func:`resolve_mix`): matformer blocks become their plain kind with the smaller
    ``d_ff``; the name gets ``-g<granularity>`` (``-mix`` for a per-block mix).

    Raises:
        ExtractError: a mix that differs between repeats of a layer group whose blocks are
            named (the group cannot be split into one group per repeat).
    """
    from archir.blocks.mlp import matformer_widths
    from archir.spec import spec_from_dict

    owners = _owners(model)
    d = model.spec.model.d_model
    # (group, repeat) -> {block index: width}
    widths: dict[int, dict[int, dict[int, int]]] = {}
    reps: dict[tuple[int, int], int] = {}
    for n, g in zip(owners, gs):
        _, _, gi, _, bi = n.spec_path
        rep = reps.get((gi, bi), 0)
        reps[(gi, bi)] = rep + 1
        w = dict(zip(n.params.granularities, matformer_widths(n.params, d)))[g]
        widths.setdefault(gi, {}).setdefault(rep, {})[bi] = w
    data = copy.deepcopy(spec.data)
    layers: list[dict[str, Any]] = []
    for gi, group in enumerate(data["model"]["layers"]):
        per_rep = widths.get(gi)
        if per_rep is None:
            layers.append(group)
            continue
        params = {bi: model.spec.model.layers[gi].blocks[bi].params for bi in per_rep[0]}
        distinct = {tuple(sorted(v.items())) for v in per_rep.values()}
        if len(distinct) == 1:
            g2 = dict(group)
            g2["blocks"] = [
                _plain_block(b, params[bi], per_rep[0][bi]) if bi in per_rep[0] else b
                for bi, b in enumerate(group["blocks"])
            ]
            layers.append(g2)
            continue
        if any("name" in b for b in group["blocks"]):
            raise ExtractError(
                f"layer group {gi} repeats named blocks, so its repeats cannot get different "
                "granularities",
                Location(file=spec.file, field=f"model.layers.{gi}"),
                "give every repeat of this group the same granularity",
            )
        for rep in range(int(group.get("repeat", 1))):
            g2 = {k: v for k, v in group.items() if k != "repeat"}
            g2["blocks"] = [
                _plain_block(b, params[bi], per_rep[rep][bi]) if bi in per_rep[rep] else b
                for bi, b in enumerate(group["blocks"])
            ]
            layers.append(g2)
    data["model"]["layers"] = layers
    tag = _tag(gs)
    data["name"] = f"{str(data['name'])[: 63 - len(tag)]}-{tag}"
    return spec_from_dict(data)


@torch.no_grad()
def extract(
    spec: Any, model: Any, granularity: float | Sequence[float]
) -> tuple[Any, torch.nn.Module, list[float]]:
    """The sub-model of a trained MatFormer at ``granularity`` (one fraction, or one per
    matformer block in model order).

    Returns:
        ``(spec, model, granularities)``: the extracted concrete spec, its compiled module
        (eval mode) holding the sliced weights, and the granularity of each block.

    Raises:
        ExtractError: see :func:`resolve_mix` and :func:`extracted_spec`.
    """
    from archir.compiler import compile as compile_spec

    gs = resolve_mix(spec, model, granularity)
    sub_spec = extracted_spec(spec, model, gs)
    sub = compile_spec(sub_spec)
    src = model.state_dict()
    dst = sub.state_dict()
    if set(src) != set(dst):  # pragma: no cover - the plain kinds name weights alike
        raise AssertionError(f"state keys differ: {sorted(set(src) ^ set(dst))[:4]}")
    for k, t in dst.items():
        s = src[k]
        if s.shape != t.shape:
            s = s[tuple(slice(0, n) for n in t.shape)]
        t.copy_(s)
    return sub_spec, sub.eval(), gs


def check_out(out: str | os.PathLike[str]) -> Path:
    """``out`` checked before any work: a folder (or a place for one) where no file an
    extraction writes exists unless an earlier extraction wrote it (its ``extract.json``).

    Raises:
        PathError/ExtractError: not a writable folder, or it holds a ``spec.yaml`` or
            ``model.safetensors`` archir's extraction did not write.
    """
    from archir.paths import check_out_dir

    p = check_out_dir(out)
    ours = _is_ours(p / MANIFEST)
    for name in FILES:
        f = p / name
        if f.is_symlink() or (f.exists() and not f.is_file()):
            raise ExtractError(f"'{f}' exists and is not a regular file", hint="use another --out")
        if f.exists() and not ours:
            raise ExtractError(
                f"'{f}' exists and was not written by archir extract",
                hint="use another --out; archir overwrites only an extraction of its own",
            )
    return p


def _is_ours(man: Path) -> bool:
    try:
        if man.is_symlink() or not man.is_file() or man.stat().st_size > 1 << 20:
            return False
        doc = json.loads(man.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(doc, dict) and doc.get("format") == FORMAT


def write_extracted(
    out: Path, spec: Any, model: torch.nn.Module, info: dict[str, Any]
) -> dict[str, Any]:
    """Write ``spec.yaml``, ``model.safetensors`` and then ``extract.json`` (``info`` plus
    format, parameter count and FLOPs per token of the extracted spec) into ``out``,
    each atomically. Call :func:`check_out` first.

    Returns:
        The manifest written.
    """
    from safetensors.torch import save_model

    from archir.cost import analyze
    from archir.paths import write_file, write_text

    out.mkdir(parents=True, exist_ok=True)
    rep = analyze(spec)
    doc = {
        "format": FORMAT,
        "version": 1,
        **info,
        "name": spec.name,
        "params": rep.params,
        "flops_per_token": rep.flops_per_token,
    }
    write_text(out / "spec.yaml", spec.to_yaml())
    write_file(out / "model.safetensors", lambda tmp: save_model(model, tmp))
    write_text(out / MANIFEST, json.dumps(doc, indent=2))
    return doc


def parse_granularity(text: str) -> float | list[float]:
    """``"0.5"`` -> 0.5; ``"0.25,0.5,1,0.5"`` -> a per-block list.

    Raises:
        ValueError: not numbers in (0, 1].
    """
    parts = [t.strip() for t in text.split(",")]
    try:
        vals = [float(t) for t in parts]
    except ValueError:
        raise ValueError(f"expected a fraction or a comma-separated list, got {text!r}") from None
    if any(not 0 < v <= 1 for v in vals):
        raise ValueError(f"granularities are fractions in (0, 1], got {text!r}")
    return vals[0] if len(vals) == 1 else vals
