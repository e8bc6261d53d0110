"""The ``train:`` and ``search:`` sections of a spec.

Kept apart from the model section so the trainer and the searchers can grow their own
options without touching the model grammar.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator


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
    """How much a search may spend: ``trials`` finished trials and/or ``timeout_s`` seconds."""

    trials: int = Field(20, ge=1)
    timeout_s: float | None = Field(None, gt=0)


class FidelitySection(Strict):
    """How each trial is evaluated.

    ``kind``: ``cost`` (no training: cost metrics and measured latency only), ``proxy``
    (a short training run: ``steps`` optimizer steps and/or ``time_budget_s`` seconds, the
    rest of the ``train:`` section unchanged) or ``full`` (the ``train:`` section as written).
    A plain string (``fidelity: cost``) is accepted as ``{kind: cost}``.
    """

    kind: Literal["cost", "proxy", "full"] = "proxy"
    steps: int | None = Field(None, ge=1)
    time_budget_s: float | None = Field(None, gt=0)
    eval_every: int | None = Field(None, ge=1)
    eval_batches: int | None = Field(None, ge=1)


class LatencySection(Strict):
    """How ``latency_ms`` is measured: CPU, ``threads`` intra-op threads, ``warmup`` untimed
    runs, then the median of ``repeats`` forward passes of a ``[batch, seq_len]`` input
    (``seq_len`` defaults to ``train.seq_len``) on ``runtime`` (``torch`` eager or ``ort``
    onnxruntime). ``predict``: ``null`` — predicted when a latency calibration for this
    machine, runtime and thread count exists, else measured; ``true`` — always predicted
    (the search refuses to start without a calibration); ``false`` — always measured."""

    runtime: Literal["torch", "ort"] = "torch"
    predict: bool | None = None
    threads: int = Field(1, ge=1)
    batch: int = Field(1, ge=1)
    seq_len: int | None = Field(None, ge=1)
    warmup: int = Field(3, ge=0)
    repeats: int = Field(10, ge=1)


class SearchSection(Strict):
    """What a search optimizes (``archir search``).

    ``objectives`` maps a metric name (``val_bpb``, ``accuracy``, ``params``,
    ``latency_ms`` ...) to a direction; ``constraints`` maps a metric to an expression such
    as ``"<= 2e6"``. ``sampler``: ``tpe`` (default for one objective), ``nsga2`` (default for
    several), ``random`` or ``gp``; ``seed`` makes proposals reproducible. ``pruner``
    (single-objective only): ``median``, ``hyperband`` or ``none``. ``max_rejections``:
    consecutive candidates refused by a constraint before the search gives up with the
    closest candidates. ``workers``: processes sharing the study.
    """

    objectives: dict[str, Direction] = Field(default_factory=lambda: {"val_loss": "minimize"})
    constraints: dict[str, str] = Field(default_factory=dict)
    budget: BudgetSection = Field(default_factory=BudgetSection)
    sampler: Literal["tpe", "nsga2", "random", "gp"] | None = None
    seed: int = 0
    pruner: Literal["median", "hyperband", "none"] = "median"
    population: int | None = Field(None, ge=2)
    fidelity: FidelitySection = Field(default_factory=FidelitySection)
    latency: LatencySection = Field(default_factory=LatencySection)
    workers: int = Field(1, ge=1)
    max_rejections: int = Field(50, ge=1)

    @field_validator("fidelity", mode="before")
    @classmethod
    def _fidelity_shorthand(cls, v: Any) -> Any:
        return {"kind": v} if isinstance(v, str) else v
