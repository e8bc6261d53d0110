"""The ``train:`` and ``search:`` sections of a spec.

Kept apart from the model section so the trainer and the searchers can grow their own
options without touching the model grammar.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TrainSection(Strict):
    """How to train a concrete model (``archir train`` and every search trial).

    ``steps`` is the optimizer step budget; ``time_budget_s`` stops earlier when given.
    ``lr`` is the peak AdamW learning rate reached after ``warmup_steps`` and decayed by a
    cosine schedule to ``min_lr``.
    """

    task: str = "text:pydoc"
    steps: int = Field(300, ge=1)
    batch_size: int = Field(32, ge=1)
    seq_len: int = Field(128, ge=1)
    lr: float = Field(1e-3, gt=0)
    min_lr: float = Field(1e-5, ge=0)
    weight_decay: float = Field(0.1, ge=0)
    warmup_steps: int = Field(20, ge=0)
    grad_clip: float = Field(1.0, gt=0)
    eval_every: int = Field(100, ge=1)
    eval_batches: int = Field(8, ge=1)
    seed: int = 0
    time_budget_s: float | None = Field(None, gt=0)
    threads: int | None = Field(None, ge=1)
    task_options: dict[str, int | float | str | bool] = Field(default_factory=dict)


Direction = Literal["minimize", "maximize"]


class BudgetSection(Strict):
    trials: int = Field(20, ge=1)
    timeout_s: float | None = Field(None, gt=0)


class SearchSection(Strict):
    """What a search optimizes (``archir search``).

    ``objectives`` maps a metric name (``val_bpb``, ``accuracy``, ``params``,
    ``latency_ms`` ...) to a direction; ``constraints`` maps a metric to an expression such
    as ``"<= 2e6"``.
    """

    objectives: dict[str, Direction] = Field(default_factory=lambda: {"val_loss": "minimize"})
    constraints: dict[str, str] = Field(default_factory=dict)
    budget: BudgetSection = Field(default_factory=BudgetSection)
    sampler: str | None = None
    seed: int = 0
    fidelity: dict[str, int | float | str | bool] = Field(default_factory=dict)
