"""The trainer: AdamW, linear warm-up then cosine decay, gradient clipping, held-out eval.

``train(spec, task, out_dir)`` trains a compiled spec, evaluates on held-out data, stops at
once when the loss becomes NaN/inf (reported as ``status: failed`` with the step and reason),
and writes ``model.safetensors``, ``spec.yaml`` and ``metrics.json`` into ``out_dir``.
The same spec, task and seed give the same metrics. With ``checkpoint_every`` it also writes
a checkpoint every that many steps and when it stops; ``resume=True`` continues from it,
giving the same metrics as an uninterrupted run. Trainable modules a task adds
(``Task.extra_modules``, e.g. the MAD compression decoder) are optimized and checkpointed
with the model. A model with ``matformer`` FFNs trains its granularities jointly on every
batch (MatFormer's joint loss, :meth:`Trainer._nested_step`) and its metrics add the task's
metric at each granularity (``val_bpb@g0.25`` ...); every other model trains as before.

Checkpoints hold no pickle (nothing archir loads can run code):

- ``checkpoint-<step>.safetensors``: every tensor — model and task-module state
  (``model.<key>``, ``extra.<key>``), the AdamW state per parameter index
  (``optim.<i>.exp_avg``, ``optim.<i>.exp_avg_sq``, ``optim.<i>.step``) and the RNG states
  (``rng.generator``, ``rng.torch``: ``uint8`` tensors);
- ``checkpoint.json``, the manifest, written last: format and version, the tensors file's
  name and SHA-256, the step, tokens, wall seconds, history, last training loss, the
  optimizer's ``param_groups`` hyper-parameters, the architecture's canonical hash and the
  training settings.

Both are written to a temporary file and renamed into place, the manifest after the tensors,
so a crash leaves the previous whole checkpoint (the manifest names the tensors file it
goes with); the previous tensors file is removed after the new manifest is in place. A
``checkpoint.pt`` (the pickle format of earlier versions, or a planted file) is refused,
never loaded. Files are written with the permissions of the user's umask.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import stat
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from archir.compiler import CompiledModel
from archir.compiler import compile as compile_spec
from archir.errors import TrainingError
from archir.inherit import InitReport, inherit, read_init, resolve_init
from archir.paths import write_file, write_text
from archir.spec.loader import Spec
from archir.spec.sections import TrainSection
from archir.tasks.base import Task, get_task


@dataclass
class TrainResult:
    """Outcome of a training run; ``metrics`` is what ``metrics.json`` holds."""

    status: str
    metrics: dict[str, Any]
    model: CompiledModel
    history: list[dict[str, float]] = field(default_factory=list)


def decay_steps(total: int, cfg: TrainSection) -> int:
    """Steps of the ``wsd`` schedule's final decay in a run of ``total`` steps:
    ``decay_fraction`` of them, at least 1."""
    return max(1, min(total, round(cfg.decay_fraction * total)))


def decay_start(total: int, cfg: TrainSection) -> int:
    """The first step of the ``wsd`` decay in a run of ``total`` steps (0-based). Every step
    before it has the learning rate of the stable phase, whatever ``total`` is."""
    return total - decay_steps(total, cfg)


def lr_at(step: int, cfg: TrainSection, total: int | None = None) -> float:
    """Learning rate at ``step`` (0-based) of a run of ``total`` steps (default
    ``cfg.steps``): linear warm-up over ``warmup_steps``, then ``cfg.schedule``:

    - ``cosine``: cosine from ``lr`` down to ``min_lr`` over the remaining steps;
    - ``wsd``: ``lr`` until :func:`decay_start`, then linear down to ``min_lr``, reached at
      the last step (warm-up, if it overlaps the decay, is cut short by it).
    """
    total = cfg.steps if total is None else total
    warm = cfg.lr * (step + 1) / cfg.warmup_steps if step < cfg.warmup_steps else cfg.lr
    if cfg.schedule == "wsd":
        start = decay_start(total, cfg)
        if step < start:
            return warm
        t = min(1.0, (step - start + 1) / decay_steps(total, cfg))
        return min(warm, cfg.lr + (cfg.min_lr - cfg.lr) * t)
    if step < cfg.warmup_steps:
        return warm
    span = max(1, total - cfg.warmup_steps)
    t = min(1.0, (step - cfg.warmup_steps) / span)
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * t))


def make_optimizer(
    model: torch.nn.Module, cfg: TrainSection, extra: torch.nn.Module | None = None
) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only (not on norms, biases, gains); ``extra``
    (a task's own modules) is optimized alongside."""
    decay, no_decay = [], []
    seen: set[int] = set()
    params = list(model.parameters()) + (list(extra.parameters()) if extra is not None else [])
    for p in params:
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        (decay if p.dim() >= 2 else no_decay).append(p)
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.95))


class Trainer:
    """The state of one training run and the operations the trainer and the fidelity ladder
    are built from: optimizer steps at a given learning rate, held-out evaluation, an
    in-memory snapshot (to branch off a decay and come back), and checkpoints.

    Holds the compiled model (``[batch, seq]`` int64 tokens in), the task's own trainable
    modules, AdamW, the data generator (seeded ``cfg.seed + 1``), the step reached, tokens
    seen, the history of evaluations and the last training loss (nats).
    """

    def __init__(
        self, spec: Spec, task: Task, cfg: TrainSection, model: CompiledModel | None = None
    ) -> None:
        task.check_model(spec.model.model)
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        seed_everything(cfg.seed)
        self.spec, self.task, self.cfg = spec, task, cfg
        self.model = model or compile_spec(spec, seed=cfg.seed)
        #: what ``train.init`` inherited (None without it); a checkpoint resumed afterwards
        #: replaces these weights, as it replaces a fresh initialization
        self.init_report: InitReport | None = None
        if cfg.init is not None:
            path = resolve_init(cfg.init, spec.file)
            self.init_report = inherit(self.model, read_init(path), str(path))
        self.extra = task.extra_modules(self.model)
        extra = [self.extra] if self.extra is not None else []
        self.trained = torch.nn.ModuleList([self.model, *extra])
        self.opt = make_optimizer(self.model, cfg, self.extra)
        self.gen = torch.Generator().manual_seed(cfg.seed + 1)
        self.seq_len = min(cfg.seq_len, spec.model.model.max_seq_len)
        self.step = 0
        self.tokens = 0
        self.history: list[dict[str, float]] = []
        self.last_loss = float("nan")
        self.state: dict[str, Any] = {}  # other JSON kept in the checkpoint (ladder rungs)
        self._t0 = time.perf_counter()
        self._hash: str | None = None
        #: MatFormer granularities trained jointly each step (empty: an ordinary model)
        self.granularities = nested_granularities(self.model)

    @property
    def wall_s(self) -> float:
        """Seconds of training so far, earlier (checkpointed) sessions included."""
        return time.perf_counter() - self._t0

    def train_step(self, lr: float) -> str | None:
        """One AdamW step at learning rate ``lr`` on a fresh batch; ``self.step`` advances.

        Returns:
            None, or why the step was not taken (the loss was not finite).
        """
        for g in self.opt.param_groups:
            g["lr"] = lr
        x, y = self.task.train_batch(self.cfg.batch_size, self.seq_len, self.gen)
        if self.granularities:
            return self._nested_step(x, y)
        loss = self.task.loss(self.model, x, y)
        aux = self.model.aux_loss() if hasattr(self.model, "aux_loss") else None
        total = loss + aux if aux is not None else loss
        if not torch.isfinite(total):
            return f"loss became {total.item()} at step {self.step}"
        self.opt.zero_grad(set_to_none=True)
        total.backward()
        torch.nn.utils.clip_grad_norm_(self.trained.parameters(), self.cfg.grad_clip)
        self.opt.step()
        self.tokens += y.numel()
        self.last_loss = loss.item()
        self.step += 1
        return None

    def _nested_step(self, x: torch.Tensor, y: torch.Tensor) -> str | None:
        """MatFormer's joint step (Devvrit, Kudugunta et al., 2023, §3): the loss
        ``Σ_i λ_i·L(M_i(x), y)`` over every granularity ``i`` on the same batch, with uniform
        ``λ_i = 1/g`` (so gradient clipping sees one model's scale); gradients are
        accumulated one granularity at a time (one forward and backward each).
        ``last_loss`` is the full width's loss."""
        from archir.blocks.mlp import use_granularity

        self.opt.zero_grad(set_to_none=True)
        n = len(self.granularities)
        full = float("nan")
        for g in self.granularities:
            with use_granularity(self.model, g):
                loss = self.task.loss(self.model, x, y)
                aux = self.model.aux_loss() if hasattr(self.model, "aux_loss") else None
            total = loss + aux if aux is not None else loss
            if not torch.isfinite(total):
                self.opt.zero_grad(set_to_none=True)
                return f"loss became {total.item()} at step {self.step} (granularity {g:g})"
            (total / n).backward()
            if g == 1.0:
                full = loss.item()
        torch.nn.utils.clip_grad_norm_(self.trained.parameters(), self.cfg.grad_clip)
        self.opt.step()
        self.tokens += y.numel()
        self.last_loss = full
        self.step += 1
        return None

    def evaluate_granularities(self) -> dict[str, float]:
        """The task's headline metric and ``val_loss`` at every MatFormer granularity but
        the full width, named ``<metric>@g<granularity>`` (e.g. ``val_bpb@g0.25``); empty
        for a model without MatFormer blocks."""
        from archir.blocks.mlp import use_granularity

        out: dict[str, float] = {}
        for g in self.granularities:
            with use_granularity(self.model, g):
                ev = self.evaluate()
            for k in dict.fromkeys((self.task.metric, "val_loss")):
                if k in ev:
                    out[f"{k}@g{g:g}"] = ev[k]
        return out

    def evaluate(self) -> dict[str, float]:
        """The task's held-out metrics (``eval_batches`` batches of ``eval_batch_size``)."""
        self.trained.eval()
        try:
            bs = self.cfg.eval_batch_size or self.cfg.batch_size
            return self.task.evaluate(self.model, bs, self.seq_len, self.cfg.eval_batches)
        finally:
            self.trained.train()

    def snapshot(self) -> dict[str, Any]:
        """A copy of everything a step changes (weights, optimizer, generators, counters)."""
        import copy

        return {
            "model": copy.deepcopy(self.model.state_dict()),
            "extra": copy.deepcopy(self.extra.state_dict()) if self.extra is not None else None,
            "opt": copy.deepcopy(self.opt.state_dict()),
            "gen": self.gen.get_state(),
            "rng": torch.get_rng_state(),
            "counters": (self.step, self.tokens, self.last_loss),
        }

    def restore(self, snap: dict[str, Any]) -> None:
        """Go back to a :meth:`snapshot` (wall time keeps running)."""
        self.model.load_state_dict(snap["model"])
        if self.extra is not None:
            self.extra.load_state_dict(snap["extra"])
        self.opt.load_state_dict(snap["opt"])
        self.gen.set_state(snap["gen"])
        torch.set_rng_state(snap["rng"])
        self.step, self.tokens, self.last_loss = snap["counters"]

    def save(self, out: Path) -> None:
        """Write a checkpoint of the current state into ``out`` (:func:`save_checkpoint`)."""
        if self._hash is None:
            self._hash = _spec_hash(self.spec)
        save_checkpoint(
            out,
            _pack(self.model, self.extra, self.opt, self.gen),
            {
                "step": self.step,
                "tokens": self.tokens,
                "wall_s": self.wall_s,
                "history": self.history,
                "train_loss": self.last_loss,
                "spec_hash": self._hash,
                "train": _settings(self.cfg),
                **self.state,
            },
        )

    def resume(self, out: Path) -> bool:
        """Continue from ``out``'s checkpoint when there is one; False when there is none.

        Raises:
            TrainingError: see :func:`load_checkpoint`, :func:`_check_resumable`.
        """
        loaded = load_checkpoint(out)
        if loaded is None:
            return False
        state, tensors = loaded
        _check_resumable(out / CHECKPOINT, state, self.spec, self.cfg)
        _restore(out / CHECKPOINT, state, tensors, self.model, self.extra, self.opt, self.gen)
        self.step, self.tokens = state["step"], state["tokens"]
        self.history, self.last_loss = state["history"], state["train_loss"]
        self._t0 = time.perf_counter() - state["wall_s"]
        self.state = {k: state[k] for k in _KEEP_STATE if k in state}
        return True


def train(
    spec: Spec,
    task: Task | None = None,
    out_dir: str | Path | None = None,
    cfg: TrainSection | None = None,
    *,
    progress: bool = False,
    callback: Callable[[int, dict[str, float]], bool | None] | None = None,
    model: CompiledModel | None = None,
    checkpoint_every: int | None = None,
    resume: bool = False,
) -> TrainResult:
    """Train a concrete spec on a task.

    Args:
        spec: concrete spec; its ``train:`` section is the default configuration.
        task: the task (default: ``get_task(cfg.task)``).
        out_dir: where to write the checkpoint and ``metrics.json`` (nothing written if None).
        cfg: overrides the spec's ``train:`` section.
        progress: show a rich progress bar.
        callback: called after each evaluation with ``(step, metrics)``; returning True stops
            training early (used for pruning).
        model: an already compiled model to train (default: compile the spec with ``seed``).
        checkpoint_every: write a checkpoint (``out_dir/checkpoint.json`` + its
            ``checkpoint-<step>.safetensors``) every this many steps and when training stops
            (needs ``out_dir``).
        resume: continue from ``out_dir/checkpoint.json`` when it exists (same spec and
            training settings required); the result equals an uninterrupted run's.

    Returns:
        TrainResult with ``status`` ``"ok"`` or ``"failed"`` (non-finite loss) or
        ``"stopped"`` (callback asked to stop).

    Raises:
        TaskError: the task cannot run this model.
        TrainingError: ``checkpoint_every`` without ``out_dir``; on ``resume``: a
            ``checkpoint.pt`` (pickle) in ``out_dir`` (refused, never loaded), or a checkpoint
            that is torn, corrupt, or written for another architecture or other settings.
    """
    cfg = cfg or spec.model.train
    task = task or get_task(cfg.task, cfg.task_options)
    out = Path(out_dir) if out_dir is not None else None
    if checkpoint_every is not None and out is None:
        raise TrainingError("checkpoint_every needs an output folder", hint="pass out_dir")
    tr = Trainer(spec, task, cfg, model)
    if resume and out is not None:
        tr.resume(out)
    start = tr.step
    status, reason = "ok", None

    bar = None
    if progress:
        from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

        bar = Progress(
            TextColumn("[bold]train"),
            BarColumn(),
            TextColumn("{task.completed}/{task.total}"),
            TextColumn("{task.fields[info]}"),
            TimeRemainingColumn(),
        )
        bar.start()
        bar_id = bar.add_task("train", total=cfg.steps, info="")
    try:
        tr.trained.train()
        if bar is not None and start:
            bar.update(bar_id, completed=start)
        for step in range(start, cfg.steps):
            if cfg.time_budget_s and tr.wall_s > cfg.time_budget_s:
                reason = f"time budget {cfg.time_budget_s:g}s reached at step {step}"
                break
            fail = tr.train_step(lr_at(step, cfg))
            if fail is not None:
                status, reason = "failed", fail
                break
            if bar is not None:
                bar.update(bar_id, advance=1, info=f"loss {tr.last_loss:.3f}")
            stop = False
            if (step + 1) % cfg.eval_every == 0 and step + 1 < cfg.steps:
                ev = {"step": step + 1, "train_loss": tr.last_loss, **tr.evaluate()}
                tr.history.append(ev)
                if callback is not None and callback(step + 1, ev):
                    status, reason = "stopped", f"stopped by callback at step {step + 1}"
                    stop = True
            if checkpoint_every and ((step + 1) % checkpoint_every == 0 or stop):
                assert out is not None
                tr.save(out)
            if stop:
                break
    finally:
        if bar is not None:
            bar.stop()
    if checkpoint_every and status == "ok" and out is not None:
        tr.save(out)
    metrics = _final_metrics(tr, status, reason)
    if out is not None:
        save_run(out, spec, tr.model, metrics, tr.extra)
    return TrainResult(metrics["status"], metrics, tr.model, tr.history)


def _final_metrics(tr: Trainer, status: str, reason: str | None) -> dict[str, Any]:
    """``metrics.json``'s content at the end of a run: status, steps, losses, held-out
    metrics (evaluated here unless the run failed), history and seed."""
    wall = tr.wall_s
    metrics: dict[str, Any] = {
        "status": status,
        "task": tr.task.name,
        "steps": tr.step,
        "train_loss": tr.last_loss,
        "wall_s": wall,
        "tokens_per_s": tr.tokens / wall if wall > 0 else 0.0,
    }
    if reason:
        metrics["reason"] = reason
    if status == "failed":
        metrics["failed_step"] = tr.step
    else:
        ev = tr.evaluate()
        metrics.update(ev)
        tr.history.append({"step": tr.step, "train_loss": tr.last_loss, **ev})
        metrics.update(tr.evaluate_granularities())
        if not all(math.isfinite(v) for v in ev.values() if isinstance(v, float)):
            metrics["status"] = "failed"
            metrics["reason"] = "evaluation produced a non-finite metric"
    metrics["metric"] = tr.task.metric
    if tr.init_report is not None:
        metrics["init"] = tr.init_report.to_dict()
    metrics["history"] = tr.history
    metrics["seed"] = tr.cfg.seed
    return metrics


def rung_steps(rungs: Sequence[int], cfg: TrainSection) -> list[tuple[int, int]]:
    """``(decay start, steps)`` of each rung of a ladder under the ``wsd`` schedule."""
    return [(decay_start(s, cfg), s) for s in rungs]


def check_ladder(rungs: Sequence[int], cfg: TrainSection) -> None:
    """Refuse a ladder whose rungs do not grow, or whose warm-up reaches into the first
    rung's decay (then a short rung would not be a prefix of a longer one).

    Raises:
        TrainingError: naming the rungs and what is wrong.
    """
    if not rungs or any(b <= a for a, b in zip(rungs, rungs[1:])) or rungs[0] < 1:
        raise TrainingError(
            f"ladder rungs must be step counts that grow, got {list(rungs)}",
            hint="e.g. rungs: [50, 200, 800]",
        )
    first = decay_start(rungs[0], cfg)
    if cfg.warmup_steps > first:
        raise TrainingError(
            f"warmup_steps {cfg.warmup_steps} reaches into the first rung's decay (it starts "
            f"at step {first} of {rungs[0]})",
            hint="use fewer warm-up steps or a longer first rung",
        )


def train_ladder(
    spec: Spec,
    task: Task,
    cfg: TrainSection,
    rungs: Sequence[int],
    *,
    until: int | None = None,
    out_dir: str | Path | None = None,
    model: CompiledModel | None = None,
    on_rung: Callable[[int, dict[str, Any]], None] | None = None,
    checkpoint_every: int | None = None,
    evaluate_last: bool = True,
) -> TrainResult:
    """Train under the ``wsd`` schedule and evaluate at every rung of a fidelity ladder up
    to rung ``until`` (default: the last), continuing from ``out_dir``'s checkpoint.

    One trunk run (warm-up, then the stable learning rate) goes on from rung to rung. At
    rung ``k`` (``rungs[k]`` steps) the trunk stops at that rung's decay start, a branch
    copies the state, decays the learning rate over the rung's last ``decay_fraction`` of
    steps and is evaluated on the held-out split; the trunk then goes on from where it was.
    So rung ``k``'s result is exactly that of an ordinary ``wsd`` run of ``rungs[k]`` steps
    (:func:`train` with ``steps = rungs[k]``, same seed), and reaching rung ``k + 1`` later
    costs only the steps between the rungs plus the new decay.

    With ``out_dir`` a checkpoint of the trunk is written at each rung's decay start (and
    every ``checkpoint_every`` steps) with the rungs done so far (``rungs`` in the manifest);
    a later call resumes from it — after a kill, or to promote the model to a higher rung —
    and repeats no rung. The returned model is the decayed one of the last rung run, and
    ``metrics`` holds ``rungs``: one dict per rung reached (``rung``, ``steps``,
    ``wall_s`` — the trunk's time so far plus the decay's — and the task's metrics).

    Args:
        rungs: steps of each rung, growing (:func:`check_ladder`); ``cfg.steps`` is ignored.
        on_rung: called with ``(k, record)`` after each rung evaluated in this call.
        evaluate_last: False: rung ``until`` is trained but not evaluated (its record has
            no metrics): for a caller that evaluates the model itself (e.g. quantized).

    Raises:
        TrainingError: bad rungs, or a checkpoint that cannot be resumed.
        TaskError: the task cannot run this model.
    """
    cfg = cfg.model_copy(update={"schedule": "wsd", "steps": int(rungs[-1])})
    check_ladder(rungs, cfg)
    until = len(rungs) - 1 if until is None else until
    out = Path(out_dir) if out_dir is not None else None
    tr = Trainer(spec, task, cfg, model)
    if out is not None:
        tr.resume(out)
    done: list[dict[str, Any]] = list(tr.state.get("rungs", []))
    status, reason = "ok", None
    tr.trained.train()
    for k, (start, steps) in enumerate(rung_steps(rungs, cfg)):
        if k > until:
            break
        redo = k < len(done)  # evaluated before this call
        if redo and k < until:
            continue
        if redo and tr.step != start:
            raise TrainingError(
                f"the checkpoint in '{out}' is at step {tr.step}, past rung {k}'s decay start "
                f"({start}): its decayed model cannot be made again",
                hint="continue to a higher rung, or start over in another folder",
            )
        while tr.step < start:
            fail = tr.train_step(lr_at(tr.step, cfg, steps))
            if fail is not None:
                status, reason = "failed", fail
                break
            if checkpoint_every and out is not None and tr.step % checkpoint_every == 0:
                tr.save(out)
        if status == "failed":
            break
        if out is not None and tr.step > 0 and not redo:
            tr.save(out)
        snap = tr.snapshot()
        while tr.step < steps:
            fail = tr.train_step(lr_at(tr.step, cfg, steps))
            if fail is not None:
                status, reason = "failed", fail
                break
        if status == "failed":
            break
        if redo:  # the model of a rung already evaluated (resumed after it): decayed again
            break
        ev = tr.evaluate() if evaluate_last or k < until else {}
        rec = {"rung": k, "steps": steps, "wall_s": tr.wall_s, "train_loss": tr.last_loss, **ev}
        done.append(rec)
        tr.history.append({"step": steps, "train_loss": tr.last_loss, **ev})
        if not all(math.isfinite(v) for v in ev.values() if isinstance(v, float)):
            status, reason = "failed", f"evaluation at rung {k} produced a non-finite metric"
            break
        if on_rung is not None:
            on_rung(k, rec)
        if k < until:  # the trunk goes on from before the decay
            tr.restore(snap)
        tr.state["rungs"] = done
        if out is not None:
            update_manifest(out, rungs=done)
    metrics: dict[str, Any] = {
        "status": status,
        "task": task.name,
        "steps": tr.step,
        "train_loss": tr.last_loss,
        "wall_s": tr.wall_s,
        "tokens_per_s": tr.tokens / tr.wall_s if tr.wall_s > 0 else 0.0,
        "metric": task.metric,
        "rungs": done,
        "history": tr.history,
        "seed": cfg.seed,
    }
    if reason:
        metrics["reason"] = reason
    if done and status == "ok":
        metrics.update({k: v for k, v in done[-1].items() if k not in ("rung", "wall_s")})
    return TrainResult(status, metrics, tr.model, tr.history)


def nested_granularities(model: torch.nn.Module) -> list[float]:
    """The granularities a model with MatFormer blocks trains jointly (every such block
    must list the same ones); empty for any other model.

    Raises:
        TrainingError: two MatFormer blocks list different granularities.
    """
    from archir.blocks.mlp import matformer_modules

    mods = matformer_modules(model)
    if not mods:
        return []
    first = mods[0].granularities
    for i, m in enumerate(mods[1:], 1):
        if m.granularities != first:
            raise TrainingError(
                f"matformer block {i} has granularities {m.granularities}, block 0 has "
                f"{first}: joint training needs the same granularities in every block",
                hint="give every matformer block the same granularities",
            )
    return list(first)


def seed_everything(seed: int) -> None:
    """Seed Python's ``random``, NumPy's global generator and torch (all devices)."""
    import random

    import numpy as np

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def save_run(
    out: Path,
    spec: Spec,
    model: torch.nn.Module,
    metrics: dict[str, Any],
    extra: torch.nn.Module | None = None,
) -> None:
    """Write ``spec.yaml``, ``model.safetensors`` (+ ``task_modules.safetensors`` when the
    task has its own modules) and ``metrics.json`` into ``out``, each atomically (temporary
    file, then rename) with the permissions of the user's umask.

    Raises:
        OSError: the folder cannot be written (the CLI checks ``--out`` before training).
    """
    from safetensors.torch import save_model

    out.mkdir(parents=True, exist_ok=True)
    write_text(out / "spec.yaml", spec.to_yaml())
    write_file(out / "model.safetensors", lambda tmp: save_model(model, tmp))
    if extra is not None:
        write_file(out / "task_modules.safetensors", lambda tmp: save_model(extra, tmp))
    write_text(out / "metrics.json", json.dumps(metrics, indent=2, default=float))


# -- checkpoints: safetensors + JSON, never pickle ----------------------------------------

#: the manifest of a checkpoint (written last); it names the tensors file it goes with
CHECKPOINT = "checkpoint.json"
#: the pickle checkpoint of earlier versions: refused on resume, never loaded
PICKLE_CHECKPOINT = "checkpoint.pt"
CHECKPOINT_FORMAT = "archir-checkpoint"
CHECKPOINT_VERSION = 1
_TENSORS_RE = re.compile(r"^checkpoint-([0-9]{1,12})\.safetensors$")
_MAX_MANIFEST_BYTES = 256 * 2**20
# training settings that may change between an interrupted run and its resumption
_FREE_SETTINGS = ("threads", "time_budget_s")
# JSON a checkpoint carries beyond the training state (the ladder's rung records)
_KEEP_STATE = ("rungs",)
_START_OVER = (
    "delete checkpoint.json and checkpoint-*.safetensors to start over, or use another --out"
)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _spec_hash(spec: Spec) -> str:
    from archir.hashing import canonical_hash

    return canonical_hash(spec)


def _settings(cfg: TrainSection) -> dict[str, Any]:
    d = cfg.model_dump(mode="json")
    out = {k: v for k, v in d.items() if k not in _FREE_SETTINGS}
    if out.get("init") is None:  # absent when unset: checkpoints of earlier versions resume
        out.pop("init", None)
    return out


def _pack(
    model: torch.nn.Module,
    extra: torch.nn.Module | None,
    opt: torch.optim.Optimizer,
    gen: torch.Generator,
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Every tensor of the training state under a flat name, and the rest (optimizer
    hyper-parameters, non-tensor optimizer state) as JSON-able values."""
    tensors: dict[str, torch.Tensor] = {}
    storages: set[int] = set()

    def put(key: str, t: torch.Tensor) -> None:
        t = t.detach().cpu()
        ptr = t.untyped_storage().data_ptr() if t.numel() else 0
        if ptr and ptr in storages:  # tied weights: safetensors stores no shared memory
            t = t.clone()
        storages.add(ptr)
        tensors[key] = t.contiguous()

    for k, v in model.state_dict().items():
        put(f"model.{k}", v)
    if extra is not None:
        for k, v in extra.state_dict().items():
            put(f"extra.{k}", v)
    sd = opt.state_dict()
    scalars: dict[str, dict[str, Any]] = {}
    for idx, st in sd["state"].items():
        for k, v in st.items():
            if isinstance(v, torch.Tensor):
                put(f"optim.{idx}.{k}", v)
            else:
                scalars.setdefault(str(idx), {})[k] = v
    put("rng.generator", gen.get_state())
    put("rng.torch", torch.get_rng_state())
    groups = [
        {k: list(v) if isinstance(v, tuple) else v for k, v in g.items()}
        for g in sd["param_groups"]
    ]
    return tensors, {"param_groups": groups, "optim_scalars": scalars}


def save_checkpoint(
    out: Path, packed: tuple[dict[str, torch.Tensor], dict[str, Any]], state: dict[str, Any]
) -> Path:
    """Write ``checkpoint-<step>.safetensors`` then the manifest ``checkpoint.json`` into
    ``out`` (both atomically), then remove tensors files of earlier checkpoints.

    Args:
        out: the run folder.
        packed: ``(tensors, optimizer JSON)`` as built from the model, task modules,
            optimizer and generator.
        state: JSON-able values; ``state["step"]`` is the step reached.

    Returns:
        The manifest's path.

    Raises:
        OSError: the folder cannot be written.
    """
    from safetensors.torch import save_file

    tensors, optim = packed
    out.mkdir(parents=True, exist_ok=True)
    name = f"checkpoint-{int(state['step'])}.safetensors"
    write_file(out / name, lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))
    manifest = {
        "format": CHECKPOINT_FORMAT,
        "version": CHECKPOINT_VERSION,
        "tensors": name,
        "sha256": _sha256(out / name),
        **state,
        "optimizer": optim,
    }
    write_text(out / CHECKPOINT, json.dumps(manifest, indent=1))
    for old in out.iterdir():  # earlier checkpoints' tensors (archir's own file names only)
        if old.name != name and _TENSORS_RE.match(old.name) and not old.is_dir():
            old.unlink(missing_ok=True)
    return out / CHECKPOINT


def update_manifest(out: Path, **state: Any) -> None:
    """Add or replace JSON values in ``out``'s checkpoint manifest (same tensors file),
    atomically.

    Raises:
        TrainingError: there is no readable manifest.
    """
    man = out / CHECKPOINT
    text = _read_small(man)
    try:
        doc = json.loads(text)
    except ValueError as exc:
        raise _bad(man, f"is not valid JSON (torn or corrupt: {exc})") from None
    doc.update(state)
    write_text(man, json.dumps(doc, indent=1))


def _bad(path: Path, why: str) -> TrainingError:
    return TrainingError(f"checkpoint '{path}' {why}", hint=_START_OVER)


def refuse_pickle_checkpoint(out: Path) -> None:
    """Refuse to resume in a folder holding ``checkpoint.pt`` (never opened).

    Raises:
        TrainingError: ``out/checkpoint.pt`` exists: a pickle, which archir never loads
            (unpickling can run code).
    """
    pt = out / PICKLE_CHECKPOINT
    if pt.exists() or pt.is_symlink():
        raise TrainingError(
            f"'{pt}' is a pickle checkpoint: archir does not load pickles (loading one can "
            "run code), so it was refused and not read",
            hint="delete it to start over; archir writes checkpoint.json + "
            "checkpoint-<step>.safetensors",
        )


def load_checkpoint(out: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]] | None:
    """The checkpoint in ``out``: ``(manifest, tensors)``, or None when there is none.

    Raises:
        TrainingError: ``out/checkpoint.pt`` exists (a pickle: archir never loads one, it
            could run code); the manifest or its tensors file is missing, not a regular
            file, torn, corrupt or does not match (SHA-256).
    """
    from safetensors.torch import load_file

    refuse_pickle_checkpoint(out)
    man = out / CHECKPOINT
    if not (man.exists() or man.is_symlink()):
        return None
    text = _read_small(man)
    try:
        state = json.loads(text)
    except ValueError as exc:
        raise _bad(man, f"is not valid JSON (torn or corrupt: {exc})") from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise _bad(man, "is not an archir checkpoint manifest")
    if state.get("version") != CHECKPOINT_VERSION:
        raise _bad(man, f"has version {state.get('version')!r}, expected {CHECKPOINT_VERSION}")
    name = state.get("tensors")
    if not isinstance(name, str) or not _TENSORS_RE.match(name):
        raise _bad(man, f"names a tensors file {name!r} that archir does not write")
    tpath = out / name
    try:
        st = os.stat(tpath)
    except OSError:
        raise _bad(man, f"names '{name}', which is missing") from None
    if not stat.S_ISREG(st.st_mode):
        raise _bad(man, f"names '{name}', which is not a regular file")
    if _sha256(tpath) != state.get("sha256"):
        raise _bad(tpath, "does not match checkpoint.json (torn or corrupt: SHA-256 differs)")
    try:
        tensors = load_file(str(tpath))
    except Exception as exc:  # noqa: BLE001 - safetensors raises several types
        raise _bad(tpath, f"is not a readable safetensors file: {str(exc)[:200]}") from None
    kinds = {
        "step": int,
        "tokens": int,
        "wall_s": (int, float),
        "history": list,
        "train_loss": (int, float),
        "spec_hash": str,
        "train": dict,
        "optimizer": dict,
    }
    for key, kind in kinds.items():
        v = state.get(key)
        if not isinstance(v, kind) or isinstance(v, bool):  # type: ignore[arg-type]
            raise _bad(man, f"has no valid '{key}'")
    if state["step"] < 0 or state["tokens"] < 0:
        raise _bad(man, "has a negative step or token count")
    return state, tensors


def _read_small(path: Path) -> str:
    try:
        st = os.stat(path)
        if not stat.S_ISREG(st.st_mode):
            raise _bad(path, "is not a regular file")
        if st.st_size > _MAX_MANIFEST_BYTES:
            raise _bad(path, f"is {st.st_size:,} bytes, too large for a manifest")
        return path.read_text(encoding="utf-8")
    except OSError as exc:
        raise _bad(path, f"cannot be read: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise _bad(path, "is not valid JSON (torn or corrupt: not UTF-8)") from None


def _check_resumable(man: Path, state: dict[str, Any], spec: Spec, cfg: TrainSection) -> None:
    """Refuse to continue a checkpoint of another architecture or other settings (the
    result would not equal an uninterrupted run's)."""
    if state["spec_hash"] != _spec_hash(spec):
        raise TrainingError(
            f"checkpoint '{man}' was written for another architecture",
            hint="resume with the spec it was trained with, or use another --out",
        )
    now = _settings(cfg)
    # settings added since the checkpoint was written count as their defaults
    then = {
        k: f.get_default(call_default_factory=True)
        for k, f in TrainSection.model_fields.items()
        if k in now
    }
    then.update(state["train"])
    for k in sorted(set(now) | set(then)):
        if now.get(k) != then.get(k):
            raise TrainingError(
                f"checkpoint '{man}' was written with {k}={then.get(k)!r}, "
                f"this run has {k}={now.get(k)!r}",
                hint="resume with the same training settings, or use another --out",
            )


def _restore(
    man: Path,
    state: dict[str, Any],
    tensors: dict[str, torch.Tensor],
    model: torch.nn.Module,
    extra: torch.nn.Module | None,
    opt: torch.optim.Optimizer,
    gen: torch.Generator,
) -> None:
    """Load a checkpoint's tensors and optimizer state into the training objects.

    Raises:
        TrainingError: the tensors do not fit the model, optimizer or generator.
    """

    def part(prefix: str) -> dict[str, torch.Tensor]:
        n = len(prefix)
        return {k[n:]: v for k, v in tensors.items() if k.startswith(prefix)}

    try:
        model.load_state_dict(part("model."))
        if extra is not None:
            extra.load_state_dict(part("extra."))
        optim = state["optimizer"]
        per_param: dict[int, dict[str, Any]] = {}
        for k, v in part("optim.").items():
            idx, _, key = k.partition(".")
            per_param.setdefault(int(idx), {})[key] = v
        for idx, scalars in optim.get("optim_scalars", {}).items():
            per_param.setdefault(int(idx), {}).update(scalars)
        groups = [
            {k: tuple(v) if k == "betas" else v for k, v in g.items()}
            for g in optim["param_groups"]
        ]
        opt.load_state_dict({"state": per_param, "param_groups": groups})
        gen.set_state(tensors["rng.generator"])
        torch.set_rng_state(tensors["rng.torch"])
    except (RuntimeError, ValueError, KeyError, TypeError, AttributeError) as exc:
        first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        raise TrainingError(
            f"checkpoint '{man}' does not fit this model and optimizer: {first}",
            hint=_START_OVER,
        ) from None
