"""Image classification on scikit-learn's bundled handwritten digits (``digits``).

1,797 grayscale 8x8 images of the digits 0-9 (UCI optdigits test set, shipped inside
scikit-learn: ``sklearn.datasets.load_digits``; nothing is downloaded). Pixels (0-16) are
scaled to [0, 1]. Split: fixed and stratified — for each class, a seeded permutation puts
20% of its images in the test set (359 test, 1,438 train). Metric: test ``accuracy``.

Inputs ``[batch, 1, 8, 8]`` float32, targets ``[batch]`` int64 class indices.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from archir.errors import TaskError
from archir.tasks.base import Task, register_task

N_CLASSES = 10
IMAGE_SIZE = 8
SPLIT_SEED = 0
TEST_FRACTION = 0.2


def load_digits_split(
    seed: int = SPLIT_SEED, test_fraction: float = TEST_FRACTION
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``(train_x [N,1,8,8] float32 in [0,1], train_y [N] int64, test_x, test_y)``, a
    stratified split made with a seeded NumPy generator (same seed, same split)."""
    from sklearn.datasets import load_digits

    ds = load_digits()
    x = (ds.images.astype(np.float32) / 16.0)[:, None, :, :]
    y = ds.target.astype(np.int64)
    rng = np.random.Generator(np.random.PCG64(seed))
    test_idx: list[np.ndarray] = []
    train_idx: list[np.ndarray] = []
    for c in range(N_CLASSES):
        idx = rng.permutation(np.flatnonzero(y == c))
        n_test = int(round(len(idx) * test_fraction))
        test_idx.append(idx[:n_test])
        train_idx.append(idx[n_test:])
    tr = np.sort(np.concatenate(train_idx))
    te = np.sort(np.concatenate(test_idx))
    return x[tr], y[tr], x[te], y[te]


class DigitsTask(Task):
    """``digits``: 10-way classification of 8x8 images; needs ``model.task:
    image_classification`` with ``image_size: 8``, ``channels: 1`` and ``n_classes >= 10``."""

    name = "digits"
    metric = "accuracy"
    direction = "maximize"
    model_task = "image_classification"

    def __init__(self) -> None:
        tx, ty, vx, vy = load_digits_split()
        self.train_x, self.train_y = torch.from_numpy(tx), torch.from_numpy(ty)
        self.test_x, self.test_y = torch.from_numpy(vx), torch.from_numpy(vy)

    def check_model(self, model_spec: Any) -> None:
        super().check_model(model_spec)
        if model_spec.image_size != IMAGE_SIZE or model_spec.channels != 1:
            raise TaskError(
                f"task 'digits' has 1-channel {IMAGE_SIZE}x{IMAGE_SIZE} images, the spec has "
                f"image_size {model_spec.image_size} and channels {model_spec.channels}",
                hint="set model.image_size: 8 and model.channels: 1",
            )
        if model_spec.n_classes < N_CLASSES:
            raise TaskError(
                f"task 'digits' has {N_CLASSES} classes, the spec has n_classes "
                f"{model_spec.n_classes}",
                hint="set model.n_classes: 10",
            )

    def train_batch(self, batch_size: int, seq_len: int, gen: torch.Generator):
        idx = torch.randint(0, len(self.train_x), (batch_size,), generator=gen)
        return self.train_x[idx], self.train_y[idx]

    def loss(self, model, x, y):
        return F.cross_entropy(model(x), y)

    @torch.no_grad()
    def evaluate(self, model, batch_size: int, seq_len: int, max_batches: int):
        """Accuracy and loss on the whole test split (``max_batches`` is ignored)."""
        correct, total_loss = 0, 0.0
        for i in range(0, len(self.test_x), 256):
            x, y = self.test_x[i : i + 256], self.test_y[i : i + 256]
            logits = model(x)
            total_loss += F.cross_entropy(logits, y, reduction="sum").item()
            correct += int((logits.argmax(-1) == y).sum())
        n = len(self.test_x)
        acc = correct / n
        # binomial standard error of the accuracy over the n test images
        return {
            "accuracy": acc,
            "accuracy_se": (acc * (1 - acc) / n) ** 0.5,
            "test_loss": total_loss / n,
        }


@register_task(
    "digits",
    "scikit-learn's bundled 8x8 handwritten digits (1,797 images), stratified 80/20 split; "
    "metric accuracy",
)
def make_digits_task(arg: str, options: dict[str, Any]) -> Task:
    if arg:
        raise TaskError(f"task 'digits' takes no argument, got 'digits:{arg}'", hint="use 'digits'")
    if options:
        raise TaskError(f"task 'digits' takes no options, got {sorted(options)}")
    return DigitsTask()
