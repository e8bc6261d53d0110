"""Trainer: determinism, checkpoint + resume, NaN stop, metrics.json; CLI tasks/mad/train."""

from __future__ import annotations

import json
import math

import pytest

from archir.cli import main
from archir.spec import spec_from_dict
from archir.spec.sections import TrainSection
from archir.tasks.mad import MADSetting, MADTask
from archir.train import train


def tiny_spec(vocab: int = 16, L: int = 32) -> dict:
    return {
        "archir": 1,
        "name": "tiny",
        "model": {
            "task": "causal_lm",
            "vocab_size": vocab,
            "d_model": 32,
            "max_seq_len": L,
            "embed": {"kind": "token_embedding"},
            "layers": [
                {
                    "repeat": 1,
                    "blocks": [
                        {"kind": "attention", "n_heads": 2, "pos": "rope"},
                        {"kind": "swiglu", "expansion": 2},
                    ],
                }
            ],
            "head": {"kind": "lm_head", "tie_embeddings": True},
        },
    }


def task() -> MADTask:
    return MADTask(MADSetting("in-context-recall", 16, 32, 64, num_test=32))


def cfg(**kw) -> TrainSection:
    base = {
        "task": "mad:in-context-recall",
        "steps": 12,
        "batch_size": 8,
        "warmup_steps": 3,
        "eval_every": 4,
        "seed": 5,
    }
    return TrainSection(**{**base, **kw})


def strip(m: dict) -> dict:
    return {k: v for k, v in m.items() if k not in ("wall_s", "tokens_per_s")}


def test_same_spec_and_seed_give_same_metrics():
    spec = spec_from_dict(tiny_spec())
    a = train(spec, task(), cfg=cfg())
    b = train(spec, task(), cfg=cfg())
    c = train(spec, task(), cfg=cfg(seed=6))
    assert strip(a.metrics) == strip(b.metrics)
    assert a.metrics["train_loss"] != c.metrics["train_loss"]
    for k in ("accuracy", "steps", "wall_s", "tokens_per_s", "status", "metric"):
        assert k in a.metrics
    assert a.metrics["metric"] == "accuracy" and a.metrics["steps"] == 12


def test_checkpoint_and_resume_equal_uninterrupted(tmp_path):
    spec = spec_from_dict(tiny_spec())
    full = train(spec, task(), cfg=cfg())
    # interrupted at step 8 (callback stop), checkpoint written there
    part = train(
        spec,
        task(),
        tmp_path / "run",
        cfg=cfg(),
        checkpoint_every=4,
        callback=lambda step, m: step == 8,
    )
    assert part.status == "stopped" and part.metrics["steps"] == 8
    manifest = json.loads((tmp_path / "run" / "checkpoint.json").read_text())
    assert manifest["step"] == 8 and manifest["tensors"] == "checkpoint-8.safetensors"
    assert sorted(f.name for f in (tmp_path / "run").glob("checkpoint*")) == [
        "checkpoint-8.safetensors",
        "checkpoint.json",
    ]  # the step-4 tensors were removed once step 8's manifest was in place
    resumed = train(spec, task(), tmp_path / "run", cfg=cfg(), checkpoint_every=4, resume=True)
    assert resumed.status == "ok" and resumed.metrics["steps"] == 12
    assert resumed.metrics["train_loss"] == full.metrics["train_loss"]
    assert resumed.metrics["accuracy"] == full.metrics["accuracy"]
    saved = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert saved["steps"] == 12 and saved["accuracy"] == full.metrics["accuracy"]


def test_nan_loss_stops_with_step_and_reason():
    spec = spec_from_dict(tiny_spec())
    res = train(spec, task(), cfg=cfg(lr=1e12, grad_clip=1e12, warmup_steps=0))
    assert res.status == "failed"
    assert "at step" in res.metrics["reason"] and res.metrics["steps"] < 12
    assert res.metrics["failed_step"] == res.metrics["steps"]


def test_checkpoint_needs_out_dir():
    from archir.errors import TrainingError

    with pytest.raises(TrainingError, match="output folder"):
        train(spec_from_dict(tiny_spec()), task(), cfg=cfg(), checkpoint_every=2)


def test_cli_tasks_lists_all(capsys):
    assert main(["tasks", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert {"text", "digits", "mad"} <= set(out["tasks"])
    assert len(out["mad"]) == 6 and set(out["mad_presets"]) == {"lite", "full"}


def test_cli_train_mad_preset_and_vocab_error(tmp_path, capsys):
    import yaml

    p = tmp_path / "tiny.yaml"
    p.write_text(yaml.safe_dump(tiny_spec(vocab=8, L=64)))
    rc = main(["train", str(p), "--task", "mad:compression", "--preset", "lite", "--no-progress"])
    assert rc == 2
    assert "uses 16 tokens" in capsys.readouterr().err
    p.write_text(yaml.safe_dump(tiny_spec(vocab=16, L=64)))
    out = tmp_path / "run"
    argv = ["train", str(p), "--task", "mad:compression", "--preset", "lite", "--steps", "3"]
    rc = main([*argv, "--no-progress", "--out", str(out)])
    assert rc == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["task"] == "mad:compression" and m["steps"] == 3 and math.isfinite(m["accuracy"])
    assert (out / "task_modules.safetensors").is_file()  # the compression decoder


def test_cli_mad_table(tmp_path, capsys, monkeypatch):
    import yaml

    from archir.tasks import mad

    small = {
        "memorization": [MADSetting("memorization", 32, 8, 16, num_test=8)],
        "compression": [MADSetting("compression", 8, 6, 16, num_test=8)],
    }
    monkeypatch.setattr(mad, "LITE_SETTINGS", {**mad.LITE_SETTINGS, **small})
    monkeypatch.setitem(mad.PRESETS, "lite", mad.replace(mad.PRESETS["lite"], steps=2))
    p = tmp_path / "tiny.yaml"
    p.write_text(yaml.safe_dump(tiny_spec(vocab=256, L=4)))
    rc = main(
        ["mad", str(p), "--tasks", "memorization,compression", "--out", str(tmp_path / "r.json")]
    )
    assert rc == 0
    out = capsys.readouterr().out
    assert "memorization" in out and "mean" in out and "CPU s" in out and "overridden" in out
    r = json.loads((tmp_path / "r.json").read_text())
    assert set(r["scores"]) == {"memorization", "compression"}
    assert 0.0 <= r["mean"] <= 1.0
