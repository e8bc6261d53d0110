"""Registry-driven export matrix: every registered block kind exports to ONNX with dynamic
batch/seq axes and matches PyTorch in onnxruntime at unseen shapes (fp32, 1e-4 × scale).

Each kind is exported once (module-scoped cache); shapes are checked on that one file.
A new kind registered in ``archir/blocks`` is picked up automatically: a mixer or norm with
no entry here, an embedding or head kind through :data:`TEMPLATES` (a kind missing from it
fails, saying what to add), and a kind that declares ``lacks={"onnx": reason}`` in the
registry is skipped with that reason.
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


IMAGE: dict[str, Any] = {
    "task": "image_classification",
    "vocab_size": 0,
    "n_classes": 5,
    "image_size": 8,
    "channels": 1,
    "embed": {"kind": "patch_embedding", "patch_size": 2},
    "head": {"kind": "classifier"},
}
ATTN_MLP: list[dict[str, Any]] = [
    {"kind": "attention", "n_heads": 4},
    {"kind": "mlp", "expansion": 2},
]

#: how a tiny model uses each embedding and head kind: ``(model fields, layers)`` over the
#: causal LM below (``None``: one layer of attention + MLP). Token and channel mixers and norms
#: need no entry; an embedding or head kind does (or declares ``lacks={"onnx": reason}``).
TEMPLATES: dict[str, tuple[dict[str, Any], list[dict[str, Any]] | None]] = {
    "token_embedding": ({}, None),
    "lm_head": ({}, None),
    "patch_embedding": (IMAGE, None),
    "classifier": (
        {"task": "seq_classification", "n_classes": 3, "head": {"kind": "classifier"}},
        None,
    ),
    # vision hierarchies: a stem, then a stage behind a downsampling layer
    "downsample": (
        {**IMAGE, "embed": {"kind": "downsample", "kernel_size": 2, "stride": 2}},
        [
            {"repeat": 1, "blocks": ATTN_MLP},
            {
                "repeat": 1,
                "d_model": 2 * D,
                "downsample": {"kind": "downsample", "kernel_size": 2, "stride": 2},
                "blocks": ATTN_MLP,
            },
        ],
    ),
    "patch_merging": (
        IMAGE,
        [
            {"repeat": 1, "blocks": ATTN_MLP},
            {
                "repeat": 1,
                "d_model": 2 * D,
                "downsample": {"kind": "patch_merging"},
                "blocks": ATTN_MLP,
            },
        ],
    ),
}


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
    layers: list[dict[str, Any]] | None = None
    blocks: list[dict[str, Any]] = [{"kind": "mlp", "expansion": 2}]
    if k.role == "token_mixer":
        blocks = [{"kind": kind}, {"kind": "mlp", "expansion": 2}]
    elif k.role == "channel_mixer":
        blocks = [{"kind": kind}]
    elif k.role == "norm":
        model["norm"] = kind
    elif kind in TEMPLATES:
        fields, layers = TEMPLATES[kind]
        model.update(fields)
        blocks = ATTN_MLP
    else:
        pytest.fail(
            f"{k.role} kind '{kind}' has no tiny model in tests/test_export_matrix.py: add "
            f"TEMPLATES['{kind}'] (the model fields and layers of a small model using it), or "
            f"declare lacks={{'onnx': '<why>'}} in its BlockKind"
        )
    model["layers"] = layers or [{"repeat": 1, "blocks": blocks}]
    return spec_from_dict({"archir": 1, "name": f"tiny-{kind}", "model": model})


#: kinds whose tiny model takes 14-33 s to export on 2 cores (torch.export's symbolic
#: tracing of their unrolled chunked scans; 2026-11-26, idle machine): their rows run in the
#: ``heavy`` pass that CI runs after the default suite, which keeps the default suite under
#: 10 minutes. Every other kind, and any new one, runs in the default suite.
HEAVY_EXPORT = {"mamba": 33, "gated_deltanet": 21, "mlstm": 15, "mamba2": 14}


def _kinds() -> list[Any]:
    """Every registered kind; one that declares it has no ONNX form is skipped with its reason."""
    return [
        pytest.param(k.name, marks=pytest.mark.skip(reason=f"{k.name}: {k.lacks['onnx']}"))
        if not k.provides("onnx")
        else pytest.param(k.name, marks=pytest.mark.heavy)
        if k.name in HEAVY_EXPORT
        else k.name
        for k in registry.kinds()
    ]


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


@pytest.mark.parametrize("kind", _kinds())
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


def test_registry_declarations_are_checked() -> None:
    """A kind declares its missing forms with a reason, from :data:`registry.FORMS` only;
    ``extra={"flops_exact": True}`` reads as the field."""
    from archir.registry import FORMS, BlockKind, NoParams, register

    def kind(name: str, **kw: Any) -> BlockKind:
        return BlockKind(
            name=name,
            role=kw.pop("role", "token_mixer"),
            params=NoParams,
            build=lambda p, c: torch.nn.Identity(),
            n_params=lambda p, c: 0,
            flops=lambda p, c, L: 0.0,
            paper="-",
            summary="-",
            **kw,
        )

    assert FORMS == ("step", "onnx", "onnx_decode")
    with pytest.raises(ValueError, match="lacks unknown form 'export'"):
        register(kind("bad_form", lacks={"export": "no"}))
    with pytest.raises(ValueError, match="lacks 'onnx' without a reason"):
        register(kind("no_reason", lacks={"onnx": " "}))
    with pytest.raises(ValueError, match="recurrent/state_grows are for token and channel"):
        register(kind("bad_norm", role="norm", recurrent=True))
    assert not {"bad_form", "no_reason", "bad_norm"} & set(registry.names())
    k = kind("x", lacks={"onnx_decode": "why"}, extra={"flops_exact": True})
    assert k.flops_exact and k.provides("onnx") and not k.provides("onnx_decode")
    with pytest.raises(ValueError, match="unknown form 'decode'"):
        k.provides("decode")
