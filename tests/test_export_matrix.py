"""Registry-driven export matrix: every registered block kind exports to ONNX with dynamic
batch/seq axes and matches PyTorch in onnxruntime at unseen shapes (fp32, 1e-4 × scale).

Each kind is exported once (module-scoped cache); shapes are checked on that one file.
A new kind registered in ``archir/blocks`` is picked up automatically.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

import archir
from archir import registry
from archir.spec import spec_from_dict
from exporters import export_onnx
from exporters.parity import compare, make_session, random_input

SEQS = (1, 17, 64, 300)
BATCHES = (1, 3)
D = 32


def tiny_spec(kind: str) -> Any:
    """The smallest spec that exercises ``kind`` (d_model 32, one layer)."""
    k = registry.get(kind)
    model: dict[str, Any] = {
        "task": "causal_lm",
        "vocab_size": 64,
        "d_model": D,
        "max_seq_len": 512,
        "embed": {"kind": "token_embedding"},
        "head": {"kind": "lm_head"},
    }
    blocks: list[dict[str, Any]] = [{"kind": "mlp", "expansion": 2}]
    if k.role == "token_mixer":
        blocks = [{"kind": kind}, {"kind": "mlp", "expansion": 2}]
    elif k.role == "channel_mixer":
        blocks = [{"kind": kind}]
    elif k.role == "norm":
        model["norm"] = kind
    elif kind == "patch_embedding":
        model.update(
            task="image_classification",
            vocab_size=0,
            n_classes=5,
            image_size=8,
            channels=1,
            embed={"kind": "patch_embedding", "patch_size": 2},
            head={"kind": "classifier"},
        )
        blocks = [{"kind": "attention", "n_heads": 4}, {"kind": "mlp", "expansion": 2}]
    elif kind == "classifier":
        model.update(task="seq_classification", n_classes=3, head={"kind": "classifier"})
        blocks = [{"kind": "attention", "n_heads": 4}, {"kind": "mlp", "expansion": 2}]
    elif k.role in ("embedding", "head") and kind not in ("token_embedding", "lm_head"):
        pytest.skip(f"no tiny spec template for {k.role} kind '{kind}'")
    model["layers"] = [{"repeat": 1, "blocks": blocks}]
    return spec_from_dict({"archir": 1, "name": f"tiny-{kind}", "model": model})


_CACHE: dict[str, tuple[Any, Any, Path, str]] = {}


def exported(kind: str, tmp: Path) -> tuple[Any, Any, Path, str]:
    if kind not in _CACHE:
        spec = tiny_spec(kind)
        model = archir.compile(spec, seed=0).eval()
        path = tmp / f"{kind}.onnx"
        rep = export_onnx(spec, path, model=model, check=False, task="random")
        _CACHE[kind] = (spec, model, path, rep.exporter)
    return _CACHE[kind]


@pytest.fixture(scope="module")
def onnx_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("matrix")


@pytest.mark.parametrize("kind", registry.names())
def test_kind_exports_and_matches_torch(kind: str, onnx_dir: Path, capfd) -> None:
    spec, model, path, used = exported(kind, onnx_dir)
    # every kind goes through torch.export (no fallback to the deprecated TorchScript
    # exporter), and nothing of the exporter's logging reaches the terminal
    assert used == "dynamo", f"{kind} fell back to the {used} exporter"
    assert capfd.readouterr().err == ""
    sess = make_session(str(path))
    gen = torch.Generator().manual_seed(1)
    image = spec.model.model.task == "image_classification"
    shapes = [(b, 0) for b in BATCHES] if image else [(b, t) for t in SEQS for b in BATCHES]
    inputs = [random_input(spec.model, b, max(t, 1), gen) for b, t in shapes]
    rep = compare(sess, model, inputs)
    assert rep.passed, f"{kind}: {rep.summary()}; first divergence: {rep.first_divergence}"
    # symbolic axes survive in the file
    dims = [d for d in sess.get_inputs()[0].shape if isinstance(d, str)]
    assert "batch" in dims
    if not image:
        assert "seq" in dims
