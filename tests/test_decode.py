"""Decoding with a carried state (issue 14): a causal language model fed one token at a time
through ``CompiledModel.step`` gives the logits ``forward`` gives on the whole sequence.

The kinds come from the registry: every token mixer and every channel mixer, each in a small
causal LM (a kind that declares ``lacks={"step": reason}`` or ``{"onnx_decode": reason}`` is
skipped with that reason), plus the variants that change what a state holds (sliding window,
grouped-query heads, ALiBi, learned and sinusoidal positions, shared weights, DenseFormer
inputs), every zoo language model, and a model trained on real text.
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


def _kinds(role: str, form: str = "step") -> list[Any]:
    """Every registered kind of ``role``; one that declares it lacks ``form`` (registry
    ``lacks``) is skipped with its reason."""
    return [
        pytest.param(k.name, marks=pytest.mark.skip(reason=f"{k.name}: {k.lacks[form]}"))
        if not k.provides(form)
        else k.name
        for k in registry.kinds(role)
    ]


def _mixer_kinds(form: str = "step") -> list[Any]:
    return _kinds("token_mixer", form)


def _channel_kinds() -> list[Any]:
    return _kinds("channel_mixer")


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


# --------------------------------------------------------------------------- ONNX decode model


def _export(spec: Any, path: Any, **kw: Any) -> Any:
    from exporters.decode import export_decode

    return export_decode(spec, path, **kw)


def _ort_logits(path: Any, tokens: torch.Tensor) -> torch.Tensor:
    """Logits ``[B, T, V]`` from a plain onnxruntime loop that reads only the file's
    metadata (what a user without archir would write)."""
    import json

    import numpy as np
    import onnx
    import onnxruntime as ort

    proto = onnx.load(str(path))
    meta = json.loads(next(p.value for p in proto.metadata_props if p.key == "archir.decode"))
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    B = tokens.shape[0]
    states = {
        s["input"]: np.zeros(
            [B if d == "batch" else int(d) for d in s["init_shape"]],
            dtype=np.int64 if s["dtype"] == "int64" else np.float32,
        )
        for s in meta["states"]
    }
    out = []
    for t in range(tokens.shape[1]):
        got = sess.run(None, {"tokens": tokens[:, t : t + 1].numpy(), **states})
        out.append(got[0])
        states = {s["input"]: v for s, v in zip(meta["states"], got[1:])}
    return torch.from_numpy(np.concatenate(out, axis=1))


@pytest.mark.parametrize("kind", _mixer_kinds("onnx_decode"))
def test_every_token_mixer_exports_a_decode_model(kind: str, tmp_path: Any) -> None:
    """The decode graph for every kind: parity-gated at export, and a plain onnxruntime loop
    driven by the metadata alone reproduces the full-sequence logits — past max_seq_len
    too where the kind can go on."""
    spec = lm({"kind": kind, **KIND_PARAMS.get(kind, {})})
    model = archir.compile(spec, seed=0).eval()
    path = tmp_path / "step.onnx"
    report = _export(spec, path, model=model, task="random")
    assert report.written and report.parity is not None and report.parity.passed
    assert report.exporter == "dynamo", report.notes  # the exporter the full model ships with
    T = MAX_LEN if model.seq_limit is not None else MAX_LEN + 9
    x = torch.randint(0, VOCAB, (2, T))
    with torch.no_grad():
        full = model(x)
    got = _ort_logits(path, x)
    assert (got - full).abs().max().item() <= RTOL * max(1.0, full.abs().max().item())


def test_decode_state_layout_names_what_each_tensor_is(tmp_path: Any) -> None:
    spec = lm({"kind": "attention", "n_heads": 4, "n_kv_heads": 2, "window": 6})
    # the layout does not depend on the exporter: the fast one
    report = _export(spec, tmp_path / "s.onnx", task="random", exporter="legacy")
    from exporters.decode import read_decode_metadata

    meta = read_decode_metadata(tmp_path / "s.onnx")
    keys = [s for s in meta["states"] if s["what"] == "KV cache keys"]
    assert len(keys) == 2  # one per layer
    assert keys[0]["shape"] == ["batch", 2, "past_window", 8]
    assert keys[0]["init_shape"] == ["batch", 2, 0, 8]
    pos = [s for s in meta["states"] if s["what"] == "position"]
    assert pos and all(s["dtype"] == "int64" and s["shape"] == [] for s in pos)
    assert meta["max_tokens"] is None and "position" in meta
    assert "state_in.0" in str(report)


def test_decode_export_refuses_a_model_that_cannot_decode(tmp_path: Any) -> None:
    spec = lm({"kind": "attention", "n_heads": 4, "causal": False})
    with pytest.raises(DecodeError, match="bidirectional"):
        _export(spec, tmp_path / "x.onnx", task="random")
    assert not (tmp_path / "x.onnx").exists()


def test_decode_parity_gate_refuses_a_wrong_step(tmp_path: Any, monkeypatch: Any) -> None:
    from archir.blocks import recurrent
    from archir.errors import ExportError

    real = recurrent.GLA.step

    def wrong(self: Any, x: torch.Tensor, state: Any) -> Any:
        y, st = real(self, x, state)
        return y * 1.01, st

    monkeypatch.setattr(recurrent.GLA, "step", wrong)
    with pytest.raises(ExportError, match="decode parity failed"):
        _export(lm({"kind": "gla"}), tmp_path / "g.onnx", task="random", exporter="legacy")
    assert not (tmp_path / "g.onnx").exists()


@pytest.mark.parametrize("path", _zoo_lms())
def test_every_zoo_language_model_exports_a_decode_model(path: Any, tmp_path: Any) -> None:
    """Every zoo LM's decode graph, parity-gated on real text. The TorchScript exporter keeps
    this fast (each kind's torch.export path is tested above; the zoo through it is slow)."""
    spec = archir.load_spec(path)
    report = _export(spec, tmp_path / "z.onnx", task="text:pydoc", exporter="legacy")
    assert report.parity is not None and report.parity.passed, report.parity.summary()
    assert report.parity.source == "task:text:pydoc"


@pytest.mark.slow
@pytest.mark.parametrize("path", _zoo_lms())
def test_every_zoo_language_model_exports_a_decode_model_with_torch_export(
    path: Any, tmp_path: Any
) -> None:
    spec = archir.load_spec(path)
    report = _export(spec, tmp_path / "z.onnx", task="text:pydoc")
    assert report.exporter == "dynamo", report.notes
    assert report.parity is not None and report.parity.passed, report.parity.summary()


# --------------------------------------------------------------------------- CLI


def _spec_file(tmp_path: Any, mixer: dict[str, Any], **model: Any) -> Any:
    import yaml

    spec = lm(mixer, **model)
    data = spec.data
    data["model"]["vocab_size"] = 256
    f = tmp_path / "m.yaml"
    f.write_text(yaml.safe_dump(data, sort_keys=False))
    return f


def _gen(capfd: Any, *argv: str) -> tuple[int, dict[str, Any] | None, str]:
    import json

    from archir.cli import main

    rc = main(["generate", *argv])
    out, err = capfd.readouterr()
    info = json.loads(out) if rc == 0 and "--json" in argv else None
    return rc, info, err


@pytest.mark.heavy
def test_generate_greedy_is_the_same_on_torch_and_onnxruntime(tmp_path: Any, capfd: Any) -> None:
    import safetensors.torch

    f = _spec_file(tmp_path, {"kind": "attention", "n_heads": 4, "window": 8})
    data = __import__("yaml").safe_load(f.read_text())
    data["model"]["layers"].append({"blocks": [{"kind": "mamba", "d_state": 4}, {"kind": "moe"}]})
    f.write_text(__import__("yaml").safe_dump(data, sort_keys=False))
    model = archir.compile(archir.load_spec(f), seed=3)
    with torch.no_grad():  # sharper logits than fresh init: fewer near-ties
        model.embed.weight.mul_(40)
    w = tmp_path / "w.safetensors"
    safetensors.torch.save_model(model, str(w))
    common = ["--prompt", "def f(x):", "--max-new-tokens", "24", "--weights", str(w), "--json"]
    rc, t, err = _gen(capfd, str(f), "--runtime", "torch", *common)
    assert rc == 0, err
    rc, o, err = _gen(capfd, str(f), "--runtime", "ort", *common)
    assert rc == 0, err
    assert t is not None and o is not None
    assert t["new_tokens"] == 24 and t["tokens"] == o["tokens"]
    assert t["ms_per_token"] > 0 and o["prefill_ms"] > 0
    # sampling: the seed decides, and top-k keeps draws among the k best
    s1 = _gen(capfd, str(f), *common, "--temperature", "1.0", "--top-k", "5", "--seed", "7")[1]
    s2 = _gen(capfd, str(f), *common, "--temperature", "1.0", "--top-k", "5", "--seed", "7")[1]
    s3 = _gen(capfd, str(f), *common, "--temperature", "1.0", "--seed", "8")[1]
    assert s1 is not None and s2 is not None and s3 is not None
    assert s1["tokens"] == s2["tokens"] and s1["tokens"] != s3["tokens"]
    # streaming: the prompt, then the bytes
    from archir.cli import main

    rc = main(
        ["generate", str(f), "--prompt", "def f(x):", "--max-new-tokens", "24"]
        + ["--weights", str(w)]
    )
    out = capfd.readouterr().out
    assert rc == 0 and out.startswith("def f(x):")
    assert out.encode("utf-8", "surrogateescape")  # bytes were written


def test_generate_from_an_exported_decode_model(tmp_path: Any, capfd: Any) -> None:
    from archir.cli import main

    f = _spec_file(tmp_path, {"kind": "gla", "n_heads": 2})
    step = tmp_path / "step.onnx"
    rc = main(
        ["export", str(f), "--decode", "--random-weights", "--out", str(step)]
        + ["--exporter", "legacy"]
    )
    out = capfd.readouterr().out
    assert rc == 0 and step.is_file() and "state_in.0" in out and "parity" in out
    args = ["--prompt", "x = ", "--max-new-tokens", "12", "--json"]
    rc, a_, err = _gen(capfd, str(step), *args)
    assert rc == 0, err
    rc, b_, err = _gen(capfd, str(f), "--random-weights", "--runtime", "torch", *args)
    assert rc == 0, err
    assert a_ is not None and b_ is not None and a_["tokens"] == b_["tokens"]
    assert a_["runtime"] == "ort"
    rc = main(["export", str(f), "--decode", "--precision", "int8-static", "--out", str(step)])
    assert rc == 2 and "--precision int8-static does not apply" in capfd.readouterr().err


@pytest.mark.parametrize(
    ("argv", "mixer", "message"),
    [
        (["--prompt", ""], {"kind": "gla"}, "prompt is empty"),
        (["--prompt", "ab", "--max-new-tokens", "47"], {"kind": "token_mlp"}, "max_seq_len 48"),
        (["--prompt", "ab"], {"kind": "attention", "causal": False}, "bidirectional"),
        (["--prompt", "ab", "--top-k", "3"], {"kind": "gla"}, "sampling only"),
        (["--prompt", "ab", "--temperature", "-1"], {"kind": "gla"}, "temperature"),
        (["--prompt", "ab", "--temperature", "nan"], {"kind": "gla"}, "finite number"),
    ],
)
def test_generate_refuses_with_a_reason(
    tmp_path: Any, capfd: Any, argv: list[str], mixer: dict[str, Any], message: str
) -> None:
    f = _spec_file(tmp_path, mixer)
    rc, _, err = _gen(capfd, str(f), "--random-weights", *argv)
    assert rc == 2 and message in err and "Traceback" not in err


def test_generate_takes_a_prompt_that_is_not_utf8(tmp_path: Any, capfd: Any) -> None:
    """A command line's bytes that are not UTF-8 reach Python as surrogates; they are the
    prompt's bytes, not a traceback."""
    f = _spec_file(tmp_path, {"kind": "gla"})
    rc, info, err = _gen(
        capfd, str(f), "--random-weights", "--prompt", "a\udcffb", "--max-new-tokens", "2"
    )
    assert rc == 0 and "Traceback" not in err, err
    rc, info, err = _gen(
        capfd,
        str(f),
        "--random-weights",
        "--prompt",
        "a\udcffb",
        "--max-new-tokens",
        "2",
        "--json",
    )
    assert rc == 0 and info is not None and info["prompt_tokens"] == 3


def test_generate_needs_weights_or_says_so(tmp_path: Any, capfd: Any) -> None:
    f = _spec_file(tmp_path, {"kind": "gla"})
    rc, _, err = _gen(capfd, str(f), "--prompt", "a")
    assert rc == 2 and "no trained weights" in err


# --------------------------------------------------------------------------- search


@pytest.mark.heavy
def test_a_search_optimizes_decode_cost(tmp_path: Any) -> None:
    """decode_ms_per_token and prefill_ms are objectives/constraints like latency_ms,
    measured on the decode graph that ships; every trial records them."""
    import json

    import optuna
    import yaml

    from archir.cli import main
    from searchers.objectives import trial_attrs
    from searchers.run import open_storage

    data = yaml.safe_load((ZOO.parent / "search" / "tiny.yaml").read_text())
    data["search"].update(
        objectives={"decode_ms_per_token": "minimize", "params": "minimize"},
        constraints={"prefill_ms": "<= 60000"},
        fidelity="cost",
        budget={"trials": 3},
        decode={"context": 24, "runtime": "ort"},
    )
    f = tmp_path / "dec.yaml"
    f.write_text(yaml.safe_dump(data, sort_keys=False))
    run = tmp_path / "run"
    assert main(["search", str(f), "--out", str(run), "--no-export"]) == 0
    study = optuna.load_study(study_name="tiny", storage=open_storage(None, run / "study.journal"))
    done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(done) >= 3
    for t in done:
        v = trial_attrs(t)["values"]
        assert v["decode_ms_per_token"] > 0 and v["prefill_ms"] > v["decode_ms_per_token"]
    front = json.loads((run / "pareto.json").read_text())["front"]
    assert front and all("decode_ms_per_token" in row["values"] for row in front)
    logs = " ".join((p / "log").read_text() for p in (run / "trials").iterdir())
    assert "decode at context 24 (ort)" in logs


def test_decode_metrics_on_a_model_that_cannot_generate_are_refused(
    tmp_path: Any, capfd: Any
) -> None:
    import yaml

    from archir.cli import main

    data = yaml.safe_load((ZOO / "vit-digits.yaml").read_text())
    data["model"]["d_model"] = {"choice": [32, 64]}
    data["search"] = {"objectives": {"decode_ms_per_token": "minimize"}, "fidelity": "cost"}
    f = tmp_path / "v.yaml"
    f.write_text(yaml.safe_dump(data, sort_keys=False))
    assert main(["search", str(f), "--out", str(tmp_path / "r")]) == 2
    assert "only a causal language model decodes" in capfd.readouterr().err
    assert not (tmp_path / "r").exists()


def test_forward_past_max_seq_len_names_the_limit() -> None:
    model = archir.compile(lm({"kind": "token_mlp"}), seed=0)
    with pytest.raises(ValueError, match="past max_seq_len 48"):
        model(torch.zeros(1, MAX_LEN + 1, dtype=torch.long))
    model = archir.compile(lm({"kind": "gla"}), seed=0)  # nothing limits it
    assert model.seq_limit is None
    assert model(torch.zeros(1, MAX_LEN + 1, dtype=torch.long)).shape[1] == MAX_LEN + 1
