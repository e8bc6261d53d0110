"""The digits task and the ViT zoo spec."""

from __future__ import annotations

import numpy as np
import pytest

from archir.errors import TaskError
from archir.spec import load_spec, spec_from_dict
from archir.spec.sections import TrainSection
from archir.tasks import get_task
from archir.tasks.digits import load_digits_split
from archir.train import train


def test_split_is_fixed_stratified_and_scaled():
    tx, ty, vx, vy = load_digits_split()
    assert tx.shape == (1438, 1, 8, 8) and vx.shape == (359, 1, 8, 8)
    assert tx.dtype == np.float32 and tx.min() >= 0.0 and tx.max() <= 1.0
    counts = np.bincount(vy, minlength=10) / np.bincount(np.r_[ty, vy], minlength=10)
    assert np.allclose(counts, 0.2, atol=0.01)  # 20% of every class
    tx2, _, vx2, _ = load_digits_split()
    assert tx.tobytes() == tx2.tobytes() and vx.tobytes() == vx2.tobytes()


def test_check_model_errors(zoo):
    task = get_task("digits")
    spec = load_spec(zoo / "vit-digits.yaml")
    task.check_model(spec.model.model)
    data = dict(spec.data)
    data["model"] = {**data["model"], "n_classes": 5}
    with pytest.raises(TaskError, match="10 classes"):
        task.check_model(spec_from_dict(data).model.model)
    with pytest.raises(TaskError, match="needs model.task 'image_classification'"):
        task.check_model(load_spec(zoo / "transformer.yaml").model.model)
    with pytest.raises(TaskError, match="no argument"):
        get_task("digits:mnist")


@pytest.mark.heavy
def test_vit_digits_learns(zoo):
    spec = load_spec(zoo / "vit-digits.yaml")
    cfg = TrainSection(task="digits", steps=300, batch_size=64, lr=3e-3, warmup_steps=10)
    res = train(spec, cfg=cfg)
    assert res.status == "ok"
    assert res.metrics["accuracy"] > 0.7  # chance is 0.1; about 0.84 at 300 steps
