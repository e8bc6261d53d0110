import os
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
ZOO = ROOT / "specs" / "zoo"

torch.set_num_threads(1)
os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture
def zoo() -> Path:
    return ZOO
