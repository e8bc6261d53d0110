"""Decoding with a carried state (issue 14): a causal language model fed one token at a time
through ``CompiledModel.step`` gives the logits ``forward`` gives on the whole sequence.

The kinds come from the registry: every token mixer and every channel mixer, each in a small
causal LM, plus the variants that change what a state holds (sliding window, grouped-query
heads, ALiBi, learned and sinusoidal positions, shared weights, DenseFormer inputs), every
zoo language model, and a model trained on real text.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

import archir
from archir import registry
from archir.errors import DecodeError
from archir.spec import spec_from_dict
from tests.conftest import ZOO

D, VOCAB, MAX_LEN = 32, 64, 48
RTOL = 1e-4

#: parameters a kind needs to build at d_model 32 (defaults otherwise)
KIND_PARAMS: dict[str, dict[str, Any]] = {"hyena": {"filter_width": 16}}


def lm(mixer: dict[str, Any], channel: dict[str, Any] | None = None, **model: Any) -> Any:
    """A 2-layer causal LM with ``mixer`` and ``channel`` blocks."""
    channel = channel or {"kind": "mlp", "expansion": 2}
    data: dict[str, Any] = {
        "archir": 1,
        "name": "decode-probe",
        "model": {
            "task": "causal_lm",
            "vocab_size": VOCAB,
            "d_model": D,
            "max_seq_len": MAX_LEN,
            "embed": {"kind": "token_embedding"},
            "layers": [{"repeat": 2, "blocks": [mixer, channel]}],
            "head": {"kind": "lm_head"},
            **model,
        },
    }
    return spec_from_dict(data)


def decode_all(model: Any, tokens: torch.Tensor) -> torch.Tensor:
    """Logits ``[batch, T, vocab]`` by stepping through ``tokens [batch, T]``."""
    state = model.init_state(tokens.shape[0])
    out = []
    for t in range(tokens.shape[1]):
        logits, state = model.step(tokens[:, t], state)
        out.append(logits)
    return torch.stack(out, dim=1)


def assert_decode_matches(model: Any, tokens: torch.Tensor) -> None:
    with torch.no_grad():
        full = model(tokens)
        stepped = decode_all(model, tokens)
    scale = max(1.0, full.abs().max().item())
    err = (stepped - full).abs().max().item()
    assert err <= RTOL * scale, f"max |decode - forward| {err:.3g} (scale {scale:.3g})"


def _mixer_kinds() -> list[str]:
    return [k.name for k in registry.kinds("token_mixer")]


def _channel_kinds() -> list[str]:
    return [k.name for k in registry.kinds("channel_mixer")]


@pytest.mark.parametrize("kind", _mixer_kinds())
def test_every_token_mixer_decodes_like_forward(kind: str) -> None:
    torch.manual_seed(0)
    model = archir.compile(lm({"kind": kind, **KIND_PARAMS.get(kind, {})}), seed=0).eval()
    for T in (1, 17, MAX_LEN):
        assert_decode_matches(model, torch.randint(0, VOCAB, (3, T)))


@pytest.mark.parametrize("kind", _channel_kinds())
def test_every_channel_mixer_decodes_like_forward(kind: str) -> None:
    mixer = {"kind": "attention", "n_heads": 4}
    model = archir.compile(lm(mixer, {"kind": kind, **KIND_PARAMS.get(kind, {})}), seed=0)
    assert_decode_matches(model.eval(), torch.randint(0, VOCAB, (2, 33)))


@pytest.mark.parametrize(
    "mixer",
    [
        {"kind": "attention", "n_heads": 4, "window": 5},
        {"kind": "attention", "n_heads": 4, "n_kv_heads": 2},
        {"kind": "attention", "n_heads": 4, "n_kv_heads": 1, "pos": "alibi", "window": 7},
        {"kind": "attention", "n_heads": 4, "pos": "none", "qkv_bias": True},
        {"kind": "pooling", "pool_size": 4},
        {"kind": "sepconv", "kernel_size": 3, "activation": "gelu", "bias": True},
        {"kind": "token_mlp", "expansion": 1.5},
    ],
    ids=lambda m: "-".join(f"{v}" for v in m.values()),
)
def test_state_variants_decode_like_forward(mixer: dict[str, Any]) -> None:
    model = archir.compile(lm(mixer), seed=1).eval()
    assert_decode_matches(model, torch.randint(0, VOCAB, (2, 40)))


@pytest.mark.parametrize("pos", ["learned", "sinusoidal"])
def test_absolute_positions_and_norm_styles_decode(pos: str) -> None:
    spec = lm({"kind": "gla", "n_heads": 2}, {"kind": "swiglu"}, norm="layernorm")
    data = spec.data
    data["model"]["embed"]["pos"] = pos
    data["model"]["layers"][0]["residual"] = "post_norm"
    model = archir.compile(spec_from_dict(data), seed=0).eval()
    assert_decode_matches(model, torch.randint(0, VOCAB, (2, 30)))


def test_shared_weights_and_denseformer_inputs_decode() -> None:
    """A block called twice with the same weights keeps one state per call; a merge of
    earlier outputs (DenseFormer) is per token."""
    path = ZOO / "denseformer.yaml"
    if not path.exists():
        pytest.skip("no denseformer zoo spec")
    model = archir.compile(archir.load_spec(path), seed=0).eval()
    assert_decode_matches(model, torch.randint(0, 256, (2, 24)))


def _zoo_lms() -> list[Any]:
    out = []
    for p in sorted(ZOO.glob("*.yaml")):
        spec = archir.load_spec(p)
        if spec.model.model.task == "causal_lm":
            out.append(pytest.param(p, id=p.stem))
    return out


@pytest.mark.parametrize("path", _zoo_lms())
def test_every_zoo_language_model_decodes_like_forward(path: Any) -> None:
    model = archir.compile(archir.load_spec(path), seed=0).eval()
    assert_decode_matches(model, torch.randint(0, 256, (2, 40)))


def test_trained_model_on_real_text_decodes_like_forward() -> None:
    """Weights that learned something (a trained MoE router, trained gates and decays) and
    real text, not fresh init and random tokens."""
    from archir.tasks import get_task
    from archir.train import train

    spec = lm({"kind": "mamba", "d_state": 8}, {"kind": "moe", "n_experts": 4, "top_k": 2})
    data = spec.data
    data["model"]["vocab_size"] = 256
    data["model"]["layers"].append(
        {"blocks": [{"kind": "attention", "n_heads": 4, "window": 16}, {"kind": "swiglu"}]}
    )
    data["train"] = {
        "task": "text:pydoc",
        "steps": 60,
        "batch_size": 8,
        "seq_len": 48,
        "lr": 3e-3,
        "warmup_steps": 5,
        "eval_batches": 1,
    }
    model = train(spec_from_dict(data)).model.eval()
    x, _ = next(iter(get_task("text:pydoc").val_batches(3, 48, 1)))
    assert_decode_matches(model, x)


def test_models_that_cannot_decode_say_why() -> None:
    bidir = lm({"kind": "attention", "n_heads": 4, "causal": False})
    with pytest.raises(DecodeError, match="bidirectional"):
        archir.compile(bidir).init_state(1)
    cls = archir.load_spec(ZOO / "vit-tiny.yaml") if (ZOO / "vit-tiny.yaml").exists() else None
    if cls is not None:
        with pytest.raises(DecodeError, match="causal language model"):
            archir.compile(cls).init_state(1)


def test_past_max_seq_len_where_the_kind_cannot_go_on() -> None:
    """Learned positions and token_mlp end at max_seq_len; RoPE attention and recurrent
    kinds go on."""
    model = archir.compile(lm({"kind": "token_mlp"}), seed=0).eval()
    state = model.init_state(1)
    tok = torch.zeros(1, dtype=torch.long)
    with torch.no_grad():
        for _ in range(MAX_LEN):
            _, state = model.step(tok, state)
        with pytest.raises(ValueError, match="max_seq_len"):
            model.step(tok, state)
    for kind in ("attention", "gla", "mamba"):
        model = archir.compile(lm({"kind": kind}), seed=0).eval()
        state = model.init_state(1)
        with torch.no_grad():
            for _ in range(MAX_LEN + 5):
                logits, state = model.step(tok, state)
        assert torch.isfinite(logits).all()
