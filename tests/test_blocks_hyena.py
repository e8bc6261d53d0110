"""Hyena (kind ``hyena``, Poli et al. 2023) against its reference code's conventions
(HazyResearch/safari ``src/models/sequence/hyena.py``), beyond the registry-driven tests in
tests/test_blocks_conv_moe.py.

A safari ``HyenaOperator`` (one head) is written here from its equations, with every tensor
in safari's layout: ``in_proj`` to ``order + 1`` parts, the short causal convolution, the
implicit filter (positional features, Sin MLP whose one frequency vector is shared by every
layer, channel-major ``(v o)`` outputs and decay rates), the FFT long convolution with the
``D`` bias, and the gates in safari's order (``reversed(x[1:])``, then ``x[0]``). archir's
block built from those tensors by reshapes only matches it to 1e-10 in fp64 (FFT and direct
paths, orders 2 and 3); the step form matches too; the counts of projections, filters and
state follow ``order``; ``order: 1`` is a located error. The exported graph's long-sequence
form (a DFT as MatMuls) is the causal convolution, and an exported Hyena matches PyTorch on
both sides of the length where it switches to it.
"""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from archir import registry
from archir.blocks.conv import Hyena, HyenaParams
from archir.registry import BuildContext
from tests.block_util import assert_located_param_error

D, L = 8, 40


def _build(d: int = D, max_len: int = L, **params: Any) -> tuple[Hyena, HyenaParams]:
    kind = registry.get("hyena")
    p = kind.params(**params)
    ctx = BuildContext(d_model=d, max_seq_len=max_len)
    kind.check(p, ctx)
    torch.manual_seed(0)
    m = kind.build(p, ctx)
    assert isinstance(m, Hyena)
    return m, p


def _safari_tensors(p: HyenaParams, d: int, seq_len: int) -> dict[str, torch.Tensor]:
    """Random weights and the fixed tensors of a safari HyenaOperator, in safari's shapes
    (``HyenaFilter`` of ``d·(order-1)`` channels; fp32, as safari builds them)."""
    g = torch.Generator().manual_seed(1)
    N, w, k = p.order, p.filter_width, p.short_kernel
    C = (N + 1) * d
    emb = p.emb_dim

    def r(*shape: int, s: float = 0.5) -> torch.Tensor:
        return torch.randn(*shape, generator=g) * s

    t: dict[str, torch.Tensor] = {
        "in_proj.weight": r(C, d),
        "in_proj.bias": r(C),
        "short_filter.weight": r(C, 1, k),
        "short_filter.bias": r(C),
        "out_proj.weight": r(d, d),
        "out_proj.bias": r(d),
        "filter_fn.bias": r((N - 1) * d),  # D, '(v o)'
        # one Sin module, shared by every layer of the MLP (implicit_filter.1, .3, ...)
        "filter_fn.implicit_filter.1.freq": 1.0 + r(1, w, s=0.2),
        "filter_fn.implicit_filter.0.weight": r(w, emb),
        "filter_fn.implicit_filter.0.bias": r(w),
        f"filter_fn.implicit_filter.{2 * p.filter_layers + 2}.weight": r((N - 1) * d, w, s=0.3),
    }
    for i in range(p.filter_layers):  # num_inner_mlps
        t[f"filter_fn.implicit_filter.{2 * i + 2}.weight"] = r(w, w, s=0.3)
        t[f"filter_fn.implicit_filter.{2 * i + 2}.bias"] = r(w)
    # PositionalEmbedding: z = [t, Re, Im] of exp(-i f w), t = linspace(0, 1, L)
    bands = (emb - 1) // 2
    tt = torch.linspace(0, 1, seq_len)[None, :, None]
    ww = 2 * math.pi * torch.linspace(0, seq_len - 1, seq_len)[None, :, None] / seq_len
    f = torch.linspace(1e-4, bands - 1, bands)[None, None]
    zc = torch.exp(-1j * f * ww)
    t["filter_fn.pos_emb.z"] = torch.cat([tt, zc.real, zc.imag], dim=-1)
    t["filter_fn.pos_emb.t"] = tt
    # ExponentialModulation over the d·(order-1) filter channels
    fast, slow = math.log(1e-2) / p.decay_fast, math.log(1e-2) / p.decay_slow
    t["filter_fn.modulation.deltas"] = torch.linspace(slow, fast, (N - 1) * d)[None, None]
    return t


def _safari_forward(u: torch.Tensor, t: dict[str, torch.Tensor], p: HyenaParams) -> torch.Tensor:
    """safari's ``HyenaOperator.forward`` (one head, one block, identity activation, no
    dropout), written from its equations: ``u [B, T, d] -> [B, T, d]``."""
    B, T, d = u.shape
    N, k = p.order, p.short_kernel
    x = (u @ t["in_proj.weight"].T + t["in_proj.bias"]).transpose(1, 2)  # b d l
    C = x.shape[1]
    sw, sb = t["short_filter.weight"], t["short_filter.bias"]
    uc = F.conv1d(x, sw, sb, padding=k - 1, groups=C)[..., :T]
    *xs, v = uc.split(d, dim=1)
    # implicit filter: Linear, Sin, (Linear, Sin)*, Linear (no bias); modulation
    fil = "filter_fn.implicit_filter"
    freq = t[f"{fil}.1.freq"]
    z = t["filter_fn.pos_emb.z"][:, :T]
    h = torch.sin(freq * (z @ t[f"{fil}.0.weight"].T + t[f"{fil}.0.bias"]))
    for i in range(2, 2 * p.filter_layers + 2, 2):
        h = torch.sin(freq * (h @ t[f"{fil}.{i}.weight"].T + t[f"{fil}.{i}.bias"]))
    h = h @ t[f"{fil}.{2 * p.filter_layers + 2}.weight"].T  # [1, T, (N-1)·d]
    h = h * torch.exp(-t["filter_fn.pos_emb.t"][:, :T] * t["filter_fn.modulation.deltas"].abs())
    kk = h[0].T.reshape(d, N - 1, T).permute(1, 0, 2)  # 'c l (v o) -> c o v l'
    bias = t["filter_fn.bias"].reshape(d, N - 1).T  # '(v o) -> o v'
    n = 2 * T
    for o, x_i in enumerate(reversed(xs[1:])):
        v = v * x_i
        k_f = torch.fft.rfft(kk[o], n=n) / n
        y = torch.fft.irfft(torch.fft.rfft(v, n=n) * k_f, n=n, norm="forward")[..., :T]
        v = y + v * bias[o][:, None]
    y = (v * xs[0]).transpose(1, 2)
    return y @ t["out_proj.weight"].T + t["out_proj.bias"]


def _port(m: Hyena, t: dict[str, torch.Tensor], p: HyenaParams) -> None:
    """Load safari-layout tensors into archir's block: renames and reshapes only (and, as a
    port of a trained model would, safari's positional features into the ``z`` buffer)."""
    sd = {
        "short.weight": t["short_filter.weight"],
        "short.bias": t["short_filter.bias"],
        "skip": t["filter_fn.bias"].reshape(m.d, p.order - 1),
    }
    for name in ("in_proj.weight", "in_proj.bias", "out_proj.weight", "out_proj.bias"):
        sd[name] = t[name]
    fil = "filter_fn.implicit_filter."
    for name, v in t.items():
        if name.startswith(fil):
            i, field = name[len(fil) :].split(".")
            if field == "freq":  # safari's one shared Sin -> each Sin layer here
                for j in range(1, 2 * p.filter_layers + 2, 2):
                    sd[f"filter.mlp.{j}.freq"] = v.reshape(-1)
            else:
                sd[f"filter.mlp.{i}.{field}"] = v
    m.load_state_dict(sd, strict=True)
    with torch.no_grad():
        m.filter.z.copy_(t["filter_fn.pos_emb.z"][0])


@pytest.mark.parametrize(
    "params,fft",
    [
        ({"order": 2, "filter_layers": 2, "emb_dim": 3}, "on"),  # safari's defaults
        ({"order": 3, "filter_layers": 1, "emb_dim": 5, "short_kernel": 4}, "on"),
        ({"order": 3, "filter_layers": 0, "emb_dim": 5, "decay_fast": 0.1}, "off"),
    ],
)
def test_matches_safari_operator_from_its_tensors(params: dict[str, Any], fft: str) -> None:
    m, p = _build(filter_width=12, fft=fft, **params)
    t = _safari_tensors(p, D, L)
    # same counts as safari: order+1 projections, order-1 filters, order-1 D's
    assert m.in_proj.out_features == (p.order + 1) * D
    assert m.filter.mlp[-1].out_features == (p.order - 1) * D
    # the decay rates are safari's modulation's, in its channel-major layout, bit for bit
    assert torch.equal(m.filter.deltas, t["filter_fn.modulation.deltas"][0])
    assert torch.equal(m.filter.t, t["filter_fn.pos_emb.t"][0])
    # the positional features are safari's (computed through sin/cos instead of exp(-i·))
    torch.testing.assert_close(m.filter.z, t["filter_fn.pos_emb.z"][0], atol=1e-6, rtol=0)
    _port(m, t, p)
    m = m.double()
    t64 = {name: v.double() for name, v in t.items()}
    x = torch.randn(2, 29, D, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = _safari_forward(x, t64, p)
        got = m(x)
    err = ((got - ref).abs().max() / ref.abs().max()).item()
    assert err <= 1e-10, err
    assert ref.abs().max() > 1e-3  # a real signal, not zeros


def test_step_matches_forward_in_fp64() -> None:
    m, p = _build(order=3, filter_width=12, short_kernel=4)
    _port(m, _safari_tensors(p, D, L), p)
    m = m.double()
    x = torch.randn(2, 23, D, dtype=torch.float64)
    with torch.no_grad():
        full = m(x)
        state = m.init_state(2, dtype=torch.float64)
        ys = []
        for i in range(x.shape[1]):
            y, state = m.step(x[:, i], state)
            ys.append(y)
    err = ((torch.stack(ys, 1) - full).abs().max() / full.abs().max()).item()
    assert err <= 1e-10, err


@pytest.mark.parametrize("order", [2, 4])
def test_counts_follow_order(order: int) -> None:
    kind = registry.get("hyena")
    m, p = _build(order=order, filter_width=16, short_kernel=3)
    ctx = BuildContext(d_model=D, max_seq_len=L)
    assert sum(q.numel() for q in m.parameters()) == kind.n_params(p, ctx)
    assert m.skip.shape == (D, order - 1)
    buf, hist = m.init_state(3)
    assert buf.shape == (3, (order + 1) * D, 2) and hist.shape == (3, order - 1, D, 0)
    # the history grows by one position per token (O(t) per token, not O(max_seq_len))
    state = (buf, hist)
    with torch.no_grad():
        for _ in range(5):
            _, state = m.step(torch.randn(3, D), state)
    buf, hist = state
    assert hist.shape == (3, order - 1, D, 5)
    real = 4 * (buf[0].numel() + hist[0].numel())
    assert kind.state_bytes(p, ctx, 5) == real


def test_order_one_is_a_located_error() -> None:
    assert_located_param_error("hyena", {"order": 1}, "order", "at least 2", d_model=D)


def test_hash_marks_the_order_convention() -> None:
    assert HyenaParams(order=3).hash_dump()["order_convention"] == "safari"


@pytest.mark.parametrize("T", [1, 2, 31, 32, 33, 97, 257, 700])
@pytest.mark.parametrize("n1,m1", [(8, 1), (64, 1), (8, 2), (16, 8), (64, 8)])
def test_dft_long_convolution_is_the_causal_convolution(T: int, n1: int, m1: int) -> None:
    """The exported graph's long-sequence form (Cooley–Tukey DFT as MatMuls, channels last;
    two stages, or three with ``m1 > 1``) against the convolution's definition
    ``y[t] = Σ_{s<=t} h[t-s]·z[s]`` (fp64 sums) and the FFT path, at lengths around the
    factor sizes, batch 1 and 3."""
    from archir.blocks.conv import causal_conv_dft, causal_conv_fft

    gen = torch.Generator().manual_seed(T)
    for B in (1, 3):
        z = torch.randn(B, 5, T, generator=gen)
        h = torch.randn(5, T, generator=gen) / math.sqrt(T)
        zz, hh = z.double(), h.double()
        ref = torch.stack(
            [(hh[:, : t + 1].flip(-1) * zz[..., : t + 1]).sum(-1) for t in range(T)], -1
        )
        got = causal_conv_dft(z.transpose(1, 2), h.T, n1, m1)
        assert got.shape == (B, T, 5)
        got = got.transpose(1, 2)
        scale = ref.abs().max().item()
        assert (got.double() - ref).abs().max().item() <= 2e-6 * scale
        fft = causal_conv_fft(z, h).double()
        assert (got.double() - fft).abs().max().item() <= 2e-6 * scale


@pytest.mark.parametrize("order,layers", [(2, 1), (3, 1), (4, 0)])
def test_filter_taps_by_group_are_the_filter(order: int, layers: int) -> None:
    """The exported graph's per-filter taps (``ImplicitFilter.taps``, time first, computed
    from the last Linear's rows of each filter) are the filter ``forward`` gives, regrouped:
    group ``o`` holds filter ``o`` of every channel."""
    m = Hyena(D, 64, HyenaParams(order=order, filter_width=12, filter_layers=layers))
    with torch.no_grad():
        ref = m._filters(40)  # [d, N-1, T]
        got = m.filter.taps(40, m.n_filters)
    assert len(got) == order - 1
    for o, g in enumerate(got):
        assert g.shape == (40, D)
        torch.testing.assert_close(g, ref[:, o].T, rtol=1e-6, atol=1e-7)


def test_exported_graph_switches_to_the_dft_past_the_direct_length(tmp_path) -> None:
    """An exported Hyena holds its forms behind ONNX ``If`` nodes on the length (the direct
    ``Conv`` up to :data:`DIRECT_MAX_LEN`, then each form of :data:`DFT_FORMS`, the last a
    three-stage DFT; one ``If`` per form, in a row) and matches PyTorch (its FFT) on
    onnxruntime on both sides of every switch, traced at a length where the DFT's derived
    sizes would be 1 (torch.export specialised the graph to the traced length when they
    were)."""
    import numpy as np
    import onnx

    from archir.blocks.conv import DFT_FORMS, DIRECT_MAX_LEN
    from exporters.parity import make_session

    torch.manual_seed(0)
    limits = [DIRECT_MAX_LEN] + [up_to for up_to, _, _ in DFT_FORMS[:-1]]
    L = limits[-1] + 64  # reaches every form
    m = Hyena(D, L, HyenaParams(order=3, filter_width=12)).eval()
    path = tmp_path / "hyena.onnx"
    T_ = torch.export.Dim("T", min=2, max=L)
    torch.onnx.export(
        m,
        (torch.randn(2, 16, D),),  # traced short: nothing may specialise the length
        str(path),
        input_names=["x"],
        dynamic_shapes={"x": {0: torch.export.Dim("B", min=1, max=8), 1: T_}},
        opset_version=20,
        dynamo=True,
        verbose=False,
    )
    graph = onnx.load(str(path)).graph
    ifs = [n for n in graph.node if n.op_type == "If"]
    assert len(ifs) == m.n_filters * (1 + len(DFT_FORMS))
    assert "DFT" not in [n.op_type for n in graph.node]

    def branches(node):  # type: ignore[no-untyped-def]
        return [[n.op_type for n in a.g.node] for a in node.attribute if a.type == a.GRAPH]

    # not nested; the direct form is a Conv, and every DFT runs channels last, as the graph
    # around it (no Transpose inside), with two more MatMuls each way for three stages
    forms = [ops for node in ifs for ops in branches(node) if "MatMul" in ops or "Conv" in ops]
    assert not any("If" in ops for node in ifs for ops in branches(node))
    assert sum("Conv" in ops for ops in forms) == m.n_filters
    dfts = [ops for ops in forms if "MatMul" in ops]
    assert all("Transpose" not in ops for ops in dfts)
    want = [9 if m1 > 1 else 6 for _, _, m1 in DFT_FORMS] * m.n_filters
    assert sorted(ops.count("MatMul") for ops in dfts) == sorted(want)
    sess = make_session(str(path))
    for T in (1, 40, *[t + d for t in limits for d in (0, 1)], L):
        x = torch.randn(2, T, D)
        with torch.no_grad():
            ref = m(x).numpy()  # eager: the FFT
        got = sess.run(None, {"x": x.numpy()})[0]
        assert np.abs(got - ref).max() <= 1e-5 * np.abs(ref).max(), T


def test_step_keeps_its_reversed_filter_until_the_parameters_change() -> None:
    """Eager decoding computes the reversed filter once, not every token, and computes it
    again after an in-place parameter update (the step still agrees with ``forward``)."""
    m, _ = _build(order=3, filter_width=12)
    m.eval()
    x = torch.randn(1, 6, D)

    def decode() -> torch.Tensor:
        state = m.init_state(1)
        ys = []
        with torch.no_grad():
            for i in range(x.shape[1]):
                y, state = m.step(x[:, i], state)
                ys.append(y)
        return torch.stack(ys, 1)

    calls = 0
    inner = m._filters

    def counting(T: int) -> torch.Tensor:
        nonlocal calls
        calls += 1
        return inner(T)

    m._filters = counting  # type: ignore[method-assign]
    with torch.no_grad():
        first = decode()
        assert calls == 1  # six tokens, one filter
        assert decode() is not None and calls == 1  # and the next sequence reuses it
        torch.testing.assert_close(first, m(x), atol=1e-5, rtol=1e-4)
        m.filter.mlp[0].weight.mul_(1.5)  # what an optimizer step does
        before = calls
        second = decode()
        assert calls == before + 1
        torch.testing.assert_close(second, m(x), atol=1e-5, rtol=1e-4)
        assert (second - first).abs().max() > 1e-4


@pytest.mark.parametrize(
    "T,max_len,form",
    [
        (64, 1024, "direct"),
        (128, 1024, "direct"),
        (192, 128, "direct"),
        (129, 1024, "dft"),
        (256, 1024, "dft"),
        (384, 1024, "dft"),
        (1024, 1024, "dft"),
        (1500, 2048, "dft"),
    ],
)
def test_exported_flops_are_those_of_the_form_the_export_runs(
    T: int, max_len: int, form: str
) -> None:
    """What the latency predictor counts for an exported Hyena: the direct convolution's
    ``2·T²`` up to :data:`DIRECT_MAX_LEN` (or in a model no longer than it), past it exactly
    the MatMul FLOPs that :func:`causal_conv_dft` runs in the form the export picks (torch's
    FLOP counter) plus the complex product — not the FFT estimate, flat in ``T``."""
    from torch.utils.flop_counter import FlopCounterMode

    from archir.blocks.conv import (
        DFT_FORMS,
        DIRECT_MAX_LEN,
        causal_conv_dft,
        exported_conv_form,
        exported_long_conv_flops,
    )

    p = HyenaParams(order=3)
    c = BuildContext(d_model=8, max_seq_len=max_len)
    assert exported_conv_form(p, c, T) == form
    assert exported_conv_form(p.model_copy(update={"fft": "on"}), c, T) == "fft"
    assert exported_conv_form(p.model_copy(update={"fft": "off"}), c, T) == "direct"
    flops = exported_long_conv_flops(p, c, T)
    if form == "direct":
        assert flops == 2.0 * T * T
        return
    limits = [DIRECT_MAX_LEN] + [up_to for up_to, _, _ in DFT_FORMS[:-1]]
    _, n1, m1 = DFT_FORMS[max(i for i, lo in enumerate(limits) if T > lo)]
    with FlopCounterMode(display=False) as counter:
        causal_conv_dft(torch.randn(1, T, 1), torch.randn(T, 1), n1, m1)
    m2 = 8 * ((2 * T + 8 * n1 * m1 - 1) // (8 * n1 * m1))
    product = 6.0 * (n1 // 2 + 1) * m1 * m2
    assert flops - product == counter.get_total_flops()
    assert flops > 3.0 * T * 128  # several times the FFT estimate's ~126-171 per position
