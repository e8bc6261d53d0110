"""The trainer: AdamW, linear warm-up then cosine decay, gradient clipping, held-out eval.

``train(spec, task, out_dir)`` trains a compiled spec, evaluates on held-out data, stops at
once when the loss becomes NaN/inf (reported as ``status: failed`` with the step and reason),
and writes ``model.safetensors``, ``spec.yaml`` and ``metrics.json`` into ``out_dir``.
The same spec, task and seed give the same metrics. With ``checkpoint_every`` it also writes
``checkpoint.pt`` (model, task modules, optimizer, data-generator and RNG states, history)
every that many steps and when it stops; ``resume=True`` continues from it, giving the same
metrics as an uninterrupted run. Trainable modules a task adds (``Task.extra_modules``, e.g.
the MAD compression decoder) are optimized and checkpointed with the model.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from archir.compiler import CompiledModel
from archir.compiler import compile as compile_spec
from archir.errors import TrainingError
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


def lr_at(step: int, cfg: TrainSection) -> float:
    """Learning rate at ``step`` (0-based): linear warm-up, then cosine to ``min_lr``."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    span = max(1, cfg.steps - cfg.warmup_steps)
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
        checkpoint_every: write ``out_dir/checkpoint.pt`` every this many steps and when
            training stops (needs ``out_dir``).
        resume: continue from ``out_dir/checkpoint.pt`` when it exists (same spec and
            configuration expected); the result equals an uninterrupted run's.

    Returns:
        TrainResult with ``status`` ``"ok"`` or ``"failed"`` (non-finite loss) or
        ``"stopped"`` (callback asked to stop).

    Raises:
        TaskError: the task cannot run this model.
    """
    cfg = cfg or spec.model.train
    task = task or get_task(cfg.task, cfg.task_options)
    task.check_model(spec.model.model)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    seed_everything(cfg.seed)
    model = model or compile_spec(spec, seed=cfg.seed)
    extra = task.extra_modules(model)
    trained = torch.nn.ModuleList([model] + ([extra] if extra is not None else []))
    opt = make_optimizer(model, cfg, extra)
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    seq_len = min(cfg.seq_len, spec.model.model.max_seq_len)
    history: list[dict[str, float]] = []
    status, reason = "ok", None
    tokens = 0
    start = 0
    elapsed = 0.0
    last_loss = float("nan")
    ckpt = Path(out_dir) / CHECKPOINT if out_dir is not None else None
    if checkpoint_every is not None and ckpt is None:
        raise TrainingError("checkpoint_every needs an output folder", hint="pass out_dir")
    if resume and ckpt is not None and ckpt.is_file():
        state = torch.load(ckpt, map_location="cpu", weights_only=False)
        model.load_state_dict(state["model"])
        if extra is not None and state.get("extra") is not None:
            extra.load_state_dict(state["extra"])
        opt.load_state_dict(state["optimizer"])
        gen.set_state(state["generator"])
        torch.set_rng_state(state["torch_rng"])
        start, tokens, elapsed = state["step"], state["tokens"], state["wall_s"]
        history, last_loss = state["history"], state["train_loss"]
    step = start
    t0 = time.perf_counter() - elapsed

    def save_checkpoint(at: int) -> None:
        assert ckpt is not None
        ckpt.parent.mkdir(parents=True, exist_ok=True)
        tmp = ckpt.with_suffix(".tmp")
        torch.save(
            {
                "step": at,
                "model": model.state_dict(),
                "extra": extra.state_dict() if extra is not None else None,
                "optimizer": opt.state_dict(),
                "generator": gen.get_state(),
                "torch_rng": torch.get_rng_state(),
                "tokens": tokens,
                "wall_s": time.perf_counter() - t0,
                "history": history,
                "train_loss": last_loss,
            },
            tmp,
        )
        tmp.replace(ckpt)

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
        trained.train()
        if bar is not None and start:
            bar.update(bar_id, completed=start)
        for step in range(start, cfg.steps):
            if cfg.time_budget_s and time.perf_counter() - t0 > cfg.time_budget_s:
                status = "ok"
                reason = f"time budget {cfg.time_budget_s:g}s reached at step {step}"
                break
            for g in opt.param_groups:
                g["lr"] = lr_at(step, cfg)
            x, y = task.train_batch(cfg.batch_size, seq_len, gen)
            loss = task.loss(model, x, y)
            aux = model.aux_loss() if hasattr(model, "aux_loss") else None
            total = loss + aux if aux is not None else loss
            if not torch.isfinite(total):
                status, reason = "failed", f"loss became {total.item()} at step {step}"
                break
            opt.zero_grad(set_to_none=True)
            total.backward()
            torch.nn.utils.clip_grad_norm_(trained.parameters(), cfg.grad_clip)
            opt.step()
            tokens += y.numel()
            last_loss = loss.item()
            if bar is not None:
                bar.update(bar_id, advance=1, info=f"loss {last_loss:.3f}")
            stop = False
            if (step + 1) % cfg.eval_every == 0 and step + 1 < cfg.steps:
                trained.eval()
                ev = task.evaluate(model, cfg.batch_size, seq_len, cfg.eval_batches)
                trained.train()
                ev = {"step": step + 1, "train_loss": last_loss, **ev}
                history.append(ev)
                if callback is not None and callback(step + 1, ev):
                    status, reason = "stopped", f"stopped by callback at step {step + 1}"
                    stop = True
            if checkpoint_every and ((step + 1) % checkpoint_every == 0 or stop):
                save_checkpoint(step + 1)
            if stop:
                step += 1
                break
        else:
            step = cfg.steps
    finally:
        if bar is not None:
            bar.stop()
    if checkpoint_every and status == "ok" and ckpt is not None:
        save_checkpoint(step)
    wall = time.perf_counter() - t0
    metrics: dict[str, Any] = {
        "status": status,
        "task": task.name,
        "steps": step,
        "train_loss": last_loss,
        "wall_s": wall,
        "tokens_per_s": tokens / wall if wall > 0 else 0.0,
    }
    if reason:
        metrics["reason"] = reason
    if status == "failed":
        metrics["failed_step"] = step
    if status != "failed":
        trained.eval()
        ev = task.evaluate(model, cfg.batch_size, seq_len, cfg.eval_batches)
        metrics.update(ev)
        history.append({"step": step, "train_loss": last_loss, **ev})
        if not all(math.isfinite(v) for v in ev.values() if isinstance(v, float)):
            metrics["status"] = status = "failed"
            metrics["reason"] = "evaluation produced a non-finite metric"
    metrics["metric"] = task.metric
    metrics["history"] = history
    metrics["seed"] = cfg.seed
    if out_dir is not None:
        save_run(Path(out_dir), spec, model, metrics, extra)
    return TrainResult(status, metrics, model, history)


CHECKPOINT = "checkpoint.pt"


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
    task has its own modules) and ``metrics.json`` into ``out``."""
    from safetensors.torch import save_model

    out.mkdir(parents=True, exist_ok=True)
    spec.save(out / "spec.yaml")
    save_model(model, str(out / "model.safetensors"))
    if extra is not None:
        save_model(extra, str(out / "task_modules.safetensors"))
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2, default=float))
