"""Hugging Face interop (``archir.interop``): import a causal-LM folder as spec + weights, export
a spec back to a folder ``transformers`` loads.

* Round trips per registered family (tiny models built from configs, perturbed so nothing is
  init-symmetric) and variants (Llama 3 rope scaling + head_dim + biases + tied head, linear
  rope scaling, Mistral's sliding window, GPT-2 activations, Qwen2 biases): the import's own
  parity report, then this file's independent logit comparisons (archir vs transformers on
  real text, and transformers on the exported folder vs the original). These need
  ``transformers`` (skipped without it).
* Refusals (unknown config fields, rope types, quantized checkpoints, weights that do not fit,
  hostile folders and pickles), the parity gate, the CLI and the tokenizer copy. Their source
  folders are written by archir's own exporter, so they run without ``transformers``.
"""

from __future__ import annotations

import json
import os
import pickle
import pydoc
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, load_model, save_file

import archir
from archir.blocks.attention import Attention
from archir.cli import main
from archir.compiler import compile as compile_spec
from archir.errors import ArchirError, InteropError
from archir.interop import (
    PARITY_RTOL,
    export_hf,
    families,  # see test_interop_families_stays_a_function
    import_hf,
)
from archir.spec import spec_from_dict
from tests.conftest import ZOO

try:  # the parity tests need transformers; the refusal and CLI tests do not
    import transformers
except ImportError:  # pragma: no cover - transformers is a test dependency here
    transformers = None

needs_transformers = pytest.mark.skipif(
    transformers is None, reason="transformers is not installed (pip install archir[hf])"
)

RTOL = 1e-4
T = 48  # tokens per row (GPT-2's n_positions is 64)


# -- helpers ----------------------------------------------------------------------------------


def text_tokens(vocab: int, t: int = T) -> torch.Tensor:
    """``[2, t]``: two stretches of real English/Python text (pydoc's source bytes) mod
    ``vocab`` — other tokens than the import's own parity check uses."""
    data = Path(pydoc.__file__).read_bytes()
    rows = [list(data[o : o + t]) for o in (2000, 9000)]
    return torch.tensor(rows, dtype=torch.long) % vocab


def rel_err(ours: torch.Tensor, theirs: torch.Tensor) -> float:
    """``max |ours − theirs| / max |theirs|``."""
    return float((ours - theirs).abs().max() / theirs.abs().max())


def perturb_(model: torch.nn.Module, seed: int = 0, scale: float = 0.05) -> None:
    """Seeded noise on every parameter: biases start at zero, norms at one, and transformers'
    initialization makes many tensors alike."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)


def refused(src: Path, out: Path, *words: str, **kw: Any) -> InteropError:
    """``import_hf(src, out)`` raises InteropError mentioning every word, and writes nothing
    (``out`` stays absent or as it was)."""
    before = sorted(os.listdir(out)) if out.exists() else None
    with pytest.raises(InteropError) as info:
        import_hf(src, out, **kw)
    msg = str(info.value)
    for w in words:
        assert w in msg, (w, msg)
    if before is None:
        assert not out.exists(), f"a refused import created {out}"
    else:
        assert sorted(os.listdir(out)) == before
    return info.value


def read_json(p: Path) -> dict[str, Any]:
    return json.loads(p.read_text())


def write_json(p: Path, data: Any) -> None:
    p.write_text(json.dumps(data, indent=2))


# -- source folders made by archir itself (no transformers needed) ----------------------------

LLAMA_SPEC: dict[str, Any] = {
    "archir": 1,
    "name": "tiny-llama",
    "model": {
        "task": "causal_lm",
        "vocab_size": 64,
        "d_model": 32,
        "max_seq_len": 128,
        "norm": "rmsnorm",
        "norm_eps": 1e-6,
        "embed": {"kind": "token_embedding"},
        "layers": [
            {
                "repeat": 2,
                "blocks": [
                    {"kind": "attention", "n_heads": 4, "n_kv_heads": 2, "pos": "rope"},
                    {"kind": "swiglu", "d_ff": 48},
                ],
            }
        ],
        "head": {"kind": "lm_head"},
    },
}


@pytest.fixture(scope="module")
def llama_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A Llama folder (config.json + model.safetensors) written by ``export_hf`` from a
    perturbed archir model; copy it before changing anything."""
    root = tmp_path_factory.mktemp("llama-base")
    spec = spec_from_dict(LLAMA_SPEC)
    model = compile_spec(spec, seed=0)
    perturb_(model, seed=1)
    from safetensors.torch import save_model

    save_model(model, str(root / "archir.safetensors"))
    export_hf(spec, root / "hf", weights=str(root / "archir.safetensors"), check=False)
    assert {p.name for p in (root / "hf").iterdir()} == {"config.json", "model.safetensors"}
    return root / "hf"


@pytest.fixture
def llama_src(llama_base: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "src"
    shutil.copytree(llama_base, dst)
    return dst


def edit_config(src: Path, **fields: Any) -> None:
    cfg = read_json(src / "config.json")
    for k, v in fields.items():
        if v is None:
            cfg.pop(k, None)
        else:
            cfg[k] = v
    write_json(src / "config.json", cfg)


# -- families: tiny transformers configs --------------------------------------------------------

_DEC = dict(
    vocab_size=64,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    intermediate_size=48,
    max_position_embeddings=128,
)

#: family -> transformers config for a tiny model of it. Every registered family must be here
#: (test_every_family_has_a_round_trip): a new family without a round trip fails.
FAMILY_CONFIGS: dict[str, Callable[[Any], Any]] = {
    "llama": lambda tf: tf.LlamaConfig(**_DEC),
    "mistral": lambda tf: tf.MistralConfig(**_DEC, sliding_window=16),
    "qwen2": lambda tf: tf.Qwen2Config(**_DEC),
    "mixtral": lambda tf: tf.MixtralConfig(
        **_DEC, num_local_experts=4, num_experts_per_tok=2, sliding_window=None
    ),
    "gpt2": lambda tf: tf.GPT2Config(
        vocab_size=64,
        n_embd=32,
        n_layer=2,
        n_head=4,
        n_positions=64,
        activation_function="gelu_new",
        bos_token_id=0,
        eos_token_id=0,
    ),
    "mamba": lambda tf: tf.MambaConfig(
        vocab_size=64, hidden_size=32, num_hidden_layers=2, state_size=8
    ),
    "rwkv": lambda tf: tf.RwkvConfig(
        vocab_size=64, hidden_size=32, num_hidden_layers=2, context_length=64
    ),
}


@dataclass
class RoundTrip:
    """What a round trip leaves for the variant checks."""

    hf: Any  # the original transformers model
    spec: Any  # out/spec.yaml, re-loaded
    model: Any  # archir's compiled model with out/model.safetensors
    tokens: torch.Tensor
    src: Path
    out: Path
    back: Path
    report: Any
    extra: dict[str, Any] = field(default_factory=dict)


def round_trip(
    tmp_path: Path,
    family: str,
    config: Any,
    edit: Callable[[Path], None] | None = None,
    export_family: str | None = None,
) -> RoundTrip:
    """HF model -> save -> import -> (reload spec, compile, load weights) -> export -> HF,
    with the logit checks at each stage."""
    tf = transformers
    tf.logging.set_verbosity_error()
    torch.manual_seed(0)
    hf = tf.AutoModelForCausalLM.from_config(config).eval()
    perturb_(hf, seed=2)
    src, out, back = tmp_path / "src", tmp_path / "out", tmp_path / "back"
    hf.save_pretrained(src)
    if edit is not None:
        edit(src)

    report = import_hf(src, out)
    assert report.family == family
    assert report.parity is not None
    assert report.parity.rel <= PARITY_RTOL == RTOL
    assert report.parity.argmax_agree == 1.0
    assert {"spec.yaml", "model.safetensors", "import.json"} <= set(os.listdir(out))
    assert read_json(out / "import.json")["family"] == family

    # independently of the import's parity helper: reload what was written
    spec = archir.load_spec(out / "spec.yaml")
    model = compile_spec(spec).eval()
    load_model(model, str(out / "model.safetensors"), strict=True)
    assert report.params == sum(p.numel() for p in model.parameters())
    tokens = text_tokens(spec.model.model.vocab_size)
    with torch.no_grad():
        ours = model(tokens)
        theirs = hf(input_ids=tokens).logits
    assert ours.shape == theirs.shape
    assert rel_err(ours, theirs) <= RTOL, rel_err(ours, theirs)
    assert bool((ours.argmax(-1) == theirs.argmax(-1)).all())

    # export back and let transformers load it
    ereport = export_hf(spec, back, weights=str(out / "model.safetensors"))
    assert ereport.family == (export_family or family)
    assert ereport.parity is not None and ereport.parity.ok
    hf2 = tf.AutoModelForCausalLM.from_pretrained(back, local_files_only=True).eval()
    if export_family is None:
        assert type(hf2) is type(hf)
    with torch.no_grad():
        again = hf2(input_ids=tokens).logits
    assert rel_err(again, theirs) <= RTOL, rel_err(again, theirs)
    return RoundTrip(hf, spec, model, tokens, src, out, back, report)


def _attention_params(spec: Any) -> list[Any]:
    return [b.params for g in spec.model.model.layers for b in g.blocks if b.kind == "attention"]


def test_every_family_has_a_round_trip() -> None:
    registered = {f.name for f in families()}
    assert registered == set(FAMILY_CONFIGS), (
        f"families without a round-trip config: {sorted(registered - set(FAMILY_CONFIGS))}; "
        f"configs of no family: {sorted(set(FAMILY_CONFIGS) - registered)}"
    )
    for f in families():
        assert f.architectures and f.model_type and f.paper


@needs_transformers
@pytest.mark.parametrize("family", [f.name for f in families()])
def test_family_round_trip(family: str, tmp_path: Path) -> None:
    rt = round_trip(tmp_path, family, FAMILY_CONFIGS[family](transformers))
    assert rt.spec.model.model.d_model == 32
    # the spec is concrete and validates on its own (a fresh load, a fresh compile)
    assert archir.load_spec(rt.out / "spec.yaml").model.model.vocab_size == 64


# -- variants -----------------------------------------------------------------------------------


def _set_on_attention(model: torch.nn.Module, **attrs: Any) -> None:
    n = 0
    for m in model.modules():
        if isinstance(m, Attention):
            for k, v in attrs.items():
                setattr(m, k, v)
            n += 1
    assert n > 0


def _changes_logits(rt: RoundTrip, **attrs: Any) -> float:
    """Relative change of archir's logits when ``attrs`` are set on every attention module
    (the option the variant tests really matters at these sizes)."""
    with torch.no_grad():
        before = rt.model(rt.tokens)
        _set_on_attention(rt.model, **attrs)
        after = rt.model(rt.tokens)
    return rel_err(after, before)


def _llama3(tf: Any) -> Any:
    return tf.LlamaConfig(
        **{**_DEC, "max_position_embeddings": 512},
        head_dim=16,  # 4 heads × 16 = 64 != hidden 32
        attention_bias=True,
        tie_word_embeddings=True,
        rope_parameters={
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
            "rope_theta": 10000.0,
        },
    )


def _check_llama3(rt: RoundTrip) -> None:
    (pa, *_) = _attention_params(rt.spec)
    assert pa.head_dim == 16 and pa.qkv_bias and pa.out_bias
    sc = pa.rope_scaling
    assert (sc.type, sc.factor, sc.original_max_seq_len) == ("llama3", 8.0, 64)
    assert rt.spec.model.model.head.params.tie_embeddings
    cfg = read_json(rt.back / "config.json")
    assert cfg["head_dim"] == 16 and cfg["tie_word_embeddings"] is True
    assert tuple(rt.model.state_dict()["blocks.0.fn.q.weight"].shape) == (64, 32)
    assert _changes_logits(rt, scaling=None) > 1e-3


def _linear(tf: Any) -> Any:
    return tf.LlamaConfig(
        **_DEC, rope_parameters={"rope_type": "linear", "factor": 4.0, "rope_theta": 500.0}
    )


def _check_linear(rt: RoundTrip) -> None:
    (pa, *_) = _attention_params(rt.spec)
    assert pa.rope_scaling.type == "linear" and pa.rope_scaling.factor == 4.0
    assert pa.rope_base == 500.0
    assert _changes_logits(rt, scaling=None) > 1e-3


def _pre5_layout(src: Path) -> None:
    """The config layout of transformers < 5: ``rope_theta`` + ``rope_scaling {type}``."""
    cfg = read_json(src / "config.json")
    params = cfg.pop("rope_parameters")
    cfg["rope_theta"] = params["rope_theta"]
    cfg["rope_scaling"] = {"type": params["rope_type"], "factor": params["factor"]}
    write_json(src / "config.json", cfg)


def _mistral_window(tf: Any) -> Any:
    return tf.MistralConfig(**_DEC, sliding_window=8)  # < T and < the parity check's 64


def _check_window(rt: RoundTrip) -> None:
    assert {pa.window for pa in _attention_params(rt.spec)} == {8}
    assert read_json(rt.back / "config.json")["sliding_window"] == 8
    assert _changes_logits(rt, window=None) > 1e-3  # the window matters at this length


def _mistral_no_window(tf: Any) -> Any:
    return tf.MistralConfig(**_DEC, sliding_window=None)


def _check_no_window(rt: RoundTrip) -> None:
    assert {pa.window for pa in _attention_params(rt.spec)} == {None}
    # a window-less Mistral computes what a Llama does: it exports as one
    assert read_json(rt.back / "config.json")["architectures"] == ["LlamaForCausalLM"]


def _gpt2_relu_untied(tf: Any) -> Any:
    return tf.GPT2Config(
        vocab_size=64,
        n_embd=32,
        n_layer=2,
        n_head=4,
        n_positions=64,
        n_inner=48,
        activation_function="relu",
        tie_word_embeddings=False,
        bos_token_id=0,
        eos_token_id=0,
    )


def _check_gpt2_relu(rt: RoundTrip) -> None:
    blocks = rt.spec.model.model.layers[0].blocks
    assert blocks[1].params.activation == "relu" and blocks[1].params.d_ff == 48
    assert not rt.spec.model.model.head.params.tie_embeddings
    assert read_json(rt.back / "config.json")["activation_function"] == "relu"


def _check_gelu_new(rt: RoundTrip) -> None:
    blocks = rt.spec.model.model.layers[0].blocks
    assert blocks[1].params.activation == "gelu_tanh"
    assert read_json(rt.back / "config.json")["activation_function"] == "gelu_new"


def _check_qwen2(rt: RoundTrip) -> None:
    (pa, *_) = _attention_params(rt.spec)
    assert pa.qkv_bias and not pa.out_bias
    sd = rt.model.state_dict()
    hf_sd = rt.hf.state_dict()
    for ours, theirs in (("q", "q_proj"), ("k", "k_proj"), ("v", "v_proj")):
        b = hf_sd[f"model.layers.1.self_attn.{theirs}.bias"]
        assert b.abs().max() > 0  # perturbed: the biases carry signal
        assert torch.equal(sd[f"blocks.2.fn.{ours}.bias"], b)
    assert "blocks.0.fn.o.bias" not in sd


def _llama_gelu(tf: Any) -> Any:
    return tf.LlamaConfig(**_DEC, hidden_act="gelu", mlp_bias=True)


def _check_llama_gelu(rt: RoundTrip) -> None:
    kinds = [b.kind for b in rt.spec.model.model.layers[0].blocks]
    assert kinds == ["attention", "geglu"]
    assert rt.spec.model.model.layers[0].blocks[1].params.bias


VARIANTS: dict[str, tuple[str, Callable[[Any], Any], Callable[[Path], None] | None, Any]] = {
    # Regression (was a bug in archir/interop/mistral.py _rules -> _pairs): a Mistral config with
    # "sliding_window": null (Mistral-7B-v0.2/v0.3 and most Mistral-architecture checkpoints)
    # builds a window-less spec, but the import's tensor rules call _pairs, which refuses
    # any spec without a window ("not a mistral model: its attention has no sliding window
    # (that is Llama)"), so the import fails. Expected: the import maps the tensors (the
    # window is an export-time discriminator only) and the export writes a Llama folder.
    "mistral-no-window": ("mistral", _mistral_no_window, None, _check_no_window),
    "llama-llama3-headdim-bias-tied": ("llama", _llama3, None, _check_llama3),
    "llama-linear-rope": ("llama", _linear, None, _check_linear),
    "llama-linear-rope-pre5-config": ("llama", _linear, _pre5_layout, _check_linear),
    "llama-geglu-mlp-bias": ("llama", _llama_gelu, None, _check_llama_gelu),
    "mistral-sliding-window": ("mistral", _mistral_window, None, _check_window),
    "gpt2-gelu-new": ("gpt2", FAMILY_CONFIGS["gpt2"], None, _check_gelu_new),
    "gpt2-relu-untied": ("gpt2", _gpt2_relu_untied, None, _check_gpt2_relu),
    "qwen2-biases": ("qwen2", FAMILY_CONFIGS["qwen2"], None, _check_qwen2),
}


@needs_transformers
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_variant_round_trip(variant: str, tmp_path: Path) -> None:
    family, config, edit, check = VARIANTS[variant]
    export_family = "llama" if variant == "mistral-no-window" else None
    rt = round_trip(tmp_path, family, config(transformers), edit, export_family)
    check(rt)


@needs_transformers
def test_rwkv_layer_norm_epsilon_is_reproduced_or_refused_where_it_is_read(
    tmp_path: Path,
) -> None:
    # Regression (was a bug in archir/interop/rwkv.py _to_spec/_to_config): transformers' RWKV builds pre_ln,
    # ln1 and ln2 with layer_norm_epsilon but its final ln_out with LayerNorm's default
    # 1e-5; archir's mapping gives every norm (final one included) norm_eps =
    # layer_norm_epsilon. With layer_norm_epsilon != 1e-5 the logits differ (relative 1e-2
    # at eps 1e-2, 5e-4 at 1e-3) and the import is refused by the parity gate with an
    # unlocated "does not match" (export writes the same mismatch). Expected: reproduced
    # (final norm at 1e-5), or refused up front at config.json: layer_norm_epsilon.
    cfg = transformers.RwkvConfig(
        vocab_size=64,
        hidden_size=32,
        num_hidden_layers=2,
        context_length=64,
        layer_norm_epsilon=1e-2,
    )
    try:
        round_trip(tmp_path, "rwkv", cfg)
    except InteropError as exc:
        assert exc.location is not None and exc.location.field == "layer_norm_epsilon", str(exc)


@needs_transformers
@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_tied_checkpoint_that_also_stores_lm_head_imports(family: str, tmp_path: Path) -> None:
    # Regression (was a bug in archir/interop/hf.py hf_to_archir, optional_hf/unused_hf of the families): a tied
    # model's checkpoint written with torch.save(model.state_dict()) (or by tools that do
    # not drop tied copies) holds lm_head.weight, identical to the embedding; transformers
    # loads it, archir refuses it ("1 checkpoint tensor(s) have no place ... 'lm_head.weight'").
    # Expected: a copy equal to the embedding is accepted (one that differs refused, since
    # the config's tie would then be false).
    tf = transformers
    cfg = (
        tf.LlamaConfig(**_DEC, tie_word_embeddings=True)
        if family == "llama"
        else FAMILY_CONFIGS["gpt2"](tf)
    )
    torch.manual_seed(0)
    hf = tf.AutoModelForCausalLM.from_config(cfg).eval()
    perturb_(hf, seed=3)
    src = tmp_path / "src"
    hf.save_pretrained(src)
    (src / "model.safetensors").unlink()
    sd = hf.state_dict()
    assert "lm_head.weight" in sd
    torch.save(sd, src / "pytorch_model.bin")
    report = import_hf(src, tmp_path / "out")
    assert report.parity is not None and report.parity.ok


# -- refusals: config -------------------------------------------------------------------------


def test_unknown_config_field_is_refused_with_its_name(llama_src: Path, tmp_path: Path) -> None:
    edit_config(llama_src, foo_scale=2)
    err = refused(llama_src, tmp_path / "out", "'foo_scale'", "config.json", "llama")
    assert err.location is not None and err.location.field == "foo_scale"
    assert err.location.file is not None and err.location.file.endswith("config.json")


@pytest.mark.parametrize(
    ("fields", "field", "words"),
    [
        (
            {
                "rope_parameters": {
                    "rope_type": "yarn",
                    "factor": 4.0,
                    "rope_theta": 10000.0,
                    "original_max_position_embeddings": 64,
                }
            },
            "rope_parameters",
            ("'yarn'",),
        ),
        (
            {"rope_parameters": None, "rope_scaling": {"type": "dynamic", "factor": 2.0}},
            "rope_scaling",
            ("'dynamic'",),
        ),
        (
            {
                "rope_parameters": {
                    "rope_type": "linear",
                    "factor": 2.0,
                    "rope_theta": 1e4,
                    "beta_fast": 3,
                }
            },
            "rope_parameters",
            ("beta_fast",),
        ),
        (
            {"quantization_config": {"quant_method": "bitsandbytes", "load_in_8bit": True}},
            "quantization_config",
            ("quantized",),
        ),
        ({"hidden_act": "relu"}, "hidden_act", ("'relu'",)),
        ({"hidden_size": "32"}, "hidden_size", ("should be int",)),
        ({"num_attention_heads": 0}, "num_attention_heads", ("outside",)),
    ],
    ids=["yarn", "dynamic-old-layout", "unknown-rope-field", "quantized", "act", "type", "range"],
)
def test_config_values_archir_cannot_honour_are_refused(
    llama_src: Path, tmp_path: Path, fields: dict[str, Any], field: str, words: tuple[str, ...]
) -> None:
    edit_config(llama_src, **fields)
    err = refused(llama_src, tmp_path / "out", *words)
    assert err.location is not None and err.location.field == field, str(err)
    assert err.location.file is not None and err.location.file.endswith("config.json")


MAMBA_CFG = {
    "architectures": ["MambaForCausalLM"],
    "model_type": "mamba",
    "vocab_size": 64,
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "state_size": 8,
}
RWKV_CFG = {
    "architectures": ["RwkvForCausalLM"],
    "model_type": "rwkv",
    "vocab_size": 64,
    "hidden_size": 32,
    "num_hidden_layers": 2,
}


@pytest.mark.parametrize(
    ("cfg", "bad", "field"),
    [
        (MAMBA_CFG, {"use_bias": True}, "use_bias"),
        (MAMBA_CFG, {"hidden_act": "gelu"}, "hidden_act"),
        (RWKV_CFG, {"attention_hidden_size": 64}, "attention_hidden_size"),
    ],
)
def test_family_specific_refusals(
    tmp_path: Path, cfg: dict[str, Any], bad: dict[str, Any], field: str
) -> None:
    src = tmp_path / "src"
    src.mkdir()
    # the config alone (no weights) gets as far as the weights
    write_json(src / "config.json", cfg)
    refused(src, tmp_path / "out", "has no weights")
    write_json(src / "config.json", {**cfg, **bad})
    err = refused(src, tmp_path / "out", field)
    assert err.location is not None and err.location.field == field


def test_unknown_family_and_non_causal_architectures_are_refused(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    write_json(src / "config.json", {"architectures": ["BertModel"], "model_type": "bert"})
    refused(src, tmp_path / "out", "no archir family", "LlamaForCausalLM")
    write_json(src / "config.json", {"architectures": ["LlamaForSequenceClassification"], **_DEC})
    edit_config(src, model_type="llama")
    refused(src, tmp_path / "out", "only causal language models")


def test_config_json_not_json(llama_src: Path, tmp_path: Path) -> None:
    (llama_src / "config.json").write_text("{ not json")
    refused(llama_src, tmp_path / "out", "not valid JSON")
    (llama_src / "config.json").write_text("[1, 2]")
    refused(llama_src, tmp_path / "out", "not a JSON object")
    (llama_src / "config.json").write_bytes(b"\xff\xfe{}")
    refused(llama_src, tmp_path / "out", "not valid JSON")


def test_config_json_symlink_or_folder_is_refused(llama_src: Path, tmp_path: Path) -> None:
    real = tmp_path / "elsewhere.json"
    shutil.move(llama_src / "config.json", real)
    (llama_src / "config.json").symlink_to(real)
    refused(llama_src, tmp_path / "out", "no config.json (as a regular file)")
    (llama_src / "config.json").unlink()
    (llama_src / "config.json").mkdir()
    refused(llama_src, tmp_path / "out", "no config.json")
    refused(tmp_path / "missing", tmp_path / "out", "is not a folder")


# -- refusals: weights ------------------------------------------------------------------------


def test_missing_weights_file(llama_src: Path, tmp_path: Path) -> None:
    (llama_src / "model.safetensors").unlink()
    refused(llama_src, tmp_path / "out", "has no weights")


def _edit_weights(src: Path, edit: Callable[[dict[str, torch.Tensor]], None]) -> None:
    sd = load_file(str(src / "model.safetensors"))
    edit(sd)
    save_file(sd, str(src / "model.safetensors"))


def test_checkpoint_tensor_without_a_place_is_refused(llama_src: Path, tmp_path: Path) -> None:
    _edit_weights(
        llama_src, lambda sd: sd.update({"model.layers.0.mlp.extra.weight": torch.ones(3)})
    )
    refused(llama_src, tmp_path / "out", "no place", "'model.layers.0.mlp.extra.weight'")


def test_missing_tensor_is_refused(llama_src: Path, tmp_path: Path) -> None:
    _edit_weights(llama_src, lambda sd: sd.pop("model.layers.1.self_attn.k_proj.weight"))
    refused(llama_src, tmp_path / "out", "'model.layers.1.self_attn.k_proj.weight'", "missing")


def test_misshapen_tensor_is_refused(llama_src: Path, tmp_path: Path) -> None:
    _edit_weights(
        llama_src,
        lambda sd: sd.update({"model.layers.0.self_attn.q_proj.weight": torch.ones(32, 33)}),
    )
    refused(llama_src, tmp_path / "out", "(32, 33)", "(32, 32)")


def test_tensor_in_two_shards_and_bad_shard_names_are_refused(
    llama_src: Path, tmp_path: Path
) -> None:
    sd = load_file(str(llama_src / "model.safetensors"))
    (llama_src / "model.safetensors").unlink()
    keys = sorted(sd)
    save_file({k: sd[k] for k in keys[:5]}, str(llama_src / "a.safetensors"))
    save_file({k: sd[k] for k in keys[4:]}, str(llama_src / "b.safetensors"))
    index = {"metadata": {}, "weight_map": {k: "a.safetensors" for k in keys[:5]}}
    index["weight_map"].update({k: "b.safetensors" for k in keys[5:]})
    write_json(llama_src / "model.safetensors.index.json", index)
    refused(llama_src, tmp_path / "out", "appears in two weight files")


@pytest.mark.parametrize(
    "shard", ["../model.safetensors", "/tmp/model.safetensors", "sub/model.safetensors"]
)
def test_index_naming_a_shard_outside_the_folder_is_refused(
    llama_src: Path, tmp_path: Path, shard: str
) -> None:
    # the weights exist where the index points: the name itself must be refused
    shutil.move(llama_src / "model.safetensors", tmp_path / "model.safetensors")
    (llama_src / "sub").mkdir()
    shutil.copy(tmp_path / "model.safetensors", llama_src / "sub" / "model.safetensors")
    keys = load_file(str(tmp_path / "model.safetensors")).keys()
    write_json(
        llama_src / "model.safetensors.index.json",
        {"metadata": {}, "weight_map": dict.fromkeys(keys, shard)},
    )
    refused(llama_src, tmp_path / "out", "not a plain file name")


def test_sharded_checkpoint_imports_like_the_single_file(llama_src: Path, tmp_path: Path) -> None:
    whole = import_hf(llama_src, tmp_path / "whole", check=False)
    assert whole.parity is None
    sd = load_file(str(llama_src / "model.safetensors"))
    (llama_src / "model.safetensors").unlink()
    keys = sorted(sd)
    half = len(keys) // 2
    save_file({k: sd[k] for k in keys[:half]}, str(llama_src / "model-00001-of-00002.safetensors"))
    save_file({k: sd[k] for k in keys[half:]}, str(llama_src / "model-00002-of-00002.safetensors"))
    wm = {k: f"model-0000{1 + (i >= half)}-of-00002.safetensors" for i, k in enumerate(keys)}
    write_json(llama_src / "model.safetensors.index.json", {"metadata": {}, "weight_map": wm})
    import_hf(llama_src, tmp_path / "sharded", check=False)
    a = load_file(str(tmp_path / "whole" / "model.safetensors"))
    b = load_file(str(tmp_path / "sharded" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # an index naming a shard that is not there
    (llama_src / "model-00002-of-00002.safetensors").unlink()
    refused(llama_src, tmp_path / "out", "missing shard", "model-00002-of-00002.safetensors")


def test_refused_import_leaves_an_existing_out_folder_as_it_was(
    llama_src: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    edit_config(llama_src, foo_scale=2)
    refused(llama_src, out, "foo_scale")
    assert (out / "keep.txt").read_text() == "mine"
    # and nested: out/a/b did not exist, nothing of it remains
    refused(llama_src, tmp_path / "a" / "b", "foo_scale")
    assert not (tmp_path / "a").exists()


def test_import_into_its_own_source_folder_does_not_destroy_the_checkpoint(
    llama_src: Path,
) -> None:
    # Regression (was a bug in archir/interop/hf.py import_hf): nothing stops OUT from being SRC; ``archir import
    # hf DIR --out DIR`` then replaces DIR/model.safetensors (Hugging Face names) with
    # archir's (blocks.0.fn.q.weight ...): the source checkpoint is gone and DIR no longer
    # imports ("tensor 'model.embed_tokens.weight' is missing"). Expected: refused up front
    # (OUT is SRC, or would overwrite its weights), the checkpoint untouched.
    before = (llama_src / "model.safetensors").read_bytes()
    with pytest.raises(ArchirError):
        import_hf(llama_src, llama_src, check=False)
    assert (llama_src / "model.safetensors").read_bytes() == before


def test_export_into_the_folder_it_reads_does_not_destroy_its_weights(
    llama_src: Path, tmp_path: Path
) -> None:
    # Regression (was a bug in archir/interop/hf.py export_hf): the same with ``archir export imported/ --format
    # hf --out imported/``: archir's model.safetensors beside spec.yaml is replaced by one
    # with Hugging Face names, and the folder no longer loads as an archir model.
    # Expected: refused when --out is the folder holding the weights being read.
    out = tmp_path / "imp"
    import_hf(llama_src, out, check=False)
    before = (out / "model.safetensors").read_bytes()
    spec = archir.load_spec(out / "spec.yaml")
    with pytest.raises(ArchirError):
        export_hf(spec, out, weights=str(out / "model.safetensors"), check=False)
    assert (out / "model.safetensors").read_bytes() == before


# -- pytorch_model.bin -------------------------------------------------------------------------


def test_pytorch_bin_checkpoint_imports(llama_src: Path, tmp_path: Path) -> None:
    ref = import_hf(llama_src, tmp_path / "ref", check=False)
    sd = load_file(str(llama_src / "model.safetensors"))
    (llama_src / "model.safetensors").unlink()
    torch.save(sd, llama_src / "pytorch_model.bin")
    report = import_hf(llama_src, tmp_path / "out")  # parity too, when transformers is here
    assert report.family == "llama" and report.params == ref.params
    if transformers is not None:
        assert report.parity is not None and report.parity.ok
    a = load_file(str(tmp_path / "ref" / "model.safetensors"))
    b = load_file(str(tmp_path / "out" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


class _Payload:
    """Unpickling this opens (creates) ``path``: what a hostile checkpoint could run."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Any, ...]:
        return (open, (self.path, "w"))


def test_pickled_object_in_a_bin_is_refused_and_never_runs(llama_src: Path, tmp_path: Path) -> None:
    sd: dict[str, Any] = dict(load_file(str(llama_src / "model.safetensors")))
    # the payload is live: a plain unpickler runs it
    probe_marker = tmp_path / "probe-marker"
    probe = tmp_path / "probe.bin"
    torch.save({**sd, "evil": _Payload(str(probe_marker))}, probe)
    torch.load(probe, weights_only=False)
    assert probe_marker.exists()

    marker = tmp_path / "marker"
    (llama_src / "model.safetensors").unlink()
    torch.save({**sd, "evil": _Payload(str(marker))}, llama_src / "pytorch_model.bin")
    refused(llama_src, tmp_path / "out", "cannot be read safely", "pytorch_model.bin")
    assert not marker.exists()
    # a plain pickle (not torch's zip format) too
    with open(llama_src / "pytorch_model.bin", "wb") as f:
        pickle.dump({"evil": _Payload(str(marker))}, f)
    refused(llama_src, tmp_path / "out", "cannot be read safely")
    assert not marker.exists()


def test_bin_that_is_not_a_dict_of_tensors_is_refused(llama_src: Path, tmp_path: Path) -> None:
    (llama_src / "model.safetensors").unlink()
    torch.save([torch.ones(2)], llama_src / "pytorch_model.bin")
    refused(llama_src, tmp_path / "out", "not a dict of tensors")
    torch.save({"model.embed_tokens.weight": 3}, llama_src / "pytorch_model.bin")
    refused(llama_src, tmp_path / "out", "is not a tensor")
    (llama_src / "pytorch_model.bin").write_bytes(b"garbage")
    refused(llama_src, tmp_path / "out", "cannot be read safely")


# -- export refusals ----------------------------------------------------------------------------


def test_export_of_a_spec_of_no_family_lists_every_reason(tmp_path: Path) -> None:
    spec = archir.load_spec(ZOO / "hyena.yaml")
    with pytest.raises(InteropError) as info:
        export_hf(spec, tmp_path / "back")
    msg = str(info.value)
    assert "maps onto no Hugging Face family" in msg
    for f in families():
        assert f"{f.name}: " in msg, (f.name, msg)
    assert not (tmp_path / "back").exists()


def _llama_like(**changes: Any) -> Any:
    data = json.loads(json.dumps(LLAMA_SPEC))
    group = data["model"]["layers"][0]
    for k, v in changes.items():
        if k == "attention":
            group["blocks"][0].update(v)
        else:
            group[k] = v
    return spec_from_dict(data)


@pytest.mark.parametrize(
    ("changes", "words"),
    [
        ({"share_weights": True}, "layer group 0 shares weights"),
        ({"attention": {"rope_interleaved": True}}, "not causal full-width RoPE"),
        ({"attention": {"rotary_dim": 4}}, "not causal full-width RoPE"),
        ({"attention": {"out_bias": True}}, "biases differ"),
        ({"attention": {"causal": False}}, "not causal full-width RoPE"),
    ],
)
def test_export_of_a_llama_shaped_spec_with_unmappable_options_is_refused(
    tmp_path: Path, changes: dict[str, Any], words: str
) -> None:
    with pytest.raises(InteropError, match="maps onto no Hugging Face family") as info:
        export_hf(_llama_like(**changes), tmp_path / "back", check=False)
    assert words in str(info.value)
    assert not (tmp_path / "back").exists()


def test_export_refuses_weights_of_another_spec(llama_base: Path, tmp_path: Path) -> None:
    other = spec_from_dict({**LLAMA_SPEC, "model": {**LLAMA_SPEC["model"], "d_model": 16}})
    with pytest.raises(InteropError, match=r"is \(\d+(, \d+)?\) in the checkpoint"):
        export_hf(other, tmp_path / "back", weights=str(llama_base.parent / "archir.safetensors"))
    assert not (tmp_path / "back").exists()


# -- the parity gate ----------------------------------------------------------------------------


@needs_transformers
def test_parity_gate_refuses_a_wrong_import(
    llama_src: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import archir.interop.hf as hf_mod

    real = hf_mod._load_exact

    def load_then_break(model: torch.nn.Module, state: Any, where: str) -> None:
        real(model, state, where)
        with torch.no_grad():
            model.blocks[0].fn.v.weight.add_(0.1)  # a small error in one tensor

    monkeypatch.setattr(hf_mod, "_load_exact", load_then_break)
    out = tmp_path / "out"
    err = refused(llama_src, out, "does not match transformers", "relative")
    assert "nothing was written" in str(err)
    assert not (out / "spec.yaml").exists()
    # the gate is what refuses: without the check the same import goes through
    report = import_hf(llama_src, out, check=False)
    assert report.parity is None and (out / "spec.yaml").exists()


@needs_transformers
def test_parity_gate_refuses_a_wrong_export(
    llama_base: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import archir.interop.hf as hf_mod

    real = hf_mod.archir_to_hf

    def convert_then_break(fam: Any, spec: Any, state: Any) -> dict[str, torch.Tensor]:
        out = real(fam, spec, state)
        out["model.norm.weight"] = out["model.norm.weight"] * 1.01
        return out

    monkeypatch.setattr(hf_mod, "archir_to_hf", convert_then_break)
    back = tmp_path / "back"
    with pytest.raises(InteropError, match="does not reproduce"):
        export_hf(
            spec_from_dict(LLAMA_SPEC),
            back,
            weights=str(llama_base.parent / "archir.safetensors"),
        )
    assert not back.exists()


def test_without_transformers_the_import_says_it_did_not_compare(
    llama_src: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import archir.interop.hf as hf_mod

    monkeypatch.setattr(hf_mod, "have_transformers", lambda: False)
    report = import_hf(llama_src, tmp_path / "out")
    assert report.parity is None and "not compared" in report.note
    assert read_json(tmp_path / "out" / "import.json")["parity"] is None
    assert "note: transformers is not installed" in str(report)


# -- CLI ------------------------------------------------------------------------------------------


@needs_transformers
def test_cli_import_prints_the_parity_line_and_export_round_trips(
    llama_src: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out, back = tmp_path / "out", tmp_path / "back"
    assert main(["import", "hf", str(llama_src), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "imported llama" in printed and "parity with transformers" in printed
    assert (out / "spec.yaml").is_file()
    assert main(["export", str(out), "--format", "hf", "--out", str(back)]) == 0
    printed = capsys.readouterr().out
    assert "wrote a Hugging Face llama folder" in printed and "transformers loads it" in printed
    assert read_json(back / "config.json")["architectures"] == ["LlamaForCausalLM"]


def test_cli_import_json_and_no_check(
    llama_src: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    args = ["import", "hf", str(llama_src), "--out", str(out), "--no-check", "--json"]
    assert main([*args, "--name", "my-llama"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["family"] == "llama" and report["parity"] is None
    assert archir.load_spec(out / "spec.yaml").name == "my-llama"
    assert (
        main(["export", str(out), "--format", "hf", "--out", str(tmp_path / "b"), "--no-check"])
        == 0
    )


def test_cli_errors_exit_2(
    llama_src: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["import", "hf", str(tmp_path / "nope"), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and "is not a folder" in err
    assert main(["import", "hf", str(llama_src)]) == 2  # no --out
    assert "error:" in capsys.readouterr().err
    import_hf(llama_src, tmp_path / "imp", check=False)
    capsys.readouterr()
    back = tmp_path / "back"
    rc = main(
        [
            "export",
            str(tmp_path / "imp"),
            "--format",
            "hf",
            "--precision",
            "int8",
            "--out",
            str(back),
        ]
    )
    assert rc == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and "--precision does not apply to --format hf" in err
    assert not back.exists()
    assert main(["export", str(tmp_path / "imp"), "--format", "hf"]) == 2
    assert "--out DIR is required for --format hf" in capsys.readouterr().err


def test_interop_families_stays_a_function() -> None:
    # Regression (was a bug in archir/interop/__init__.py + archir/interop/base.py _load): the package exports
    # the function ``families`` but also has a submodule ``archir/interop/families.py``;
    # the first call imports that submodule, which rebinds the package attribute
    # ``archir.interop.families`` to the module. From then on ``from archir.interop import
    # families`` gives a module ("TypeError: 'module' object is not callable"), e.g. in
    # ``archir import hf --list`` run in a process that has already imported or exported.
    # Expected: ``archir.interop.families`` stays the function (rename the submodule).
    import archir.interop

    families()  # loads every family
    assert callable(archir.interop.families)


def test_cli_list_names_every_family(capsys: pytest.CaptureFixture[str]) -> None:
    # fails in-process after any family lookup: see test_interop_families_stays_a_function
    assert main(["import", "hf", "--list"]) == 0
    out = capsys.readouterr().out
    for f in families():
        assert f.name in out
        for a in f.architectures:
            assert a in out
    assert len(out.strip().splitlines()) == len(families())


# -- tokenizer files ----------------------------------------------------------------------------


def test_tokenizer_files_are_copied_but_not_through_links(llama_src: Path, tmp_path: Path) -> None:
    tok = {"version": "1.0", "model": {"type": "BPE", "vocab": {"a": 0}}}
    write_json(llama_src / "tokenizer.json", tok)
    (llama_src / "merges.txt").write_text("#version: 0.2\n")
    secret = tmp_path / "secret.txt"
    secret.write_text("do not copy me")
    (llama_src / "tokenizer_config.json").symlink_to(secret)
    (llama_src / "vocab.json").mkdir()  # not a regular file either
    (llama_src / "notes.md").write_text("not a tokenizer file")
    out = tmp_path / "out"
    report = import_hf(llama_src, out, check=False)
    assert sorted(report.tokenizer_files) == ["merges.txt", "tokenizer.json"]
    assert read_json(out / "tokenizer.json") == tok
    assert (out / "merges.txt").read_text() == "#version: 0.2\n"
    assert not (out / "tokenizer_config.json").exists()
    assert not (out / "vocab.json").exists()
    assert not (out / "notes.md").exists()
    assert set(os.listdir(out)) == {
        "spec.yaml",
        "model.safetensors",
        "import.json",
        "tokenizer.json",
        "merges.txt",
    }
    assert read_json(out / "import.json")["tokenizer_files"] == report.tokenizer_files


@needs_transformers
def test_a_mamba_with_trained_strength_decays_round_trips(tmp_path: Path) -> None:
    """A Mamba whose per-step log-decay Δ·A reaches far below −4 (as trained checkpoints'
    do) imports and exports with parity: archir's scan has no clamp (issue 16)."""
    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    hf = transformers.AutoModelForCausalLM.from_config(FAMILY_CONFIGS["mamba"](transformers)).eval()
    perturb_(hf, seed=2)
    with torch.no_grad():
        for layer in hf.backbone.layers:
            layer.mixer.A_log.add_(3.0)  # A down to about −16·e³
            layer.mixer.dt_proj.bias.fill_(2.0)  # Δ about 2
    src, out, back = tmp_path / "src", tmp_path / "out", tmp_path / "back"
    hf.save_pretrained(src)
    report = import_hf(src, out)
    assert report.parity is not None and report.parity.rel <= RTOL
    spec = archir.load_spec(out / "spec.yaml")
    model = compile_spec(spec).eval()
    load_model(model, str(out / "model.safetensors"), strict=True)
    fn = model.blocks[0].fn
    with torch.no_grad():
        dt_max = float(torch.nn.functional.softplus(fn.dt_proj.bias).max())
        assert -float(torch.exp(fn.A_log).max()) * dt_max < -50
        tokens = text_tokens(64)
        assert rel_err(model(tokens), hf(input_ids=tokens).logits) <= RTOL
    ereport = export_hf(spec, back, weights=str(out / "model.safetensors"))
    assert ereport.parity is not None and ereport.parity.ok
