"""Checkpoints without pickle (issue 11): safetensors + a JSON manifest written last; resume
equals an uninterrupted run; torn, corrupt, foreign and pickle checkpoints are clear errors;
files get the permissions of the umask."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import archir.train as tr
from archir.errors import TrainingError
from archir.spec import spec_from_dict
from archir.spec.sections import TrainSection
from archir.tasks.mad import MADSetting, MADTask
from archir.train import load_checkpoint, train
from tests.test_tasks_train import strip, tiny_spec


def compression() -> MADTask:
    # a task with its own trainable modules (the compression decoder) to checkpoint too
    return MADTask(MADSetting("compression", 16, 16, 64, num_test=32))


def cfg(**kw) -> TrainSection:
    base = {
        "task": "mad:compression",
        "steps": 10,
        "batch_size": 8,
        "warmup_steps": 2,
        "eval_every": 3,
        "seed": 3,
    }
    return TrainSection(**{**base, **kw})


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path))


def test_resume_equals_uninterrupted_run_with_task_modules(tmp_path: Path) -> None:
    spec = spec_from_dict(tiny_spec(L=16))
    full = train(spec, compression(), tmp_path / "full", cfg=cfg())
    part = train(
        spec,
        compression(),
        tmp_path / "run",
        cfg=cfg(),
        checkpoint_every=2,
        callback=lambda step, m: step == 6,
    )
    assert part.status == "stopped" and part.metrics["steps"] == 6
    man = json.loads((tmp_path / "run" / "checkpoint.json").read_text())
    assert man["format"] == "archir-checkpoint" and man["version"] == 1 and man["step"] == 6
    tensors = _weights(tmp_path / "run" / man["tensors"])
    assert any(k.startswith("extra.") for k in tensors)  # the decoder
    assert {"optim.0.exp_avg", "optim.0.exp_avg_sq", "optim.0.step"} <= set(tensors)
    assert tensors["rng.generator"].dtype == torch.uint8
    assert all("params" in g and "lr" in g for g in man["optimizer"]["param_groups"])
    resumed = train(
        spec, compression(), tmp_path / "run", cfg=cfg(), checkpoint_every=2, resume=True
    )
    assert strip(resumed.metrics) == strip(full.metrics)  # history, losses, accuracy: all
    for name in ("model.safetensors", "task_modules.safetensors"):
        a, b = _weights(tmp_path / "full" / name), _weights(tmp_path / "run" / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_no_pickle_is_written_and_old_tensors_are_removed(tmp_path: Path) -> None:
    spec = spec_from_dict(tiny_spec())
    train(spec, compression(), tmp_path, cfg=cfg(steps=4), checkpoint_every=1)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == [
        "checkpoint-4.safetensors",
        "checkpoint.json",
        "metrics.json",
        "model.safetensors",
        "spec.yaml",
        "task_modules.safetensors",
    ]
    for p in tmp_path.iterdir():
        assert not p.read_bytes().startswith(b"\x80")  # no pickle protocol header


def test_crash_between_tensors_and_manifest_keeps_the_previous_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    spec = spec_from_dict(tiny_spec(L=16))
    full = train(spec, compression(), None, cfg=cfg())
    real = tr.write_text
    calls = {"n": 0}

    def crash_on_second_manifest(path, text):
        if Path(path).name == "checkpoint.json":
            calls["n"] += 1
            if calls["n"] == 2:
                raise KeyboardInterrupt  # killed after the step-4 tensors, before its manifest
        return real(path, text)

    monkeypatch.setattr(tr, "write_text", crash_on_second_manifest)
    with pytest.raises(KeyboardInterrupt):
        train(spec, compression(), tmp_path, cfg=cfg(), checkpoint_every=2)
    monkeypatch.setattr(tr, "write_text", real)
    state, _ = load_checkpoint(tmp_path)  # type: ignore[misc]
    assert state["step"] == 2  # the whole previous checkpoint
    resumed = train(spec, compression(), tmp_path, cfg=cfg(), checkpoint_every=2, resume=True)
    assert strip(resumed.metrics) == strip(full.metrics)


def test_manifest_cut_at_every_byte_is_a_clear_error(tmp_path: Path) -> None:
    spec = spec_from_dict(tiny_spec())
    train(spec, compression(), tmp_path, cfg=cfg(steps=2), checkpoint_every=2)
    man = tmp_path / "checkpoint.json"
    whole = man.read_bytes()
    for cut in range(len(whole)):
        man.write_bytes(whole[:cut])
        with pytest.raises(TrainingError, match="torn or corrupt|not an archir checkpoint"):
            load_checkpoint(tmp_path)
    man.write_bytes(whole)
    assert load_checkpoint(tmp_path) is not None


def test_pickle_checkpoint_is_never_opened(tmp_path: Path, monkeypatch) -> None:
    (tmp_path / "checkpoint.pt").write_bytes(b"cos\nsystem\n(S'touch PWNED'\ntR.")
    monkeypatch.chdir(tmp_path)
    opened: list[str] = []
    real_open = open

    def spy(file, *a, **kw):
        opened.append(str(file))
        return real_open(file, *a, **kw)

    monkeypatch.setattr("builtins.open", spy)
    with pytest.raises(TrainingError, match="archir does not load pickles"):
        train(spec_from_dict(tiny_spec()), compression(), tmp_path, cfg=cfg(), resume=True)
    assert not any(f.endswith("checkpoint.pt") for f in opened)
    assert not (tmp_path / "PWNED").exists()


def test_resume_refuses_other_settings_and_other_architecture(tmp_path: Path) -> None:
    spec = spec_from_dict(tiny_spec())
    train(spec, compression(), tmp_path, cfg=cfg(steps=2), checkpoint_every=1)
    with pytest.raises(TrainingError, match="written with steps=2, this run has steps=5"):
        train(spec, compression(), tmp_path, cfg=cfg(steps=5), resume=True)
    other = tiny_spec()
    other["model"]["d_model"] = 64
    with pytest.raises(TrainingError, match="another architecture"):
        train(spec_from_dict(other), compression(), tmp_path, cfg=cfg(steps=2), resume=True)
    # time budget and threads may change
    res = train(spec, compression(), tmp_path, cfg=cfg(steps=2, threads=1), resume=True)
    assert res.status == "ok"


def test_tensors_that_do_not_fit_are_a_clear_error(tmp_path: Path) -> None:
    spec = spec_from_dict(tiny_spec())
    train(spec, compression(), tmp_path, cfg=cfg(steps=2), checkpoint_every=2)
    from safetensors.torch import save_file

    man = json.loads((tmp_path / "checkpoint.json").read_text())
    t = tmp_path / man["tensors"]
    tensors = load_file(str(t))
    tensors["rng.generator"] = torch.zeros(3, dtype=torch.uint8)
    save_file(tensors, str(t))
    man["sha256"] = tr._sha256(t)
    (tmp_path / "checkpoint.json").write_text(json.dumps(man))
    with pytest.raises(TrainingError, match="does not fit this model and optimizer"):
        train(spec, compression(), tmp_path, cfg=cfg(steps=2), resume=True)


def _modes(folder: Path) -> dict[str, int]:
    return {
        str(p.relative_to(folder)): stat.S_IMODE(p.stat().st_mode)
        for p in folder.rglob("*")
        if p.is_file()
    }


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def test_files_train_writes_have_normal_permissions(tmp_path: Path, umask_022) -> None:
    train(
        spec_from_dict(tiny_spec()), compression(), tmp_path, cfg=cfg(steps=2), checkpoint_every=1
    )
    modes = _modes(tmp_path)
    assert len(modes) == 6 and set(modes.values()) == {0o644}, modes


def test_files_export_writes_have_normal_permissions(tmp_path: Path, umask_022) -> None:
    from exporters import export_onnx, export_safetensors

    spec = spec_from_dict(tiny_spec())
    export_safetensors(spec, tmp_path / "bundle")
    export_onnx(spec, tmp_path / "m.onnx", task="random", check=False)
    modes = _modes(tmp_path)
    assert set(modes) == {"bundle/spec.yaml", "bundle/model.safetensors", "m.onnx"}
    assert set(modes.values()) == {0o644}, modes
