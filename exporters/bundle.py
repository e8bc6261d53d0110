"""``model.safetensors`` + concrete ``spec.yaml``: the second deployable form.

A bundle directory loads with nothing but the core compiler::

    spec = archir.load_spec("dir/spec.yaml")
    model = archir.compile(spec)
    model.load_state_dict(safetensors.torch.load_file("dir/model.safetensors"))

(:func:`load_bundle` does exactly that.) No search machinery is involved.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

import archir
from archir.errors import ExportError

SPEC_FILE = "spec.yaml"
WEIGHTS_FILE = "model.safetensors"


def export_safetensors(
    spec: Any,
    out_dir: str | os.PathLike,
    *,
    model: torch.nn.Module | None = None,
    weights: str | os.PathLike | None = None,
) -> dict[str, Any]:
    """Write ``spec.yaml`` (concrete) and ``model.safetensors`` into ``out_dir``.

    The state dict is written in full (``state_dict()`` keys, contiguous copies), so that
    ``load_state_dict(load_file(...))`` is strict-exact. Returns a small report dict
    (paths, bytes, parameter count).

    Both files are written atomically (temporary file, then rename) with the permissions of
    the user's umask.

    Raises:
        SpecError: the spec is open; ExportError: the weights do not fit; PathError:
            ``out_dir`` is a file or cannot be written (checked before any work).
    """
    from safetensors.torch import save_file

    from archir.paths import check_out_dir, write_file, write_text
    from exporters.onnx_export import load_weights

    spec.model  # noqa: B018 - raises SpecError for an open spec
    out = check_out_dir(out_dir)
    if model is None:
        model = archir.compile(spec, seed=0)
        if weights is not None:
            load_weights(model, weights)
    out.mkdir(parents=True, exist_ok=True)
    spec_path = write_text(out / SPEC_FILE, spec.to_yaml())
    state = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}
    w = out / WEIGHTS_FILE
    meta = {"archir.version": archir.__version__, "format": "pt"}
    write_file(w, lambda tmp: save_file(state, tmp, metadata=meta))
    return {
        "spec": str(spec_path),
        "weights": str(w),
        "weights_bytes": w.stat().st_size,
        "tensors": len(state),
        "params": sum(p.numel() for p in model.parameters()),
    }


def load_bundle(path: str | os.PathLike) -> torch.nn.Module:
    """Load a bundle directory (``spec.yaml`` + ``model.safetensors``) into a CompiledModel
    in eval mode.

    Raises:
        ExportError: a file is missing or the weights do not fit the spec.
    """
    from safetensors.torch import load_file

    d = Path(path)
    spec_p, w = d / SPEC_FILE, d / WEIGHTS_FILE
    for p in (spec_p, w):
        if not p.is_file():
            raise ExportError(
                f"'{p}' does not exist", hint="a bundle holds spec.yaml + model.safetensors"
            )
    model = archir.compile(archir.load_spec(spec_p))
    try:
        model.load_state_dict(load_file(str(w)), strict=True)
    except RuntimeError as exc:
        raise ExportError(f"'{w}' does not fit '{spec_p}': {str(exc).splitlines()[0]}") from None
    return model.eval()


def bundle_summary(info: dict[str, Any]) -> str:
    return json.dumps(info, indent=2)
