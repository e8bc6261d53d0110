import torch

import archir
from tests.conftest import ZOO


def test_transformer_compiles_and_counts_params():
    spec = archir.load_spec(ZOO / "transformer.yaml")
    model = archir.compile(spec)
    report = archir.analyze(spec)
    assert report.params == sum(p.numel() for p in model.parameters())
    out = model(torch.randint(0, 256, (2, 9)))
    assert out.shape == (2, 9, 256)
