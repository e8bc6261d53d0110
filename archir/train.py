"""The trainer: AdamW, linear warm-up then cosine decay, gradient clipping, held-out eval.

``train(spec, task, out_dir)`` trains a compiled spec, evaluates on held-out data, stops at
once when the loss becomes NaN/inf (reported as ``status: failed`` with the step and reason),
and writes ``model.safetensors``, ``spec.yaml`` and ``metrics.json`` into ``out_dir``.
The same spec, task and seed give the same metrics.
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


def make_optimizer(model: torch.nn.Module, cfg: TrainSection) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only (not on norms, biases, gains)."""
    decay, no_decay = [], []
    seen: set[int] = set()
    for p in model.parameters():
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
    torch.manual_seed(cfg.seed)
    model = model or compile_spec(spec, seed=cfg.seed)
    opt = make_optimizer(model, cfg)
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    seq_len = min(cfg.seq_len, spec.model.model.max_seq_len)
    history: list[dict[str, float]] = []
    status, reason = "ok", None
    t0 = time.perf_counter()
    tokens = 0
    step = 0
    last_loss = float("nan")
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
        model.train()
        for step in range(cfg.steps):
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
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            opt.step()
            tokens += y.numel()
            last_loss = loss.item()
            if bar is not None:
                bar.update(bar_id, advance=1, info=f"loss {last_loss:.3f}")
            if (step + 1) % cfg.eval_every == 0 and step + 1 < cfg.steps:
                model.eval()
                ev = task.evaluate(model, cfg.batch_size, seq_len, cfg.eval_batches)
                model.train()
                ev = {"step": step + 1, "train_loss": last_loss, **ev}
                history.append(ev)
                if callback is not None and callback(step + 1, ev):
                    status, reason = "stopped", f"stopped by callback at step {step + 1}"
                    break
        else:
            step = cfg.steps
    finally:
        if bar is not None:
            bar.stop()
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
    if status != "failed":
        model.eval()
        ev = task.evaluate(model, cfg.batch_size, seq_len, cfg.eval_batches)
        metrics.update(ev)
        history.append({"step": step, "train_loss": last_loss, **ev})
        if not all(math.isfinite(v) for v in ev.values() if isinstance(v, float)):
            metrics["status"] = status = "failed"
            metrics["reason"] = "evaluation produced a non-finite metric"
    metrics["metric"] = task.metric
    metrics["history"] = history
    if out_dir is not None:
        save_run(Path(out_dir), spec, model, metrics)
    return TrainResult(status, metrics, model, history)


def save_run(out: Path, spec: Spec, model: torch.nn.Module, metrics: dict[str, Any]) -> None:
    """Write ``spec.yaml``, ``model.safetensors`` and ``metrics.json`` into ``out``."""
    from safetensors.torch import save_model

    out.mkdir(parents=True, exist_ok=True)
    spec.save(out / "spec.yaml")
    save_model(model, str(out / "model.safetensors"))
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2, default=float))
