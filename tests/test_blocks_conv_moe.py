"""Convolution / MetaFormer token mixers (hyena, pooling, sepconv, token_mlp, identity — every
token mixer the registry holds that neither tests/test_blocks_recurrent.py covers nor
:data:`ELSEWHERE` names) and the mixture-of-experts channel mixer."""

from __future__ import annotations

import math
import warnings
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

import archir
from archir import registry
from archir.blocks.conv import causal_conv_direct, causal_conv_fft
from archir.registry import BuildContext
from archir.spec import spec_from_dict
from tests.conftest import ZOO

#: token mixers tested in other files
ELSEWHERE = {"attention": "tests/test_block_options.py, tests/test_cost.py, tests/test_decode.py"}
#: the rest, from the registry: recurrent kinds with a fixed-size state have their own file
TOKEN_MIXERS = [
    k.name
    for k in registry.kinds("token_mixer")
    if not (k.recurrent and not k.state_grows) and k.name not in ELSEWHERE
]
D = 32
MAX = 320

#: parameter sets of every kind in TOKEN_MIXERS and of moe (exact parameter counts)
VARIANTS: dict[str, list[dict[str, Any]]] = {
    "hyena": [{}, {"order": 3, "short_kernel": 4, "filter_layers": 0, "bias": False}],
    "pooling": [{}, {"pool_size": 5}],
    "sepconv": [{}, {"expansion": 1.5, "kernel_size": 5, "activation": "gelu", "bias": True}],
    "token_mlp": [{}, {"expansion": 0.25, "activation": "relu"}],
    "identity": [{}],
    "moe": [
        {},
        {"n_experts": 3, "top_k": 1, "expert_kind": "swiglu", "expansion": 1.5},
        {"n_experts": 4, "d_ff": 20, "capacity_factor": None},
    ],
}


def build(name: str, causal: bool = True, **kw: Any) -> tuple[Any, Any, BuildContext]:
    kind = registry.get(name)
    ctx = BuildContext(d_model=D, vocab_size=64, max_seq_len=MAX, causal=causal)
    p = kind.params(**kw)
    kind.check(p, ctx)
    torch.manual_seed(0)
    return kind.build(p, ctx), p, ctx


@pytest.mark.parametrize("name", TOKEN_MIXERS + ["moe"])
@pytest.mark.parametrize("causal", [True, False])
def test_shapes_any_length(name: str, causal: bool) -> None:
    m, _, _ = build(name, causal)
    for T in (1, 17, 64, 300):
        x = torch.randn(2, T, D)
        y = m(x)
        assert y.shape == (2, T, D)
        assert torch.isfinite(y).all()


@pytest.mark.parametrize(
    ("name", "kw"),
    [(n, kw) for n in [*TOKEN_MIXERS, "moe"] for kw in VARIANTS.get(n, [None])],
    ids=str,
)
def test_exact_param_count(name: str, kw: dict[str, Any] | None) -> None:
    if kw is None:
        pytest.fail(
            f"token mixer '{name}' has no entry in VARIANTS (tests/test_blocks_conv_moe.py): add "
            "its parameter sets ({} for the defaults), or name the file that tests it in "
            "ELSEWHERE"
        )
    kind = registry.get(name)
    m, p, ctx = build(name, **kw)
    assert sum(q.numel() for q in m.parameters()) == kind.n_params(p, ctx)


@pytest.mark.parametrize("name", TOKEN_MIXERS)
def test_causal_mixers_do_not_look_ahead(name: str) -> None:
    m, _, _ = build(name, causal=True)
    x = torch.randn(2, 40, D)
    x2 = x.clone()
    x2[:, 25] += torch.randn(D)
    with torch.no_grad():
        y, y2 = m(x), m(x2)
    assert torch.allclose(y[:, :25], y2[:, :25], atol=1e-6, rtol=0)
    if name != "identity":
        assert not torch.allclose(y[:, 25:], y2[:, 25:])


@pytest.mark.parametrize("name", ["pooling", "sepconv", "token_mlp"])
def test_bidirectional_mixers_do_look_ahead(name: str) -> None:
    m, _, _ = build(name, causal=False)
    x = torch.randn(1, 20, D)
    x2 = x.clone()
    x2[:, 10] += 1.0
    with torch.no_grad():
        assert not torch.allclose(m(x)[:, :10], m(x2)[:, :10])


def test_pooling_values() -> None:
    m, _, _ = build("pooling", causal=True, pool_size=3)
    x = torch.arange(5.0).view(1, 5, 1).expand(1, 5, D)
    mean = torch.tensor([0.0, 0.5, 1.0, 2.0, 3.0])
    assert torch.allclose(m(x)[0, :, 0], mean - torch.arange(5.0))
    m, _, _ = build("pooling", causal=False, pool_size=3)
    mean = torch.tensor([0.5, 1.0, 2.0, 3.0, 3.5])
    assert torch.allclose(m(x)[0, :, 0], mean - torch.arange(5.0))


def test_even_kernel_refused_when_bidirectional() -> None:
    with pytest.raises(ValueError, match="odd pool_size"):
        build("pooling", causal=False, pool_size=4)
    with pytest.raises(ValueError, match="odd kernel_size"):
        build("sepconv", causal=False, kernel_size=4)
    build("sepconv", causal=True, kernel_size=4)


# --------------------------------------------------------------------------- hyena


def test_fft_and_direct_long_conv_agree() -> None:
    z, h = torch.randn(2, 8, 300), torch.randn(8, 300) / 300**0.5
    assert torch.allclose(causal_conv_fft(z, h), causal_conv_direct(z, h), atol=1e-5)
    m, _, _ = build("hyena")
    x = torch.randn(2, 300, D)
    with torch.no_grad():
        m.fft = "on"
        y_fft = m(x)
        m.fft = "off"
        y_dir = m(x)
    assert torch.allclose(y_fft, y_dir, atol=1e-5)


def test_hyena_step_matches_forward() -> None:
    kind = registry.get("hyena")
    assert kind.recurrent
    m, _, _ = build("hyena", order=2, short_kernel=4)
    T = 24
    x = torch.randn(2, T, D)
    with torch.no_grad():
        full = m(x)
        state = m.init_state(2)
        ys = []
        for t in range(T):
            y, state = m.step(x[:, t], state)
            ys.append(y)
    assert torch.allclose(torch.stack(ys, 1), full, atol=1e-5)


def test_hyena_step_past_max_len_raises() -> None:
    kind = registry.get("hyena")
    ctx = BuildContext(d_model=8, max_seq_len=2)
    m = kind.build(kind.params(), ctx)
    state = m.init_state(1)
    with torch.no_grad():
        for _ in range(2):
            _, state = m.step(torch.randn(1, 8), state)
        with pytest.raises(ValueError, match="max_seq_len 2"):
            m.step(torch.randn(1, 8), state)


def test_hyena_state_bytes_grow_with_length() -> None:
    kind = registry.get("hyena")
    p, ctx = kind.params(), BuildContext(d_model=D)
    # one [d, L] history per long filter: order - 1 of them (safari's order)
    grows = 4 * (p.order - 1) * D * 100
    assert kind.state_bytes(p, ctx, 200) - kind.state_bytes(p, ctx, 100) == grows


# --------------------------------------------------------------------------- moe


def test_moe_gates_and_aux_loss() -> None:
    m, _, _ = build("moe", n_experts=6, top_k=2, capacity_factor=None)
    x = torch.randn(3, 11, D)
    y = m(x)
    assert y.shape == x.shape
    assert m.has_aux_loss
    aux = m.aux_loss
    assert aux is not None and aux.ndim == 0 and torch.isfinite(aux)
    # a perfectly balanced router gives aux == weight; any router gives >= weight·(1-ε)
    assert aux.item() > 0
    gates = m.last_gates
    assert gates.shape == (33, 6)
    assert torch.allclose(gates.sum(-1), torch.ones(33), atol=1e-6)
    assert ((gates > 0).sum(-1) == 2).all()
    aux.backward()
    assert m.router.weight.grad is not None and m.router.weight.grad.abs().sum() > 0


def test_moe_switch_gates_train_the_router() -> None:
    m, _, _ = build(
        "moe",
        n_experts=4,
        top_k=1,
        normalize_gates=False,
        aux_loss_weight=0.0,
        capacity_factor=None,
    )
    m(torch.randn(2, 9, D)).sum().backward()
    g = m.last_gates
    assert ((g > 0).sum(-1) == 1).all() and (g.sum(-1) < 1).all()
    assert m.router.weight.grad is not None and m.router.weight.grad.abs().sum() > 0


def test_moe_capacity_drops_overflow_tokens() -> None:
    m, _, _ = build("moe", n_experts=4, top_k=1, capacity_factor=1.0)
    with torch.no_grad():
        m.router.weight.zero_()
        m.router.weight[0, 0] = 10.0  # every token (x[..., 0] > 0) prefers expert 0
    x = torch.randn(1, 12, D)
    x[..., 0] = x[..., 0].abs() + 1.0
    y = m(x)
    cap = math.ceil(1.0 * 12 * 1 / 4)
    kept = (m.last_gates[:, 0] > 0).nonzero().squeeze(-1).tolist()
    assert kept == list(range(cap))  # first tokens win, the rest are dropped
    assert (y[0, cap:] == 0).all() and (y[0, :cap] != 0).any()
    # f_0 = 1, P_0 ≈ 1: the balancing loss is at its maximum ≈ weight · E
    assert m.aux_loss is not None and m.aux_loss.item() > 0.01 * 4 * 0.9
    # capacity is a training bound: in eval mode every token reaches its expert
    m.eval()
    y = m(x)
    assert (m.last_gates[:, 0] > 0).all() and (y[0] != 0).any(-1).all()


@pytest.mark.parametrize("expert_kind", ["mlp", "swiglu"])
def test_moe_sparse_and_dense_paths_agree(expert_kind: str) -> None:
    m, _, _ = build("moe", expert_kind=expert_kind, capacity_factor=1.0)
    x = torch.randn(2, 17, D)
    m.dispatch = "sparse"
    ys = m(x)
    m.dispatch = "dense"
    yd = m(x)
    assert torch.allclose(ys, yd, atol=1e-6)


# --------------------------------------------------------------------------- FLOPs


@pytest.mark.parametrize(
    ("name", "kw"),
    [
        ("sepconv", {}),
        ("sepconv", {"kernel_size": 3, "expansion": 3}),
        ("moe", {"capacity_factor": None, "dispatch": "sparse"}),
        ("moe", {"capacity_factor": None, "dispatch": "sparse", "expert_kind": "swiglu"}),
        ("token_mlp", {}),
    ],
    ids=str,
)
def test_flops_match_flop_counter(name: str, kw: dict[str, Any]) -> None:
    """These kinds are matmul/conv only, so the counter sees everything the formula counts
    (moe: sparse path, router + top_k experts per token; token_mlp at T = max_seq_len)."""
    kind = registry.get(name)
    m, p, ctx = build(name, **kw)
    B, T = 2, MAX if name == "token_mlp" else 50
    with FlopCounterMode(display=False) as fc, torch.no_grad():
        m(torch.randn(B, T, D))
    assert fc.get_total_flops() == pytest.approx(kind.flops(p, ctx, T) * B * T, rel=1e-9)


# --------------------------------------------------------------------------- export


def _export_and_compare(m: torch.nn.Module, seq_lens: tuple[int, ...]) -> float:
    ort = pytest.importorskip("onnxruntime")
    import tempfile
    from pathlib import Path

    m.eval()
    batch = torch.export.Dim("batch", max=64)
    seq = torch.export.Dim("seq", min=2, max=MAX)
    worst = 0.0
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        path = str(Path(tmp) / "m.onnx")
        torch.onnx.export(
            m,
            (torch.randn(2, 16, D),),
            path,
            dynamo=True,
            dynamic_shapes={"x": {0: batch, 1: seq}},
            verbose=False,
        )
        sess = ort.InferenceSession(path)
        for T in seq_lens:
            x = torch.randn(3, T, D)
            (out,) = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})
            with torch.no_grad():
                ref = m(x).numpy()
            worst = max(worst, float(abs(out - ref).max()))
    return worst


@pytest.mark.heavy
@pytest.mark.parametrize("name", ["hyena", "moe"])
def test_onnx_export_dynamic_seq(name: str) -> None:
    """hyena exports its long convolution behind an ``If`` (``max_seq_len`` 320: the direct
    ``Conv`` at 37 positions, the factorised DFT at 300; tests/test_blocks_hyena.py covers
    the switch); moe through the sparse dispatch. Both run in onnxruntime at lengths other
    than the traced 16."""
    m, _, _ = build(name)
    assert _export_and_compare(m, (37, 300)) < 1e-5


def test_moe_sparse_export_matches_torch_on_trained_like_routing() -> None:
    """Issue 14 part 6: the exported MoE runs each expert on the tokens routed to it
    (NonZero → Gather → MatMuls → ScatterND add), not every expert on every token. With a
    router like a trained one — one expert taking most tokens, two never chosen — onnxruntime
    matches PyTorch at batch sizes and lengths the exporter never saw, including inputs where
    an expert gets no token at all."""
    import onnx

    E = 8
    m, _, _ = build("moe", n_experts=E, top_k=2, expansion=2.0, capacity_factor=1.0)
    v = torch.nn.functional.normalize(
        torch.randn(D, generator=torch.Generator().manual_seed(3)), dim=0
    )
    with torch.no_grad():
        m.router.weight.mul_(20.0)
        m.router.weight[0] += 1.5 * v  # the favourite
        m.router.weight[6:] = -4.0 * v  # never chosen while x·v > 0
    m.eval()

    def inputs(b: int, t: int, seed: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(seed)
        return torch.randn(b, t, D, generator=g) + 4.0 * v

    with torch.no_grad():
        m(inputs(4, 64, 9))
    assert m.last_gates is not None
    load = (m.last_gates > 0).sum(0)
    assert int(load[6:].sum()) == 0 and int(load[0]) > 2 * int(load[1:6].float().mean()), load
    ort = pytest.importorskip("onnxruntime")
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        path = str(Path(tmp) / "moe.onnx")
        torch.onnx.export(
            m,
            (inputs(2, 16, 0),),
            path,
            dynamo=True,
            dynamic_shapes={
                "x": {
                    0: torch.export.Dim("batch", max=64),
                    1: torch.export.Dim("seq", min=2, max=MAX),
                }
            },
            verbose=False,
        )
        ops = [n.op_type for n in onnx.load(path).graph.node]
        assert ops.count("NonZero") == E and ops.count("ScatterND") == E, ops
        sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
        for b, t, seed in ((1, 1, 1), (3, 17, 2), (2, 100, 3), (5, 300, 4), (1, 3, 5)):
            x = inputs(b, t, seed)
            with torch.no_grad():
                ref = m(x)
            (out,) = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})
            err = float(abs(out - ref.numpy()).max())
            assert err < 1e-5 * max(1.0, float(ref.abs().max())), (b, t, err)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["pooling", "sepconv", "token_mlp", "identity"])
def test_onnx_export_dynamic_seq_metaformer(name: str) -> None:
    m, _, _ = build(name)
    assert _export_and_compare(m, (37, 300)) < 1e-5


# --------------------------------------------------------------------------- specs


def _tiny_spec(mixer: dict[str, Any], channel: dict[str, Any]) -> dict[str, Any]:
    return {
        "archir": 1,
        "name": "tiny",
        "model": {
            "task": "causal_lm",
            "vocab_size": 32,
            "d_model": 32,
            "max_seq_len": 32,
            "norm": "rmsnorm",
            "embed": {"kind": "token_embedding"},
            "layers": [
                {
                    "repeat": 2,
                    "blocks": [
                        {"role": "token_mixer", **mixer},
                        {"role": "channel_mixer", **channel},
                    ],
                }
            ],
            "head": {"kind": "lm_head", "tie_embeddings": True},
        },
    }


MLP = {"kind": "mlp", "expansion": 2}
SPEC_CASES = [({"kind": k}, MLP) for k in TOKEN_MIXERS] + [
    ({"kind": "attention", "n_heads": 2}, {"kind": "moe", "n_experts": 4, "top_k": 2})
]


@pytest.mark.parametrize(("mixer", "channel"), SPEC_CASES, ids=lambda c: c["kind"])
def test_spec_compiles_and_trains(mixer: dict[str, Any], channel: dict[str, Any]) -> None:
    spec = spec_from_dict(_tiny_spec(mixer, channel))
    model = archir.compile(spec, seed=0)
    assert archir.analyze(spec).params == sum(p.numel() for p in model.parameters())
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 32, (8, 25), generator=g)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(8):
        logits = model(tokens[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, 32), tokens[:, 1:].reshape(-1))
        aux = model.aux_loss()
        if channel["kind"] == "moe":
            assert aux is not None and torch.isfinite(aux)
        opt.zero_grad()
        (loss + aux if aux is not None else loss).backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.05


@pytest.mark.parametrize("name", ["hyena", "moe-transformer", "poolformer", "convformer"])
def test_zoo_spec_params(name: str) -> None:
    spec = archir.load_spec(ZOO / f"{name}.yaml")
    model = archir.compile(spec)
    assert archir.analyze(spec).params == sum(p.numel() for p in model.parameters())
    with torch.no_grad():
        out = model(torch.randint(0, 256, (1, 9)))
    assert out.shape == (1, 9, 256)


def _moe_lm(style: str, layers: int = 3) -> torch.nn.Module:
    from archir.compiler import compile as compile_spec
    from archir.spec import spec_from_dict

    moe = {
        "kind": "moe",
        "n_experts": 4,
        "top_k": 2,
        "d_ff": 16,
        "expert_kind": "swiglu",
        "capacity_factor": None,
        "aux_loss_weight": 0.02,
        "aux_loss_style": style,
    }
    data = {
        "archir": 1,
        "name": "moe-lm",
        "model": {
            "vocab_size": 64,
            "d_model": 32,
            "embed": {"kind": "token_embedding"},
            "layers": [{"repeat": layers, "blocks": [{"kind": "attention", "n_heads": 4}, moe]}],
            "head": {"kind": "lm_head"},
        },
    }
    return compile_spec(spec_from_dict(data), seed=0).train()


def _router_logits(model: torch.nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    logits: list[torch.Tensor] = []
    for b in model.blocks:
        if hasattr(b.fn, "router"):
            b.fn.router.register_forward_hook(lambda mod, i, o: logits.append(o.detach()))
    model(x)
    return logits


def test_mixtral_balancing_loss_pools_layers_as_transformers_does():
    """aux_loss_style mixtral: w · E · Σ_e (c_e / R)(p_e / R) over all layers' rows pooled
    (c: top-k assignments, p: summed router probabilities); switch: per layer, summed, and
    per layer it is the pooled formula divided by top_k."""
    x = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(1))
    m = _moe_lm("mixtral")
    logits = _router_logits(m, x)
    probs = [torch.softmax(g, -1) for g in logits]
    counts = sum(F.one_hot(p.topk(2, -1).indices, 4).float().sum((0, 1)) for p in probs)
    psum = sum(p.sum(0) for p in probs)
    rows = sum(p.shape[0] for p in probs)
    want = 0.02 * 4 * ((counts / rows) * (psum / rows)).sum()
    assert torch.allclose(m.aux_loss(), want, rtol=1e-6)
    s = _moe_lm("switch")
    _router_logits(s, x)
    per_layer = [
        0.02
        * 4
        * (
            (F.one_hot(p.topk(2, -1).indices, 4).float().sum((0, 1)) / (2 * p.shape[0])) * p.mean(0)
        ).sum()
        for p in probs
    ]
    assert torch.allclose(s.aux_loss(), sum(per_layer), rtol=1e-6)
    transformers = pytest.importorskip("transformers")
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    ref = 0.02 * load_balancing_loss_func(tuple(logits), 4, 2)
    assert torch.allclose(m.aux_loss(), ref, rtol=1e-6)
    del transformers
