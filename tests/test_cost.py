"""The cost pass: exact params vs the real module, FLOPs vs torch's counter, state, bytes.

FLOPs are compared with ``torch.utils.flop_counter.FlopCounterMode`` *exactly*: archir counts
matmul-class work only (2 FLOPs per multiply-add), as the counter does. On CPU the fused
``scaled_dot_product_attention`` kernel is not seen by the counter, so attention is run under
the MATH backend, where ``QKᵀ`` and ``AV`` are ``bmm`` calls the counter sees (dense: a causal
mask or a window masks scores but does not skip them, and archir's formula counts them too).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

import archir
from archir import registry
from archir.cli import main
from archir.spec import load_spec, spec_from_dict
from tests.conftest import ZOO

ZOO_SPECS = sorted(ZOO.glob("*.yaml"))


def spec(blocks: list[dict[str, Any]], repeat: int = 2, **model: Any) -> Any:
    m = {
        "vocab_size": 64,
        "d_model": 32,
        "max_seq_len": 256,
        "embed": {"kind": "token_embedding"},
        "layers": [{"repeat": repeat, "blocks": blocks}],
        "head": {"kind": "lm_head"},
    }
    m.update(model)
    return spec_from_dict({"archir": 1, "name": "c", "model": m})


def _concrete(path: Path) -> Any:
    s = load_spec(path)
    if not s.is_concrete:
        pytest.skip("search space")
    return s


@pytest.mark.parametrize("path", ZOO_SPECS, ids=lambda p: p.stem)
def test_zoo_params_equal_module(path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    s = _concrete(path)
    model = archir.compile(s)
    real = sum(p.numel() for p in model.parameters())
    report = archir.analyze(s)
    assert report.params == real
    assert main(["show", str(path), "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["params"] == real
    assert shown["flops_per_token"] == report.flops_per_token
    assert sum(b["params"] for b in shown["blocks"]) == real


#: non-default options of ``flops_exact`` kinds (each kind's defaults: the registry-driven
#: test below); every kind named here must declare ``flops_exact``
FLOP_CASES = {
    "attention_rope": [{"kind": "attention", "n_heads": 4}],
    "attention_gqa_alibi_window": [
        {"kind": "attention", "n_heads": 4, "n_kv_heads": 2, "pos": "alibi", "window": 4}
    ],
    "attention_bias": [{"kind": "attention", "n_heads": 2, "qkv_bias": True, "pos": "none"}],
    "mlp": [{"kind": "mlp", "expansion": 3}],
    "swiglu": [{"kind": "swiglu"}],
    "geglu": [{"kind": "geglu", "d_ff": 48}],
    "transformer": [{"kind": "attention", "n_heads": 4}, {"kind": "swiglu"}],
}


@pytest.mark.parametrize("case", sorted(FLOP_CASES))
@pytest.mark.parametrize("seq", [8, 32])
def test_flops_per_token_match_torch_counter(case: str, seq: int) -> None:
    s = spec(FLOP_CASES[case])
    model = archir.compile(s).eval()
    batch = 2
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), counter:
        model(torch.randint(0, 64, (batch, seq)))
    measured = counter.get_total_flops() / (batch * seq)
    assert archir.analyze(s, seq_len=seq).flops_per_token == measured


EXACT_KINDS = [k.name for k in registry.kinds() if k.flops_exact]


def test_flops_exact_kinds_are_declared() -> None:
    # the registry says which FLOPs rules equal torch's counter; the kinds the hand-written
    # cases above compare with the counter are among them
    used = {b["kind"] for blocks in FLOP_CASES.values() for b in blocks}
    undeclared = sorted(used - set(EXACT_KINDS))
    assert not undeclared, f"FLOP_CASES uses kinds not declared flops_exact: {undeclared}"


@pytest.mark.parametrize("kind", EXACT_KINDS)
@pytest.mark.parametrize("seq", [8, 32])
def test_flops_of_every_exact_kind_match_torch_counter(kind: str, seq: int) -> None:
    """Every kind that declares ``flops_exact`` (registry ``BlockKind.flops_exact``), at its default
    parameters: the cost rule equals ``torch.utils.flop_counter`` on the real module."""
    s = spec([{"kind": kind}])
    model = archir.compile(s).eval()
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), counter:
        model(torch.randint(0, 64, (2, seq)))
    assert archir.analyze(s, seq_len=seq).flops_per_token == counter.get_total_flops() / (2 * seq)


def test_flops_tied_head_same_as_untied() -> None:
    a = spec([{"kind": "mlp"}], head={"kind": "lm_head", "tie_embeddings": True})
    b = spec([{"kind": "mlp"}])
    assert archir.analyze(a).flops_per_token == archir.analyze(b).flops_per_token
    assert archir.analyze(b).params - archir.analyze(a).params == 64 * 32


def test_attention_state_grows_with_length() -> None:
    s = spec([{"kind": "attention", "n_heads": 4}, {"kind": "mlp"}], repeat=3)
    s64, s128 = archir.analyze(s, 64).state_bytes, archir.analyze(s, 128).state_bytes
    assert s64 == 3 * 2 * 32 * 64 * 4  # layers x (K and V) x width x length x fp32
    assert s128 == 2 * s64
    gqa = spec([{"kind": "attention", "n_heads": 4, "n_kv_heads": 1}], repeat=1)
    assert archir.analyze(gqa, 64).state_bytes == 2 * 8 * 64 * 4
    window = spec([{"kind": "attention", "n_heads": 4, "window": 16}], repeat=1)
    assert archir.analyze(window, 64).state_bytes == archir.analyze(window, 128).state_bytes


MIXERS = [k for role in ("token_mixer", "channel_mixer") for k in registry.kinds(role)]


@pytest.mark.parametrize("kind", MIXERS, ids=lambda k: k.name)
def test_state_grows_exactly_where_declared(kind: registry.BlockKind) -> None:
    """The decoding state at 256 tokens exceeds the state at 64 exactly when the kind
    declares ``state_grows`` (attention's KV cache, hyena's history); a ``recurrent`` kind
    holds a state at all."""
    s = spec([{"kind": kind.name}], repeat=1)
    short, long = archir.analyze(s, 64).state_bytes, archir.analyze(s, 256).state_bytes
    assert (long > short) == kind.state_grows, (
        f"{kind.name}: state {short} B at 64 tokens, {long} B at 256, but the registry says "
        f"state_grows={kind.state_grows}: fix its state_bytes rule or its declaration"
    )
    assert long >= short
    if kind.recurrent:
        assert short > 0


def test_weight_bytes_honour_bits() -> None:
    s = spec(
        [{"kind": "attention", "n_heads": 4, "bits": 8}, {"kind": "mlp", "bits": 4}],
        bits=16,
        repeat=1,
    )
    r = archir.analyze(s)
    rows = {row.name: row for row in r.blocks}
    att, mlp = rows["layers.0.blocks.0"], rows["layers.0.blocks.1"]
    assert (att.bits, mlp.bits, rows["embed"].bits) == (8, 4, 16)
    assert att.weight_bytes == att.params * 8 / 8
    assert mlp.weight_bytes == mlp.params * 4 / 8
    assert rows["embed"].weight_bytes == 64 * 32 * 2
    assert r.weight_bytes == sum(row.weight_bytes for row in r.blocks)
    assert r.weight_bits_avg == pytest.approx(
        sum(row.params * row.bits for row in r.blocks) / r.params
    )
    ternary = spec([{"kind": "mlp", "bits": 1.58}], repeat=1, bits=8)
    rows = {row.name: row for row in archir.analyze(ternary).blocks}
    assert rows["layers.0.blocks.0"].weight_bytes == pytest.approx(
        rows["layers.0.blocks.0"].params * 1.58 / 8
    )
    assert rows["head"].weight_bytes == 64 * 32  # model-wide bits 8


def test_shared_weights_bytes_counted_once() -> None:
    one = archir.analyze(spec([{"kind": "mlp"}], repeat=1))
    many = archir.analyze(
        spec(
            [{"kind": "mlp"}],
            repeat=1,
            layers=[{"repeat": 5, "share_weights": True, "blocks": [{"kind": "mlp"}]}],
        )
    )
    assert many.params == one.params
    assert many.weight_bytes == one.weight_bytes
    assert many.flops_per_token == pytest.approx(
        one.flops_per_token + 4 * 4.0 * 32 * 128
    )  # 4 more calls of a 32 -> 128 -> 32 MLP


def test_default_seq_len_is_train_seq_len() -> None:
    s = load_spec(ZOO / "transformer.yaml")
    assert archir.analyze(s).seq_len == s.model.train.seq_len
