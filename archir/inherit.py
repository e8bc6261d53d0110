"""Start a model from another model's trained weights (``train.init``): hybridizing an
imported checkpoint, shrinking it, or continuing from an earlier run.

Tensors are matched by their ``state_dict`` name (``blocks.3.fn.q.weight``: the fourth block
of the model in spec order, its mixer's query projection), so a spec that keeps a model's
layer layout and changes some blocks' kinds keeps every tensor that still exists:

* same name, same shape: **copied**;
* same name, another shape of the same rank (a narrower or wider ``d_ff``, fewer heads,
  a smaller ``d_state`` ...): the **overlapping leading block** is copied (``w[:m, :n]`` of
  the source into ``w[:m, :n]`` of the target, ``m, n`` the smaller sizes) and the rest keeps
  its fresh initialization — slicing when the target is smaller, padding with fresh values
  when it is larger (Chen et al., 2016, "Net2Net" widen without noise; the same leading-slice
  convention as MatFormer/once-for-all sub-networks);
* a name the source does not have (a replaced mixer, a new layer): **fresh**;
* a source tensor whose name the target lacks (the replaced mixer's old weights): ignored.

The source is a safetensors file (never a pickle), read as a regular file within
:data:`MAX_INIT_BYTES`.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from archir.errors import TrainingError

#: the largest ``train.init`` file read (it is held in memory once)
MAX_INIT_BYTES = 64 * 2**30


@dataclass
class InitReport:
    """What :func:`inherit` did, counted in tensors and in parameters (elements).

    ``copied``/``resized``/``fresh``: target tensors copied whole, partly (overlap), or left
    at their fresh initialization; ``ignored``: source tensors without a place.
    """

    file: str
    copied: int = 0
    resized: int = 0
    fresh: int = 0
    ignored: int = 0
    params_inherited: int = 0
    params_total: int = 0
    fresh_names: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "file": self.file,
            "copied": self.copied,
            "resized": self.resized,
            "fresh": self.fresh,
            "ignored": self.ignored,
            "params_inherited": self.params_inherited,
            "params_total": self.params_total,
            "fresh_tensors": self.fresh_names[:50],
        }

    def __str__(self) -> str:
        frac = self.params_inherited / max(1, self.params_total)
        return (
            f"init from {self.file}: {self.copied} tensors copied, {self.resized} resized, "
            f"{self.fresh} fresh ({frac:.1%} of parameters inherited), {self.ignored} unused"
        )


def read_init(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file, widened to float32 where floating.

    Raises:
        TrainingError: not a regular file, too large, or not readable as safetensors.
    """
    p = Path(path)
    try:
        st = os.stat(p)
    except OSError as exc:
        raise TrainingError(
            f"train.init '{p}': {exc.strerror}", hint="give the model.safetensors to start from"
        ) from None
    if not stat.S_ISREG(st.st_mode):
        raise TrainingError(f"train.init '{p}' is not a regular file", hint="a .safetensors file")
    if st.st_size > MAX_INIT_BYTES:
        raise TrainingError(f"train.init '{p}' is larger than {MAX_INIT_BYTES} bytes")
    try:
        from safetensors.torch import load_file

        tensors = load_file(str(p))
    except Exception as exc:  # noqa: BLE001 - truncated or not safetensors
        raise TrainingError(
            f"train.init '{p}' is not a readable safetensors file: {str(exc)[:200]}",
            hint="archir reads weights from safetensors only (never pickles)",
        ) from None
    return {k: (v.float() if v.is_floating_point() else v) for k, v in tensors.items()}


@torch.no_grad()
def inherit(model: torch.nn.Module, source: dict[str, torch.Tensor], file: str = "") -> InitReport:
    """Copy ``source`` tensors into ``model`` by the rules of the module docstring.

    Returns:
        the :class:`InitReport`.
    """
    rep = InitReport(file)
    own = model.state_dict()
    for name, t in own.items():
        rep.params_total += t.numel()
        s = source.get(name)
        if (
            s is None
            or s.dim() != t.dim()
            or s.dtype.is_floating_point != t.dtype.is_floating_point
        ):
            rep.fresh += 1
            rep.fresh_names.append(name)
            continue
        if tuple(s.shape) == tuple(t.shape):
            t.copy_(s.to(t.dtype))
            rep.copied += 1
            rep.params_inherited += t.numel()
            continue
        overlap = tuple(slice(0, min(a, b)) for a, b in zip(s.shape, t.shape))
        t[overlap].copy_(s[overlap].to(t.dtype))
        rep.resized += 1
        rep.params_inherited += int(t[overlap].numel())
    rep.ignored = sum(1 for k in source if k not in own)
    return rep


def resolve_init(init: str, spec_file: str | None) -> Path:
    """``train.init`` as a path: absolute as written, else relative to the spec file's
    folder (the current folder for a spec without a file)."""
    p = Path(init).expanduser()
    if p.is_absolute() or not spec_file:
        return p
    return Path(spec_file).resolve().parent / p
