"""MatFormer (Devvrit, Kudugunta et al., 2023): the nested FFN kind, joint training of its
granularities, extraction of a granularity or a per-layer mix as a plain concrete model, and
pricing the mixes without training."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F

import archir
from archir.blocks.mlp import matformer_modules, use_granularity
from archir.cli import main
from archir.errors import ArchirError, GraphError, SpecError, TrainingError
from archir.extract import extract, load_run
from archir.spec import spec_from_dict
from archir.tasks import get_task
from archir.train import Trainer, save_run, train


def mf_spec(
    ffn: dict[str, Any] | None = None, repeat: int = 2, share: bool = False, **train_: Any
) -> Any:
    block = {"kind": "matformer", "expansion": 2.0, "granularities": [0.25, 0.5, 1.0]}
    block.update(ffn or {})
    return spec_from_dict(
        {
            "archir": 1,
            "name": "mf",
            "model": {
                "vocab_size": 256,
                "d_model": 16,
                "max_seq_len": 32,
                "embed": {"kind": "token_embedding"},
                "layers": [
                    {
                        "repeat": repeat,
                        "share_weights": share,
                        "blocks": [{"kind": "attention", "n_heads": 2}, block],
                    }
                ],
                "head": {"kind": "lm_head", "tie_embeddings": True},
            },
            "train": {
                "task": "text:pydoc",
                "steps": 2,
                "batch_size": 2,
                "seq_len": 16,
                "eval_batches": 1,
                "warmup_steps": 1,
                **train_,
            },
        }
    )


def perturbed(spec: Any) -> Any:
    """The compiled model with every weight redrawn (norm gains and biases not 1/0)."""
    model = archir.compile(spec, seed=0)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return model.eval()


# -- the kind --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("grans", "why"),
    [
        ([0.5, 0.25, 1.0], "sorted"),
        ([0.25, 0.5], "last granularity must be 1.0"),
        ([0.0, 1.0], "(0, 1]"),
        ([0.3, 1.0], "not a whole number"),
    ],
)
def test_bad_granularities_are_located_errors(grans: list[float], why: str) -> None:
    with pytest.raises((SpecError, GraphError)) as e:
        archir.compile(mf_spec({"granularities": grans}))
    assert why in str(e.value)
    assert "model.layers.0.blocks.1" in str(e.value)


def test_gated_activation_without_a_plain_kind_is_refused() -> None:
    with pytest.raises(GraphError, match="no plain kind to extract to"):
        archir.compile(mf_spec({"activation": "relu"}))


@pytest.mark.parametrize("ffn", [{}, {"gated": False, "activation": "gelu", "bias": True}])
def test_nested_forward_is_the_prefix_ffn(ffn: dict[str, Any]) -> None:
    """At granularity g the FFN is the plain FFN on the first g·h hidden units (naive
    reference written from the paper's definition); params/FLOPs rules match the module."""
    spec = mf_spec(ffn)
    model = perturbed(spec)
    assert archir.analyze(spec).params == sum(p.numel() for p in model.parameters())
    m = matformer_modules(model)[0]
    x = torch.randn(2, 5, 16)
    for g, n in ((0.25, 8), (0.5, 16), (1.0, 32)):
        with use_granularity(model, g):
            got = m(x)
        if m.gated:
            h = F.silu(x @ m.w_gate.weight[:n].T) * (x @ m.w_up.weight[:n].T)
            ref = h @ m.w_down.weight[:, :n].T
        else:
            h = F.gelu(x @ m.fc1.weight[:n].T + m.fc1.bias[:n])
            ref = h @ m.fc2.weight[:, :n].T + m.fc2.bias
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)
    assert m.granularity == 1.0  # restored on exit
    with pytest.raises(ValueError, match="not one it was trained with"):
        with use_granularity(model, 0.75):
            pass


# -- joint training ------------------------------------------------------------------


def test_joint_step_is_the_mean_loss_over_granularities() -> None:
    """One trainer step's gradient equals autograd of (1/g)·Σ_i L(M_i(x), y) on the same
    batch (MatFormer's L_JOINT with uniform weights)."""
    spec = mf_spec(grad_clip=1e9)
    tr = Trainer(spec, get_task("text:pydoc"), spec.model.train)
    assert tr.granularities == [0.25, 0.5, 1.0]
    state = tr.gen.get_state()
    x, y = tr.task.train_batch(2, 16, torch.Generator().set_state(state))
    params = [p for p in tr.model.parameters() if p.requires_grad]
    losses = []
    for g in (0.25, 0.5, 1.0):
        with use_granularity(tr.model, g):
            losses.append(tr.task.loss(tr.model, x, y))
    want = torch.autograd.grad(sum(losses) / 3, params)
    assert tr.train_step(0.0) is None  # lr 0: weights stay, the gradients are kept
    for p, w in zip(params, want):
        torch.testing.assert_close(p.grad, w, rtol=1e-5, atol=1e-7)
    assert tr.last_loss == pytest.approx(losses[-1].item(), rel=1e-5)


def test_different_granularities_per_block_are_refused_for_training() -> None:
    data = mf_spec().data
    data["model"]["layers"].append(
        {"blocks": [{"kind": "matformer", "expansion": 2.0, "granularities": [0.5, 1.0]}]}
    )
    spec = spec_from_dict(data)
    with pytest.raises(TrainingError, match="same granularities"):
        Trainer(spec, get_task("text:pydoc"), spec.model.train)


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A MatFormer trained 2 steps, written as `archir train` writes a run."""
    out = tmp_path_factory.mktemp("mfrun")
    res = train(mf_spec(), out_dir=out)
    assert res.status == "ok"
    for g in ("0.25", "0.5", "1"):
        assert f"val_bpb@g{g}" in res.metrics
    assert res.metrics["val_bpb@g1"] == res.metrics["val_bpb"]
    return out


# -- extraction ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("share", "mix"), [(False, 0.5), (False, [0.25, 1.0]), (True, 0.25), (False, 1.0)]
)
def test_extracted_model_equals_the_nested_forward(share: bool, mix: Any) -> None:
    spec = mf_spec(share=share)
    model = perturbed(spec)
    sub_spec, sub, gs = extract(spec, model, mix)
    kinds = [b.kind for g in sub_spec.model.model.layers for b in g.blocks]
    assert "matformer" not in kinds and "swiglu" in kinds
    assert archir.analyze(sub_spec).params == sum(p.numel() for p in sub.parameters())
    x = torch.randint(0, 256, (2, 12))
    with torch.no_grad(), use_granularity(model, gs):
        nested = model(x)
    with torch.no_grad():
        err = (sub(x) - nested).abs().max().item()
    assert err <= 1e-6, err
    if isinstance(mix, list):  # a repeated group with different widths: one group per repeat
        assert [g.blocks[1].params.d_ff for g in sub_spec.model.model.layers] == [8, 32]


def test_extract_cli_writes_a_plain_model(trained_run: Path, tmp_path: Path) -> None:
    out = tmp_path / "small"
    assert main(["extract", str(trained_run), "--granularity", "0.25,0.5", "--out", str(out)]) == 0
    doc = json.loads((out / "extract.json").read_text())
    assert doc["granularities"] == [0.25, 0.5]
    sub = load_run(out)
    assert not matformer_modules(sub.model)
    assert doc["params"] == sum(p.numel() for p in sub.model.parameters())
    src = load_run(trained_run)
    x = torch.randint(0, 256, (1, 16))
    with torch.no_grad(), use_granularity(src.model, [0.25, 0.5]):
        assert (sub.model(x) - src.model(x)).abs().max().item() <= 1e-6
    # running again over its own extraction is fine; a user's file is never overwritten
    assert main(["extract", str(trained_run), "--granularity", "1", "--out", str(out)]) == 0
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "spec.yaml").write_text("mine")
    assert main(["extract", str(trained_run), "--granularity", "1", "--out", str(mine)]) == 2
    assert (mine / "spec.yaml").read_text() == "mine"


def test_extract_errors_are_located(
    trained_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = str(tmp_path / "x")
    assert main(["extract", str(trained_run), "--granularity", "0.75", "--out", out]) == 2
    err = capsys.readouterr().err
    assert "spec.yaml:" in err and "granularities" in err and "0.75" in err
    assert main(["extract", str(trained_run), "--granularity", "0.5,0.5,0.5", "--out", out]) == 2
    assert "2 matformer blocks" in capsys.readouterr().err
    plain = tmp_path / "plain"
    data = mf_spec().data
    data["model"]["layers"][0]["blocks"][1] = {"kind": "swiglu"}
    spec = spec_from_dict(data)
    save_run(plain, spec, archir.compile(spec), {})
    assert main(["extract", str(plain), "--granularity", "0.5", "--out", out]) == 2
    assert "no matformer blocks" in capsys.readouterr().err
    assert not Path(out).exists()
    with pytest.raises(ArchirError, match="no spec.yaml"):
        load_run(tmp_path)


def test_front_prices_mixes_without_training(trained_run: Path) -> None:
    from archir.spec.sections import LatencySection
    from searchers.matformer import candidate_mixes, price_mixes

    assert len(candidate_mixes([[0.5, 1.0]] * 3, max_mixes=8)) == 8
    sampled = candidate_mixes([[0.25, 0.5, 1.0]] * 6, max_mixes=10)
    assert len(sampled) == 10 and sampled[:3] == [[g] * 6 for g in (0.25, 0.5, 1.0)]
    lat = LatencySection(predict=False, warmup=0, repeats=2, seq_len=8)
    src = load_run(trained_run)
    rows, front, metric = price_mixes(src, max_mixes=4, eval_batches=1, latency=lat)
    assert metric == "val_bpb" and len(rows) == 4  # 3 uniform + 1 sampled mix of 2 blocks
    assert len({tuple(r.granularities) for r in rows}) == 4
    assert front and all(0 <= i < len(rows) for i in front)
    by = {tuple(r.granularities): r for r in rows}
    assert by[(0.25, 0.25)].params < by[(0.5, 0.5)].params < by[(1.0, 1.0)].params
    m = json.loads((trained_run / "metrics.json").read_text())
    assert by[(0.25, 0.25)].metrics["val_bpb"] == pytest.approx(m["val_bpb@g0.25"], rel=1e-6)
    # the smallest model is never dominated on params
    assert any(rows[i].params == by[(0.25, 0.25)].params for i in front)


def test_front_cli_prints_the_priced_mixes(
    trained_run: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["extract", str(trained_run), "--front", "--max-mixes", "3", "--eval-batches", "1"]
    assert main([*argv, "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["metric"] == "val_bpb" and len(doc["mixes"]) == 3 and doc["front"]
    assert [m["granularities"] for m in doc["mixes"]] == [[0.25] * 2, [0.5] * 2, [1.0] * 2]
    assert main(["extract", str(trained_run)]) == 2  # neither --granularity nor --front
    assert "either --granularity" in capsys.readouterr().err
