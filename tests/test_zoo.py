"""Every zoo spec validates, compiles, counts its parameters exactly and learns.

Training here is a smoke test of the whole path (task batches -> compiled model -> loss ->
AdamW): a few steps on one fixed batch of the spec's own task must lower the loss on that
batch. Tiny batch and sequence, one thread.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import archir
from archir.cli import main
from archir.spec import load_spec
from archir.tasks.base import get_task
from tests.conftest import ZOO

ZOO_SPECS = sorted(ZOO.glob("*.yaml"))
REQUIRED = {
    "transformer",
    "hybrid",
    "shared-transformer",
    "post-norm-transformer",
    "parallel-transformer",
    "macaron-transformer",
    "denseformer",
}


def test_zoo_has_the_core_specs() -> None:
    assert REQUIRED <= {p.stem for p in ZOO_SPECS}


def test_zoo_validates(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["validate", *map(str, ZOO_SPECS)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert len(out) == len(ZOO_SPECS) and all(line.startswith("ok: ") for line in out)


@pytest.mark.parametrize("path", ZOO_SPECS, ids=lambda p: p.stem)
def test_zoo_spec_trains(path: Path) -> None:
    spec = load_spec(path)
    assert spec.is_concrete and spec.name == path.stem
    cfg = spec.model.train
    task = get_task(cfg.task, cfg.task_options)
    task.check_model(spec.model.model)
    model = archir.compile(spec, seed=0)
    assert archir.analyze(spec).params == sum(p.numel() for p in model.parameters())
    seq = min(32, spec.model.model.max_seq_len)
    x, y = task.train_batch(4, seq, torch.Generator().manual_seed(0))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    losses = []
    for _ in range(8):
        loss = task.loss(model, x, y)
        aux = model.aux_loss()
        total = loss + aux if aux is not None else loss
        assert torch.isfinite(total)
        opt.zero_grad(set_to_none=True)
        total.backward()
        opt.step()
        losses.append(loss.item())
    model.eval()
    with torch.no_grad():
        final = task.loss(model, x, y).item()
    assert final < losses[0] * 0.9, (losses, final)


@pytest.mark.parametrize("name", ["shared-transformer", "hybrid"])
def test_new_zoo_specs_shape(name: str) -> None:
    spec = load_spec(ZOO / f"{name}.yaml")
    graph = archir.compile(spec).graph
    kinds = [n.kind for n in graph if n.op == "block"]
    if name == "hybrid":
        assert kinds.count("mamba") == 4 and kinds.count("attention") == 2
    else:
        shared = [n for n in graph if n.weights_of is not None]
        assert len(shared) == 10  # 5 repeats reuse layer 0's two blocks
