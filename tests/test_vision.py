"""Vision hierarchies (issue 16 part 4): stages with downsampling.

The four zoo hierarchies (PoolFormer, ConvFormer, CAFormer, EdgeNeXt-style) are shape-checked
per stage, counted exactly against the real module (parameters; FLOPs per image against
``torch.utils.flop_counter``), exported with a dynamic batch axis, and trained a little on
``digits``; 2-D pooling and separable convolution match naive loops; a downsample where it
cannot go, or a width a residual cannot add, is a located error.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

import archir
from archir.errors import ArchirError, GraphError, SpecError
from archir.hashing import canonical_hash
from archir.spec import spec_from_dict, spec_from_text
from tests.conftest import ZOO

VISION = ("poolformer-s", "convformer-s", "caformer-s", "edgenext-s")
#: per stage: token grid side, width (8x8 digits: stem stride 1, then three stride-2 stages)
STAGES = [(8, 16), (4, 32), (2, 48), (1, 64)]


def model_data(layers: list[dict[str, Any]], **over: Any) -> dict[str, Any]:
    model: dict[str, Any] = {
        "task": "image_classification",
        "image_size": 8,
        "channels": 1,
        "n_classes": 10,
        "d_model": 8,
        "max_seq_len": 64,
        "norm": "layernorm",
        "embed": {"kind": "downsample", "kernel_size": 3, "stride": 1, "norm": "post"},
        "layers": layers,
        "head": {"kind": "classifier"},
    }
    model.update(over)
    return {"archir": 1, "name": "v", "model": model, "train": {"task": "digits"}}


POOL = [{"kind": "pooling", "pool_size": 3}, {"kind": "mlp", "expansion": 2}]


@pytest.mark.parametrize("name", VISION)
def test_zoo_hierarchy_shapes_params_and_flops(name: str) -> None:
    spec = archir.load_spec(ZOO / f"{name}.yaml")
    model = archir.compile(spec, seed=0).eval()
    graph = model.graph
    # every stage's blocks see its grid and width; three downsamples between four stages
    downs = [n for n in graph if n.op == "downsample"]
    assert len(downs) == 3
    stage = {n.name: 0 for n in graph}
    s = 0
    for n in graph:
        s += n.op == "downsample"
        stage[n.name] = s
        if n.op in ("block", "downsample"):
            side, d = STAGES[s]
            assert n.out is not None and n.out.shape == ("batch", side * side, d), n.name
            assert n.ctx is not None and n.ctx.d_model == d
    rep = archir.analyze(spec)
    assert rep.params == sum(p.numel() for p in model.parameters())
    x = torch.rand(2, 1, 8, 8)
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), counter:
        out = model(x)
    with torch.no_grad():
        feats = model.forward_features(x)
    assert out.shape == (2, 10) and feats.shape == (2, 1, 64)
    # FLOPs per token x tokens of the stem's grid = FLOPs per image (pooling, which the
    # counter does not count, is d·(k²+1) per token of its grid)
    assert rep.seq_len == 64
    pool = sum(r.flops_per_token * rep.seq_len for r in rep.blocks if r.kind == "pooling")
    per_image = counter.get_total_flops() / 2
    assert rep.flops_per_token * rep.seq_len - pool == pytest.approx(per_image, rel=1e-12)


def naive_pool(x: torch.Tensor, k: int) -> torch.Tensor:
    """PoolFormer's token mixer on ``[B, C, H, W]``: mean over the in-image ``k × k``
    neighbours (padding not counted) minus the input."""
    B, C, H, W = x.shape
    out = torch.empty_like(x)
    r = k // 2
    for i in range(H):
        for j in range(W):
            win = x[:, :, max(0, i - r) : i + r + 1, max(0, j - r) : j + r + 1]
            out[:, :, i, j] = win.mean(dim=(2, 3)) - x[:, :, i, j]
    return out


def naive_depthwise(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Depthwise ``k × k`` cross-correlation with zero padding ``k // 2``: ``[B, C, H, W]``,
    weights ``[C, k, k]``."""
    B, C, H, W = x.shape
    k = w.shape[-1]
    r = k // 2
    out = torch.zeros_like(x)
    for i in range(H):
        for j in range(W):
            for a in range(k):
                for b in range(k):
                    ii, jj = i + a - r, j + b - r
                    if 0 <= ii < H and 0 <= jj < W:
                        out[:, :, i, j] += x[:, :, ii, jj] * w[:, a, b]
    return out


def test_2d_pooling_and_sepconv_match_naive_loops() -> None:
    """On an image's token grid the MetaFormer mixers are the papers' 2-D operations
    (fp64, ~1e-15), not 1-D ones over the flattened sequence."""
    layers = [{"blocks": [{"kind": "pooling", "pool_size": 3}]}]
    torch.manual_seed(0)
    m = archir.compile(spec_from_dict(model_data(layers)), seed=0).double().eval()
    pool = m.blocks[0].fn
    x = torch.randn(2, 64, 8, dtype=torch.float64)
    grid = x.transpose(1, 2).reshape(2, 8, 8, 8)
    ref = naive_pool(grid, 3).flatten(2).transpose(1, 2)
    assert (pool(x) - ref).abs().max().item() < 1e-14

    layers = [{"blocks": [{"kind": "sepconv", "kernel_size": 5, "expansion": 1.5}]}]
    m = archir.compile(spec_from_dict(model_data(layers)), seed=0).double().eval()
    sep = m.blocks[0].fn
    h = sep.act(sep.pw1(x))
    hg = h.transpose(1, 2).reshape(2, -1, 8, 8)
    dw = naive_depthwise(hg, sep.dw.weight[:, 0]).flatten(2).transpose(1, 2)
    ref = sep.pw2(dw)
    assert sep.dw.weight.shape[-2:] == (5, 5)
    assert (sep(x) - ref).abs().max().item() < 1e-13


def test_patch_merging_and_strided_conv_stages() -> None:
    """Swin's patch merging: token (i, j) of the coarse grid holds the 2x2 fine tokens in
    the order (2i,2j), (2i+1,2j), (2i,2j+1), (2i+1,2j+1); params exact."""
    layers = [
        {"blocks": POOL},
        {"d_model": 24, "downsample": {"kind": "patch_merging"}, "blocks": POOL},
        {"d_model": 24, "downsample": {"kind": "downsample", "stride": 2}, "blocks": POOL},
    ]
    spec = spec_from_dict(model_data(layers))
    model = archir.compile(spec, seed=0).eval()
    assert archir.analyze(spec).params == sum(p.numel() for p in model.parameters())
    shapes = [n.out.shape for n in model.graph if n.op == "downsample"]
    assert shapes == [("batch", 16, 24), ("batch", 4, 24)]
    merge = model.downsamples[0]
    x = torch.randn(1, 64, 8)
    g = x.reshape(8, 8, 8)
    expect = torch.cat([g[2, 4], g[3, 4], g[2, 5], g[3, 5]])  # coarse token (1, 2)
    with torch.no_grad():
        ref = merge.reduction(merge.norm(expect))
        assert torch.allclose(merge(x)[0, 1 * 4 + 2], ref, atol=1e-6)


def test_hash_sees_stages_and_plain_specs_keep_theirs() -> None:
    a = spec_from_dict(
        model_data([{"blocks": POOL}, {"downsample": {"kind": "downsample"}, "blocks": POOL}])
    )
    b = spec_from_dict(
        model_data(
            [
                {"blocks": POOL},
                {"d_model": 16, "downsample": {"kind": "downsample"}, "blocks": POOL},
            ]
        )
    )
    c = spec_from_dict(model_data([{"blocks": POOL}, {"blocks": POOL}]))
    hashes = {canonical_hash(s) for s in (a, b, c)}
    assert len(hashes) == 3


def located(data: dict[str, Any] | str) -> ArchirError:
    with pytest.raises((SpecError, GraphError)) as info:
        spec = spec_from_text(data) if isinstance(data, str) else spec_from_dict(data)
        archir.compile(spec)
    return info.value


LM = """archir: 1
name: lm
model:
  task: causal_lm
  vocab_size: 64
  d_model: 16
  embed: {kind: token_embedding}
  layers:
    - blocks: [{kind: pooling}]
    - d_model: 32
      downsample: {kind: downsample}
      blocks: [{kind: pooling}]
  head: {kind: lm_head}
"""


def test_located_errors() -> None:
    # a downsample in a causal language model: its tokens are a sequence, not a grid
    err = located(LM)
    assert "sequence" in str(err) and "downsample" in str(err)
    assert err.location is not None and err.location.line == 11 and err.hint
    # a width change with nothing to change it: a residual cannot add the two
    text = LM.replace("      downsample: {kind: downsample}\n", "")
    err = located(text)
    assert "residual cannot add" in str(err) and "d_model 32" in str(err)
    assert err.location is not None and err.location.line == 10 and "downsample" in (err.hint or "")
    # a kind that does not downsample, and a grid the kernel does not fit
    bad = model_data(
        [{"blocks": POOL}, {"downsample": {"kind": "patch_embedding"}, "blocks": POOL}]
    )
    assert "does not downsample" in str(located(bad))
    down = {"kind": "downsample", "stride": 2, "padding": 0}  # 8x8 -> 3x3 -> 1x1 -> none
    tiny = model_data([{"blocks": POOL}] + [{"downsample": down, "blocks": POOL}] * 3)
    err = located(tiny)
    assert "does not fit the 1x1 token grid" in str(err)
    # patch merging needs an even grid; a CLS token makes the patches a sequence
    odd = model_data(
        [{"blocks": POOL}, {"downsample": {"kind": "patch_merging"}, "blocks": POOL}],
        embed={"kind": "downsample", "kernel_size": 3, "stride": 2, "padding": 0},
    )
    assert "even token grid" in str(located(odd))
    cls = model_data(
        [{"blocks": POOL}, {"downsample": {"kind": "downsample"}, "blocks": POOL}],
        embed={"kind": "patch_embedding", "patch_size": 2, "cls_token": True},
    )
    assert "not a grid" in str(located(cls))


def test_cli_validate_and_show(capsys: pytest.CaptureFixture[str]) -> None:
    from archir.cli import main

    paths = [str(ZOO / f"{n}.yaml") for n in VISION]
    assert main(["validate", *paths]) == 0
    assert main(["show", paths[2]]) == 0
    out = capsys.readouterr().out
    assert "layers.2.downsample" in out and "[batch, 4, 48]" in out


@pytest.mark.slow  # one dynamo export: 30-40 s on the shared 2-core machine
def test_export_dynamic_batch_matches_torch(tmp_path: Path) -> None:
    """A two-stage hierarchy (2-D sepconv, strided conv, 2-D pooling) exports with a
    dynamic batch axis and matches PyTorch in onnxruntime at batch sizes 1 and 5. (Each zoo
    hierarchy goes through the parity gate in the slow ``test_export.py::test_zoo_spec_exports``;
    ``test_export_matrix.py`` exports the ``downsample`` and ``patch_merging`` kinds.)"""
    import onnxruntime as ort

    from exporters import export_onnx

    layers = [
        {"blocks": [{"kind": "sepconv", "kernel_size": 3}]},
        {"d_model": 16, "downsample": {"kind": "downsample"}, "blocks": [{"kind": "pooling"}]},
    ]
    spec = spec_from_dict(model_data(layers))
    model = archir.compile(spec, seed=0).eval()
    path = tmp_path / "two-stage.onnx"
    export_onnx(spec, path, model=model, task="random", check=False)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert isinstance(sess.get_inputs()[0].shape[0], str)
    for b in (1, 5):
        x = torch.rand(b, 1, 8, 8)
        with torch.no_grad():
            ref = model(x).numpy()
        out = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
        assert out.shape == (b, 10)
        assert np.abs(out - ref).max() < 1e-4 * max(1.0, float(np.abs(ref).max()))


def test_training_on_digits_lowers_the_test_loss() -> None:
    """40 AdamW steps on fresh digits batches lower PoolFormer-S's loss on the held-out
    split (the whole path: stem, 2-D pooling, three downsamples, classifier)."""
    from archir.tasks.base import get_task

    spec = archir.load_spec(ZOO / "poolformer-s.yaml")
    task = get_task("digits")
    model = archir.compile(spec, seed=0)
    model.eval()
    before = task.evaluate(model, 256, 0, 1)["test_loss"]
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(40):
        x, y = task.train_batch(32, 0, gen)
        loss = task.loss(model, x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    model.eval()
    after = task.evaluate(model, 256, 0, 1)
    assert after["test_loss"] < 0.8 * before, (before, after)
