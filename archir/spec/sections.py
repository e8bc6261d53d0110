"""The ``train:`` and ``search:`` sections of a spec.

Kept apart from the model section so the trainer and the searchers can grow their own
options without touching the model grammar.

Values are strict: a boolean is not a number, a string is not a number or a boolean
(``steps: "300"``, ``n_heads: true`` and ``predict: "yes"`` are errors), floats must be finite
(``lr: .inf`` is an error), and every size, count and duration has an upper bound no real run
reaches (the ``MAX_*`` constants) so absurd values are refused at load time.
"""

from __future__ import annotations

import math
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, field_validator

#: Optimizer steps (train.steps, warmup, eval_every, fidelity steps).
MAX_STEPS = 100_000_000
#: Sequences per batch (train.batch_size, latency.batch).
MAX_BATCH = 65_536
#: Tokens per sequence (train.seq_len, latency.seq_len, model.max_seq_len).
MAX_SEQ_LEN = 1 << 20
#: Seconds (time budgets, search timeout): ten years.
MAX_SECONDS = 10 * 365 * 86400.0
#: Training seeds: non-negative, at most 2^32 - 1 (NumPy's bound; ``archir train --seed``).
MAX_SEED = 2**32 - 1
#: Search seeds: at most 2^31 - 1 (as ``archir search --seed``).
MAX_SEARCH_SEED = 2**31 - 1
#: Search trials, population and rejections in a row.
MAX_TRIALS = 1_000_000
#: Processes sharing a study; CPU threads.
MAX_WORKERS = 256
MAX_THREADS = 1024
#: Rungs of a fidelity ladder.
MAX_RUNGS = 8
#: Evaluation batches per evaluation; latency warm-up runs and repeats.
MAX_REPEATS = 100_000


class Strict(BaseModel):
    """Base of the spec's sections: unknown keys are errors; values are strict (no
    bool-as-int, no str-as-number) and floats finite."""

    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


def _task_option(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        raise ValueError("must be a finite number")
    if not isinstance(v, bool | int | float | str):
        raise ValueError("must be a number, a string or true/false")
    return v


TaskOption = Annotated[int | float | str | bool, BeforeValidator(_task_option)]


class TrainSection(Strict):
    """How to train a concrete model (``archir train`` and every search trial).

    ``steps`` is the optimizer step budget; ``time_budget_s`` stops earlier when given.
    ``lr`` is the peak AdamW learning rate reached after ``warmup_steps``; ``schedule`` says
    how it decays to ``min_lr``: ``cosine`` over the remaining steps, or ``wsd``
    (warmup-stable-decay: constant, then linear decay over the last ``decay_fraction`` of
    the steps; Hu et al. 2024, MiniCPM; Hägele et al. 2024). Under ``wsd`` every step before
    the decay starts is the same for any ``steps``, so a short run is a prefix of a long one
    plus its own decay (what the search's fidelity ladder relies on).
    ``eval_batches`` batches of ``eval_batch_size`` (default ``batch_size``) sequences are
    evaluated; a number larger than the validation split holds evaluates all of it.
    ``init``: a safetensors file (relative paths: from the spec file's folder) whose tensors
    start the model instead of a fresh initialization where names match — copied, or
    sliced/padded when a width changed (:mod:`archir.inherit`); how an imported Hugging Face
    model is hybridized or shrunk.
    """

    task: str = Field("text:pydoc", min_length=1, max_length=4096, pattern=r"^[^\x00-\x1f\x7f]+$")
    steps: int = Field(300, ge=1, le=MAX_STEPS)
    batch_size: int = Field(32, ge=1, le=MAX_BATCH)
    seq_len: int = Field(128, ge=1, le=MAX_SEQ_LEN)
    lr: float = Field(1e-3, gt=0)
    min_lr: float = Field(1e-5, ge=0)
    weight_decay: float = Field(0.1, ge=0)
    warmup_steps: int = Field(20, ge=0, le=MAX_STEPS)
    grad_clip: float = Field(1.0, gt=0)
    eval_every: int = Field(100, ge=1, le=MAX_STEPS)
    eval_batches: int = Field(8, ge=1, le=MAX_REPEATS)
    eval_batch_size: int | None = Field(None, ge=1, le=MAX_BATCH)
    schedule: Literal["cosine", "wsd"] = "cosine"
    decay_fraction: float = Field(0.2, gt=0, le=1)
    seed: int = Field(0, ge=0, le=MAX_SEED)
    time_budget_s: float | None = Field(None, gt=0, le=MAX_SECONDS)
    threads: int | None = Field(None, ge=1, le=MAX_THREADS)
    task_options: dict[str, TaskOption] = Field(default_factory=dict)
    init: str | None = Field(None, min_length=1, max_length=4096, pattern=r"^[^\x00-\x1f\x7f]+$")


Direction = Literal["minimize", "maximize"]


class BudgetSection(Strict):
    """How much a search may spend: ``trials`` finished trials and/or ``timeout_s`` seconds."""

    trials: int = Field(20, ge=1, le=MAX_TRIALS)
    timeout_s: float | None = Field(None, gt=0, le=MAX_SECONDS)


class FidelitySection(Strict):
    """How each trial is evaluated.

    ``kind``: ``cost`` (no training: cost metrics and measured latency only), ``proxy``
    (a short training run: ``steps`` optimizer steps and/or ``time_budget_s`` seconds, the
    rest of the ``train:`` section unchanged), ``full`` (the ``train:`` section as written)
    or ``ladder``: rungs of training budget with promotion (``rungs``: optimizer steps of
    each rung, growing — default ``train.steps`` / 16, / 4 and ``train.steps``; ``eta``: the
    top ``1/eta`` of each rung is promoted to the next, where it continues from its
    checkpoint). A ladder trains with the ``wsd`` schedule (a short run is a prefix of a
    long one plus its own decay) and evaluates on the whole validation split unless
    ``eval_batches`` says otherwise (see :mod:`searchers.ladder`).
    A plain string (``fidelity: cost``) is accepted as ``{kind: cost}``.
    """

    kind: Literal["cost", "proxy", "full", "ladder"] = "proxy"
    steps: int | None = Field(None, ge=1, le=MAX_STEPS)
    time_budget_s: float | None = Field(None, gt=0, le=MAX_SECONDS)
    eval_every: int | None = Field(None, ge=1, le=MAX_STEPS)
    eval_batches: int | None = Field(None, ge=1, le=MAX_REPEATS)
    rungs: list[Annotated[int, Field(ge=1, le=MAX_STEPS)]] | None = Field(
        None, min_length=2, max_length=MAX_RUNGS
    )
    eta: int = Field(3, ge=2, le=1000)

    @field_validator("rungs")
    @classmethod
    def _growing(cls, v: list[int] | None) -> list[int] | None:
        if v is not None and any(b <= a for a, b in zip(v, v[1:])):
            raise ValueError(f"rungs must grow from one to the next, got {v}")
        return v


class LatencySection(Strict):
    """How ``latency_ms`` is measured: CPU, ``threads`` intra-op threads, ``warmup`` untimed
    runs, then the median of ``repeats`` forward passes of a ``[batch, seq_len]`` input
    (``seq_len`` defaults to ``train.seq_len``) on ``runtime`` (``torch`` eager or ``ort``
    onnxruntime). ``predict``: ``null`` — predicted when a latency calibration for this
    machine, runtime and thread count exists, else measured; ``true`` — always predicted
    (the search refuses to start without a calibration); ``false`` — always measured."""

    runtime: Literal["torch", "ort"] = "torch"
    predict: bool | None = None
    threads: int = Field(1, ge=1, le=MAX_THREADS)
    batch: int = Field(1, ge=1, le=MAX_BATCH)
    seq_len: int | None = Field(None, ge=1, le=MAX_SEQ_LEN)
    warmup: int = Field(3, ge=0, le=MAX_REPEATS)
    repeats: int = Field(10, ge=1, le=MAX_REPEATS)


class DecodeSection(Strict):
    """How the decode costs are measured (``decode_ms_per_token``, ``prefill_ms``; batch 1):
    the cost of one more token with ``context`` tokens of state, and of feeding a
    ``context``-token prompt token by token, on ``runtime`` (``ort``: the decode model that
    ``archir export --decode`` ships; ``torch``: the PyTorch step) with ``threads`` intra-op
    threads."""

    context: int = Field(128, ge=1, le=MAX_SEQ_LEN)
    runtime: Literal["torch", "ort"] = "ort"
    threads: int = Field(1, ge=1, le=MAX_THREADS)


#: a knob's values in ``search.evolution``: one value (fixed) or a list to draw from
KnobValue = int | float | str | bool
KnobRange = KnobValue | Annotated[list[KnobValue], Field(min_length=1)]

#: what evolution may do to a model (``search.evolution.operators``)
Operator = Literal[
    "swap_token_mixer",
    "swap_channel_mixer",
    "insert_layer",
    "drop_layer",
    "d_model",
    "expansion",
    "d_state",
    "n_heads",
    "bits",
    "share_weights",
    "skip",
]
#: every operator at rate 1, except the two that change connectivity (0.5)
DEFAULT_OPERATOR_RATES: dict[str, float] = {
    "swap_token_mixer": 1.0,
    "swap_channel_mixer": 1.0,
    "insert_layer": 1.0,
    "drop_layer": 1.0,
    "d_model": 1.0,
    "expansion": 1.0,
    "d_state": 1.0,
    "n_heads": 1.0,
    "bits": 1.0,
    "share_weights": 0.5,
    "skip": 0.5,
}


class EvolutionSection(Strict):
    """What ``archir search --searcher evolution`` may change in a model (the author stays in
    charge: ``d_model``, ``bits`` and the knob operators move only within ranges given here;
    ``insert_layer`` / ``drop_layer`` within ``depth``, default the seed's depth −1 to +2;
    ``share_weights`` and ``skip`` are on at rate 0.5 unless ``operators`` turns them off).

    ``token_mixers`` / ``channel_mixers``: the kinds a swapped or inserted block may take,
    each with its knobs (one value: fixed; a list: drawn from, and mutated within by the
    ``expansion`` / ``d_state`` / ``n_heads`` operators); empty: the kinds the spec itself
    uses, with their written knobs. ``depth``: ``[min, max]`` layers (a layer is one repeat of
    a layer group). ``d_model``: widths to move between. ``bits``: weight bits a mixer may move
    to. ``operators``: relative rates (0 turns one off; unknown names are errors).
    ``crossover``: the chance a child is two parents joined at a layer boundary.
    ``mutations``: at most this many operators per child (1 to ``mutations``, uniformly).
    ``population``: the elite that parents are drawn from (binary tournaments; default
    ``search.population`` or 8). ``inherit``: a child starts from its parents' trained
    weights where tensors carry over (:mod:`archir.inherit`); off by default, so a trial's
    quality is that of the spec trained from scratch. ``max_proposals``: children drawn per
    trial before the search gives up (each one invalid, infeasible by its cost, or a model
    already seen).
    """

    token_mixers: dict[str, dict[str, KnobRange]] = Field(default_factory=dict)
    channel_mixers: dict[str, dict[str, KnobRange]] = Field(default_factory=dict)
    depth: list[Annotated[int, Field(ge=1, le=4096)]] | None = Field(
        None, min_length=2, max_length=2
    )
    d_model: list[Annotated[int, Field(ge=1, le=65_536)]] | None = Field(None, min_length=1)
    bits: list[float] | None = Field(None, min_length=1)
    operators: dict[Operator, Annotated[float, Field(ge=0, le=1000)]] = Field(default_factory=dict)
    crossover: float = Field(0.2, ge=0, le=1)
    mutations: int = Field(1, ge=1, le=16)
    population: int | None = Field(None, ge=2, le=MAX_TRIALS)
    inherit: bool = False
    max_proposals: int = Field(200, ge=1, le=100_000)

    @field_validator("depth")
    @classmethod
    def _depth_order(cls, v: list[int] | None) -> list[int] | None:
        if v is not None and v[0] > v[1]:
            raise ValueError(f"depth is [min, max] with min <= max, got {v}")
        return v

    def rates(self) -> dict[str, float]:
        """Every operator's rate (the defaults overridden by ``operators``)."""
        return {**DEFAULT_OPERATOR_RATES, **{str(k): v for k, v in self.operators.items()}}


class SearchSection(Strict):
    """What a search optimizes (``archir search``).

    ``objectives`` maps a metric name (``val_bpb``, ``accuracy``, ``params``,
    ``latency_ms`` ...) to a direction; ``constraints`` maps a metric to an expression such
    as ``"<= 2e6"``. ``sampler``: ``tpe`` (default for one objective), ``nsga2`` (default for
    several), ``random`` or ``gp``; ``seed`` makes proposals reproducible. ``pruner``
    (single-objective only): ``median``, ``hyperband`` or ``none``. ``max_rejections``:
    consecutive candidates refused by a constraint before the search gives up with the
    closest candidates. ``workers``: processes sharing the study. ``evolution``: what
    ``--searcher evolution`` may change in the graph (:class:`EvolutionSection`).
    """

    objectives: dict[str, Direction] = Field(default_factory=lambda: {"val_loss": "minimize"})
    constraints: dict[str, str] = Field(default_factory=dict)
    budget: BudgetSection = Field(default_factory=BudgetSection)
    sampler: Literal["tpe", "nsga2", "random", "gp"] | None = None
    seed: int = Field(0, ge=0, le=MAX_SEARCH_SEED)
    pruner: Literal["median", "hyperband", "none"] = "median"
    population: int | None = Field(None, ge=2, le=MAX_TRIALS)
    fidelity: FidelitySection = Field(default_factory=FidelitySection)
    latency: LatencySection = Field(default_factory=LatencySection)
    decode: DecodeSection = Field(default_factory=DecodeSection)
    workers: int = Field(1, ge=1, le=MAX_WORKERS)
    max_rejections: int = Field(50, ge=1, le=MAX_TRIALS)
    evolution: EvolutionSection | None = None

    @field_validator("fidelity", mode="before")
    @classmethod
    def _fidelity_shorthand(cls, v: Any) -> Any:
        return {"kind": v} if isinstance(v, str) else v
