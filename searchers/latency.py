"""Measured CPU latency of a compiled model (torch eager).

``measure_latency_ms(model, ...)``: fixed intra-op threads, ``warmup`` untimed runs, then
the median wall time of ``repeats`` forward passes of one ``[batch, seq_len]`` input, in
milliseconds. The median resists the odd slow run caused by other processes on the machine.
(onnxruntime measurement and a calibrated predictor belong to the exporters' latency work.)
"""

from __future__ import annotations

import statistics
import time
from typing import Any

import torch


def example_input(spec_model: Any, batch: int, seq_len: int) -> torch.Tensor:
    """A deterministic input for a concrete spec: tokens ``[batch, seq]`` (int64) or images
    ``[batch, C, H, W]`` (float32)."""
    m = spec_model.model
    gen = torch.Generator().manual_seed(0)
    if m.task == "image_classification":
        return torch.randn(batch, m.channels, m.image_size, m.image_size, generator=gen)
    vocab = max(1, m.vocab_size)
    return torch.randint(0, vocab, (batch, min(seq_len, m.max_seq_len)), generator=gen)


@torch.no_grad()
def measure_latency_ms(
    model: torch.nn.Module,
    x: torch.Tensor,
    *,
    threads: int = 1,
    warmup: int = 3,
    repeats: int = 10,
) -> float:
    """Median forward latency of ``model(x)`` on CPU in milliseconds.

    Args:
        model: any module; it is put in eval mode.
        x: the input (e.g. tokens ``[1, seq_len]``).
        threads: torch intra-op threads during the measurement (restored afterwards).
        warmup: untimed runs first (allocator, caches).
        repeats: timed runs; the median is returned.
    """
    old = torch.get_num_threads()
    was_training = model.training
    torch.set_num_threads(threads)
    model.eval()
    try:
        for _ in range(warmup):
            model(x)
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            model(x)
            times.append((time.perf_counter() - t0) * 1e3)
    finally:
        torch.set_num_threads(old)
        model.train(was_training)
    return float(statistics.median(times))
