"""Helpers shared by the per-kind block tests (``tests/test_blocks_*.py``)."""

from __future__ import annotations

from typing import Any

import pytest
import torch

import archir
from archir.errors import ArchirError
from archir.spec import spec_from_dict


def assert_located_param_error(
    kind: str, params: dict[str, Any], field: str, message: str, d_model: int
) -> None:
    """Compiling a one-block language model whose block is ``kind`` with ``params`` raises an
    archir error matching ``message``, located at that block's ``field``."""
    data = {
        "archir": 1,
        "name": "bad",
        "model": {
            "vocab_size": 64,
            "d_model": d_model,
            "max_seq_len": 64,
            "embed": {"kind": "token_embedding"},
            "layers": [{"repeat": 1, "blocks": [{"kind": kind, **params}]}],
            "head": {"kind": "lm_head"},
        },
    }
    with pytest.raises(ArchirError, match=message) as e:
        archir.compile(spec_from_dict(data))
    assert f"model.layers.0.blocks.0.{field}" in str(e.value)


def run_steps(m: Any, x: torch.Tensor) -> torch.Tensor:
    """A token mixer's ``step`` over ``x [B, T, d]`` from its zero state -> ``[B, T, d]``."""
    state = m.init_state(x.shape[0], dtype=x.dtype)
    ys = []
    for t in range(x.shape[1]):
        y, state = m.step(x[:, t], state)
        ys.append(y)
    return torch.stack(ys, 1)
