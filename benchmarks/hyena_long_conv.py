"""Hyena's long convolution in onnxruntime: the direct ``Conv``, the factorised DFT and
torch's FFT, side by side (issue 14, goal 6: onnxruntime never slower than eager torch).

One causal long convolution ``y[t] = Σ_{s<=t} h[t-s]·z[s]`` over ``--channels`` channels
(128: d_model 128, order 2, as one layer of ``benchmarks/onnx_vs_torch.py``'s Hyena model),
batch 1, 1 thread. Forms of the same function:

* ``direct``: :func:`archir.blocks.conv.causal_conv_direct`, a depthwise ``Conv`` with a
  length-T kernel (O(T²)) — every exported Hyena before this change, and the exported form
  up to :data:`~archir.blocks.conv.DIRECT_MAX_LEN` positions since;
* ``dft N1-M1``: :func:`archir.blocks.conv.causal_conv_dft` with ``n1``, ``m1`` (two
  stages, or three when ``m1 > 1``), one column per ``--forms`` entry (default: the forms
  of :data:`~archir.blocks.conv.DFT_FORMS`, the exported forms past ``DIRECT_MAX_LEN``);
  they run channels last (``[1, T, channels]``), as in the exported model, and are fed
  that layout;
* ``torch fft``: :func:`archir.blocks.conv.causal_conv_fft` in eager torch (what the
  PyTorch model runs).

The graphs are exported once with a dynamic length (dynamo, opset 20) and timed by
:func:`exporters.latency.harness.measure_interleaved` (fastest call, all of them interleaved
round by round); the largest deviation from the FFT is printed too.

Run: ``.venv/bin/python benchmarks/hyena_long_conv.py [--seqs 64 128 … 4096] [--forms 64-1
64-8 32-8]`` (about 3 min on a quiet 2-core machine).
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import torch

from archir.blocks.conv import DFT_FORMS, causal_conv_dft, causal_conv_direct, causal_conv_fft
from exporters.latency.harness import measure_interleaved
from exporters.parity import make_session


class _Form(torch.nn.Module):
    def __init__(self, n1: int, m1: int) -> None:
        super().__init__()
        self.n1, self.m1 = n1, m1

    def forward(self, z: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        if self.n1:
            return causal_conv_dft(z, h, self.n1, self.m1)
        return causal_conv_direct(z, h)


def _export(n1: int, m1: int, channels: int, path: Path) -> None:
    """``n1`` 0: the direct form (channels first); else the DFT ``(n1, m1)``, channels last."""
    T = torch.export.Dim("T", min=2, max=8192)
    last = n1 > 0
    torch.onnx.export(
        _Form(n1, m1),
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
    ap.add_argument("--seqs", type=int, nargs="+", default=[64, 128, 256, 512, 1024, 2048, 4096])
    ap.add_argument("--channels", type=int, default=128)
    ap.add_argument(
        "--forms",
        nargs="+",
        default=[f"{n1}-{m1}" for _, n1, m1 in DFT_FORMS],
        help="DFT forms N1-M1 (default: archir.blocks.conv.DFT_FORMS)",
    )
    args = ap.parse_args()
    torch.set_num_threads(1)
    C = args.channels
    forms = {f: tuple(int(v) for v in f.split("-")) for f in args.forms}
    with tempfile.TemporaryDirectory() as tmp:
        paths = {"direct": Path(tmp) / "direct.onnx"}
        _export(0, 1, C, paths["direct"])
        for f, (n1, m1) in forms.items():
            paths[f] = Path(tmp) / f"dft-{f}.onnx"
            _export(n1, m1, C, paths[f])
        sessions = {k: make_session(str(p), threads=1) for k, p in paths.items()}
        print(
            "| T | direct ms | "
            + " | ".join(f"dft {f} ms" for f in forms)
            + " | torch fft ms | direct / fastest dft | fastest dft / torch | dft rel. error |"
        )
        print("|---:|---:|" + "---:|" * len(forms) + "---:|---:|---:|---:|")
        gen = torch.Generator().manual_seed(0)
        for T in args.seqs:
            z = torch.randn(1, C, T, generator=gen)
            h = torch.randn(C, T, generator=gen) / T**0.5
            last = {"z": z.transpose(1, 2).numpy().copy(), "h": h.T.numpy().copy()}
            feeds = {k: last for k in forms} | {"direct": {"z": z.numpy(), "h": h.numpy()}}
            ref = causal_conv_fft(z, h).numpy()
            err = max(
                float(np.abs(sessions[f].run(None, last)[0].transpose(0, 2, 1) - ref).max())
                for f in forms
            ) / float(np.abs(ref).max())
            calls = {k: (lambda s=s, f=feeds[k]: s.run(None, f)) for k, s in sessions.items()}
            calls["torch"] = lambda z=z, h=h: causal_conv_fft(z, h)
            with torch.inference_mode():
                m = measure_interleaved(calls, rounds=10, window_s=0.05, min_runs=3)
            d, t = m["direct"].min_ms, m["torch"].min_ms
            best = min(m[f].min_ms for f in forms)
            cols = " | ".join(f"{m[f].min_ms:.3f}" for f in forms)
            print(
                f"| {T} | {d:.3f} | {cols} | {t:.3f} | {d / best:.2f}x | {best / t:.2f}x "
                f"| {err:.1e} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
