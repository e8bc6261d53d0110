"""Hyena's long convolution in onnxruntime: the direct ``Conv``, the factorised DFT and
torch's FFT, side by side (issue 14, goal 6: onnxruntime never slower than eager torch).

One causal long convolution ``y[t] = Σ_{s<=t} h[t-s]·z[s]`` over ``--channels`` channels
(128: d_model 128, order 2, as one layer of ``benchmarks/onnx_vs_torch.py``'s Hyena model),
batch 1, 1 thread. Three forms of the same function:

* ``direct``: :func:`archir.blocks.conv.causal_conv_direct`, a depthwise ``Conv`` with a
  length-T kernel (O(T²)) — every exported Hyena before this change, and the exported form
  up to :data:`~archir.blocks.conv.DIRECT_MAX_LEN` positions since;
* ``dft``: :func:`archir.blocks.conv.causal_conv_dft` (``n1`` = ``--n1``, default
  :data:`~archir.blocks.conv.DFT_N1`), the exported form past ``DIRECT_MAX_LEN``; it runs
  channels last (``[1, T, channels]``), as in the exported model, and is fed that layout;
* ``torch fft``: :func:`archir.blocks.conv.causal_conv_fft` in eager torch (what the
  PyTorch model runs).

Both graphs are exported once with a dynamic length (dynamo, opset 20) and timed by
:func:`exporters.latency.harness.measure_interleaved` (fastest call, the three interleaved
round by round); the deviation from the FFT is printed too.

Run: ``.venv/bin/python benchmarks/hyena_long_conv.py [--seqs 64 128 256 512 1024 4096]``
(about 2 min on a quiet 2-core machine).
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import torch

from archir.blocks.conv import DFT_N1, causal_conv_dft, causal_conv_direct, causal_conv_fft
from exporters.latency.harness import measure_interleaved
from exporters.parity import make_session


class _Form(torch.nn.Module):
    def __init__(self, fn, n1: int) -> None:  # type: ignore[no-untyped-def]
        super().__init__()
        self.fn, self.n1 = fn, n1

    def forward(self, z: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        if self.fn is causal_conv_dft:
            return causal_conv_dft(z, h, self.n1)
        return causal_conv_direct(z, h)


def _export(fn, n1: int, channels: int, path: Path) -> None:  # type: ignore[no-untyped-def]
    T = torch.export.Dim("T", min=2, max=8192)
    last = fn is causal_conv_dft  # channels last
    torch.onnx.export(
        _Form(fn, n1),
        (torch.randn(1, 300, channels), torch.randn(300, channels))
        if last
        else (torch.randn(1, channels, 300), torch.randn(channels, 300)),
        str(path),
        input_names=["z", "h"],
        dynamic_shapes={"z": {1: T}, "h": {0: T}} if last else {"z": {2: T}, "h": {1: T}},
        opset_version=20,
        dynamo=True,
        verbose=False,
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seqs", type=int, nargs="+", default=[64, 128, 256, 512, 1024, 4096])
    ap.add_argument("--channels", type=int, default=128)
    ap.add_argument("--n1", type=int, default=DFT_N1)
    args = ap.parse_args()
    torch.set_num_threads(1)
    C = args.channels
    with tempfile.TemporaryDirectory() as tmp:
        paths = {"direct": Path(tmp) / "direct.onnx", "dft": Path(tmp) / "dft.onnx"}
        _export(causal_conv_direct, args.n1, C, paths["direct"])
        _export(causal_conv_dft, args.n1, C, paths["dft"])
        sessions = {k: make_session(str(p), threads=1) for k, p in paths.items()}
        print(
            f"| T | direct ms | dft ms (n1 {args.n1}) | torch fft ms | direct/dft | dft/torch "
            "| dft rel. error |"
        )
        print("|---:|---:|---:|---:|---:|---:|---:|")
        gen = torch.Generator().manual_seed(0)
        for T in args.seqs:
            z = torch.randn(1, C, T, generator=gen)
            h = torch.randn(C, T, generator=gen) / T**0.5
            feeds = {
                "direct": {"z": z.numpy(), "h": h.numpy()},
                "dft": {"z": z.transpose(1, 2).numpy().copy(), "h": h.T.numpy().copy()},
            }
            ref = causal_conv_fft(z, h).numpy()
            got = sessions["dft"].run(None, feeds["dft"])[0].transpose(0, 2, 1)
            err = float(np.abs(got - ref).max() / np.abs(ref).max())
            calls = {k: (lambda s=s, f=feeds[k]: s.run(None, f)) for k, s in sessions.items()}
            calls["torch"] = lambda z=z, h=h: causal_conv_fft(z, h)
            with torch.inference_mode():
                m = measure_interleaved(calls, rounds=10, window_s=0.05, min_runs=3)
            d, f, t = (m[k].min_ms for k in ("direct", "dft", "torch"))
            print(
                f"| {T} | {d:.3f} | {f:.3f} | {t:.3f} | {d / f:.2f}x | {f / t:.2f}x | {err:.1e} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
