"""The IR: repeat, shared weights, named blocks with ``inputs``, residual styles, shapes."""

from __future__ import annotations

from typing import Any

import pytest
import torch

import archir
from archir import registry
from archir.compiler import Merge, Residual
from archir.errors import GraphError
from archir.ir import build_graph, graph_summary
from archir.spec import spec_from_dict

ATT = {"kind": "attention", "n_heads": 2}
MLP = {"kind": "mlp", "expansion": 2}


def spec(layers: list[dict[str, Any]], **model: Any) -> Any:
    m = {
        "vocab_size": 32,
        "d_model": 16,
        "max_seq_len": 32,
        "embed": {"kind": "token_embedding"},
        "layers": layers,
        "head": {"kind": "lm_head"},
    }
    m.update(model)
    return spec_from_dict({"archir": 1, "name": "t", "model": m})


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def tokens(b: int = 2, t: int = 7) -> torch.Tensor:
    return torch.randint(0, 32, (b, t), generator=torch.Generator().manual_seed(0))


def test_repeat_expands_with_stable_paths() -> None:
    g = build_graph(spec([{"repeat": 3, "blocks": [ATT, MLP]}, {"blocks": [MLP]}]))
    names = [n.name for n in g]
    assert names == [
        "embed",
        *[f"layers.{i}.blocks.{b}" for i in range(3) for b in (0, 1)],
        "layers.3.blocks.0",
        "final_norm",
        "head",
    ]
    assert g["layers.2.blocks.1"].spec_path == ("model", "layers", 0, "blocks", 1)
    assert g["layers.3.blocks.0"].spec_path == ("model", "layers", 1, "blocks", 0)
    assert str(g["layers.1.blocks.0"].out) == "[batch, seq, 16]"
    assert str(g["head"].out) == "[batch, seq, 32]"
    assert list(g.g.successors("layers.0.blocks.1")) == ["layers.1.blocks.0"]


def test_share_weights_counts_once_and_calls_each_repeat() -> None:
    s_shared = spec([{"repeat": 4, "share_weights": True, "blocks": [ATT, MLP]}])
    s_own = spec([{"repeat": 4, "blocks": [ATT, MLP]}])
    m_shared, m_own = archir.compile(s_shared), archir.compile(s_own)
    one_layer = archir.analyze(spec([{"blocks": [ATT, MLP]}])).params
    assert archir.analyze(s_shared).params == n_params(m_shared) == one_layer
    assert archir.analyze(s_own).params == n_params(m_own)
    assert n_params(m_own) - n_params(m_shared) == 3 * (one_layer - 2 * 32 * 16 - 16)
    g = m_shared.graph
    assert g["layers.3.blocks.0"].weights_of == "layers.0.blocks.0"
    assert g["layers.0.blocks.0"].weights_of is None
    keys = list(m_shared.state_dict())
    assert len(keys) == len(set(keys))
    assert len(m_shared.blocks) == 2
    calls = {0: 0, 1: 0}
    for i, blk in enumerate(m_shared.blocks):
        blk.register_forward_hook(lambda *_a, _i=i: calls.__setitem__(_i, calls[_i] + 1))
    m_shared(tokens())
    assert calls == {0: 4, 1: 4}
    report = archir.analyze(s_shared)
    shared_rows = [r for r in report.blocks if r.shared_with]
    assert len(shared_rows) == 6 and all(r.params == 0 for r in shared_rows)
    # the optimizer sees each shared tensor once and training still works
    opt = torch.optim.SGD(m_shared.parameters(), lr=0.1)
    loss = m_shared(tokens()).logsumexp(-1).mean()
    loss.backward()
    opt.step()


def _named_inputs(merge: str) -> Any:
    return spec(
        [
            {
                "blocks": [
                    {**ATT, "name": "a"},
                    {**MLP, "name": "b"},
                    {**MLP, "inputs": ["embed", "a", "b"], "merge": merge, "residual": False},
                ]
            }
        ],
        final_norm="none",
    )


@pytest.mark.parametrize("merge", ["sum", "mean", "weighted"])
def test_named_inputs_merge(merge: str) -> None:
    s = _named_inputs(merge)
    g = build_graph(s)
    mnode = g["layers.0.blocks.2.merge"]
    assert mnode.op == "merge" and mnode.merge == merge
    assert mnode.inputs == ["embed", "layers.0.blocks.0", "layers.0.blocks.1"]
    assert g["layers.0.blocks.2"].inputs == ["layers.0.blocks.2.merge"]
    model = archir.compile(s).eval()
    assert archir.analyze(s).params == n_params(model)
    x = tokens()
    e = model.embed(x)
    a = model.blocks[0](e)
    b = model.blocks[1](a)
    if merge == "sum":
        merged = e + a + b
    elif merge == "mean":
        merged = (e + a + b) / 3
    else:
        with torch.no_grad():
            model.merges[0].logits.copy_(torch.tensor([0.0, 1.0, 2.0]))
        w = torch.softmax(torch.tensor([0.0, 1.0, 2.0]), 0)
        merged = w[0] * e + w[1] * a + w[2] * b
    expected = model.head(model.blocks[2](merged))
    torch.testing.assert_close(model(x), expected)


def test_weighted_merge_params_counted() -> None:
    s = _named_inputs("weighted")
    rows = {r.name: r for r in archir.analyze(s).blocks}
    assert rows["layers.0.blocks.2.merge"].params == 3
    assert isinstance(archir.compile(s).merges[0], Merge)


def _residual_model(style: str, **block: Any) -> Any:
    s = spec([{"residual": style, "blocks": [{**MLP, **block}]}], final_norm="none")
    model = archir.compile(s).eval()
    assert archir.analyze(s).params == n_params(model)
    return model


def test_pre_norm() -> None:
    model = _residual_model("pre_norm")
    r: Residual = model.blocks[0]
    h = torch.randn(2, 5, 16)
    torch.testing.assert_close(r(h), h + r.fn(r.norm(h)))


def test_post_norm() -> None:
    model = _residual_model("post_norm")
    r: Residual = model.blocks[0]
    h = torch.randn(2, 5, 16)
    torch.testing.assert_close(r(h), r.norm(h + r.fn(h)))


def test_peri_norm_has_two_norms() -> None:
    model = _residual_model("peri_norm")
    r: Residual = model.blocks[0]
    assert r.norm_out is not None and r.norm_out is not r.norm
    h = torch.randn(2, 5, 16)
    torch.testing.assert_close(r(h), h + r.norm_out(r.fn(r.norm(h))))


def test_peri_norm_without_norm() -> None:
    model = _residual_model("peri_norm", norm="none")
    r: Residual = model.blocks[0]
    h = torch.randn(2, 5, 16)
    torch.testing.assert_close(r(h), h + r.fn(h))


def test_no_residual() -> None:
    model = _residual_model("pre_norm", residual=False)
    r: Residual = model.blocks[0]
    h = torch.randn(2, 5, 16)
    torch.testing.assert_close(r(h), r.fn(r.norm(h)))


def test_parallel_attention_and_mlp() -> None:
    s = spec([{"repeat": 2, "residual": "parallel", "blocks": [ATT, MLP]}], final_norm="none")
    g = build_graph(s)
    par = g["layers.0.parallel"]
    assert par.op == "merge" and par.inputs == ["embed", "layers.0.blocks.0", "layers.0.blocks.1"]
    assert g["layers.0.blocks.1"].inputs == ["embed"]  # both branches read the layer input
    assert g["layers.1.blocks.0"].inputs == ["layers.0.parallel"]
    model = archir.compile(s).eval()
    assert archir.analyze(s).params == n_params(model)
    x = tokens()
    h = model.embed(x)
    for layer in range(2):
        att, mlp = model.blocks[2 * layer], model.blocks[2 * layer + 1]
        h = h + att.fn(att.norm(h)) + mlp.fn(mlp.norm(h))
    torch.testing.assert_close(model(x), model.head(h))


def test_macaron_half_step_ffns() -> None:
    s = spec(
        [
            {
                "repeat": 2,
                "blocks": [
                    {**MLP, "residual_scale": 0.5},
                    ATT,
                    {**MLP, "residual_scale": 0.5},
                ],
            }
        ]
    )
    g = build_graph(s)
    assert [g[f"layers.0.blocks.{i}"].residual_scale for i in range(3)] == [0.5, 1.0, 0.5]
    model = archir.compile(s).eval()
    assert archir.analyze(s).params == n_params(model)
    r: Residual = model.blocks[0]
    h = torch.randn(2, 5, 16)
    torch.testing.assert_close(r(h), h + 0.5 * r.fn(r.norm(h)))


def test_graph_summary_is_plain_data() -> None:
    import json

    rows = graph_summary(build_graph(_named_inputs("weighted")))
    assert json.loads(json.dumps(rows)) == rows
    assert rows[0]["name"] == "embed" and rows[-1]["name"] == "head"


def test_shape_error_names_node_and_both_shapes(monkeypatch: pytest.MonkeyPatch) -> None:
    # an embedding that (wrongly) produces d_model + 1 features
    kind = registry.get("token_embedding")
    monkeypatch.setitem(kind.extra, "out_shape", lambda p, c, shape: (*shape, c.d_model + 1))
    with pytest.raises(GraphError) as info:
        build_graph(spec([{"blocks": [ATT]}]))
    assert info.value.message == (
        "layers.0.blocks.0: expects [batch, seq, 16] but embed gives [batch, seq, 17]"
    )
    assert info.value.location is not None
    assert info.value.location.field == "model.layers.0.blocks.0"


def test_inputs_in_a_repeated_group_refer_to_the_same_repeat() -> None:
    s = spec(
        [
            {
                "repeat": 2,
                "blocks": [
                    {**ATT, "name": "a"},
                    {**MLP, "inputs": ["a", "embed"], "merge": "mean"},
                ],
            }
        ]
    )
    g = build_graph(s)
    assert g["layers.1.blocks.1.merge"].inputs == ["layers.1.blocks.0", "embed"]
    model = archir.compile(s)
    assert archir.analyze(s).params == n_params(model)
    assert model(tokens()).shape == (2, 7, 32)


def test_compiled_model_is_ordinary_pytorch(tmp_path: Any) -> None:
    s = spec([{"repeat": 2, "blocks": [ATT, MLP]}], dropout=0.0)
    model = archir.compile(s, seed=0)
    again = archir.compile(s, seed=1)
    again.load_state_dict(model.state_dict())
    x = tokens()
    torch.testing.assert_close(model(x), again(x))
    torch.save(model.state_dict(), tmp_path / "m.pt")
    feats = model.forward_features(x)
    assert feats.shape == (2, 7, 16)
    assert model.aux_loss() is None
    # same seed, same weights
    torch.testing.assert_close(archir.compile(s, seed=0)(x), model(x))
