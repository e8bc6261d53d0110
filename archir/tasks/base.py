"""The task interface and registry.

A task yields training batches and evaluates a model on held-out data with one headline
metric. Every task runs on data available offline; nothing is downloaded.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any

import torch

from archir.errors import TaskError, did_you_mean


class Task(ABC):
    """Base class of tasks.

    Attributes:
        name: the task's full name, e.g. ``text:pydoc``.
        metric: headline metric name, e.g. ``val_bpb`` or ``accuracy``.
        direction: ``"minimize"`` or ``"maximize"`` for the metric.
        model_task: the spec ``model.task`` it needs (``causal_lm`` ...).
        recommended_train: ``train:`` fields a preset suggests (``steps``, ``lr`` ...); the
            ``archir train`` command applies them under the user's explicit flags.
    """

    name: str = ""
    metric: str = "val_loss"
    direction: str = "minimize"
    model_task: str = "causal_lm"
    recommended_train: dict[str, Any] = {}

    def extra_modules(self, model: torch.nn.Module) -> torch.nn.Module | None:
        """Trainable modules the task adds around ``model`` (e.g. MAD compression's MLP
        decoder), or None. The trainer optimizes, clips, switches train/eval mode and
        checkpoints them with the model; the task uses them in :meth:`loss` and
        :meth:`evaluate`. Calling it twice with the same model returns the same module."""
        return None

    def check_model(self, model_spec: Any) -> None:
        """Raise TaskError when the spec's model cannot run this task."""
        if model_spec.task != self.model_task:
            raise TaskError(
                f"task '{self.name}' needs model.task '{self.model_task}', "
                f"the spec has '{model_spec.task}'",
                hint="pick a spec written for this task",
            )

    @abstractmethod
    def train_batch(
        self, batch_size: int, seq_len: int, gen: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One training batch ``(inputs, targets)`` drawn with ``gen``."""

    @abstractmethod
    def loss(self, model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Scalar training loss of ``model`` on a batch (nats)."""

    @abstractmethod
    def evaluate(
        self, model: torch.nn.Module, batch_size: int, seq_len: int, max_batches: int
    ) -> dict[str, float]:
        """Held-out metrics (the headline ``metric`` included), deterministic."""

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "metric": self.metric,
            "direction": self.direction,
            "model_task": self.model_task,
        }


_FACTORIES: dict[str, Callable[[str, dict[str, Any]], Task]] = {}
_DOCS: dict[str, str] = {}


def register_task(prefix: str, doc: str) -> Callable[[Callable[[str, dict[str, Any]], Task]], Any]:
    """Register a factory for task names ``prefix`` or ``prefix:<arg>``."""

    def deco(fn: Callable[[str, dict[str, Any]], Task]) -> Callable[[str, dict[str, Any]], Task]:
        _FACTORIES[prefix] = fn
        _DOCS[prefix] = doc
        return fn

    return deco


def _load() -> None:
    from archir.tasks import text  # noqa: F401

    for mod in ("archir.tasks.digits", "archir.tasks.mad"):
        try:
            __import__(mod)
        except ModuleNotFoundError as exc:  # a family not built yet
            if exc.name != mod:
                raise


def task_names() -> dict[str, str]:
    """Task name prefixes and their one-line descriptions."""
    _load()
    return dict(_DOCS)


def get_task(name: str, options: dict[str, Any] | None = None) -> Task:
    """The task called ``name`` (e.g. ``text:pydoc``, ``text:corpus.txt``, ``digits``).

    Raises:
        TaskError: unknown task (with the nearest name), or its data cannot be used.
    """
    _load()
    prefix, _, arg = name.partition(":")
    if prefix not in _FACTORIES:
        raise TaskError(f"unknown task '{name}'", hint=did_you_mean(prefix, _FACTORIES))
    return _FACTORIES[prefix](arg, dict(options or {}))
