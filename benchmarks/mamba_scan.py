"""Mamba's selective scan without a clamp (issue 16, part 1): exactness and speed, side by side.

For each sequence length, one Mamba block (d_model 128, d_inner 256, d_state 16, batch 8,
1 thread) is run forward + backward in three settings, interleaved, best of ``--repeats``:

* ``weak``: Δ·A ≥ −4 everywhere (a freshly initialized model): archir's fast form;
* ``strong``: Δ·A down to about −90 (``dt_proj.bias`` 2, ``A_log`` + 1, as trained
  checkpoints reach): archir's stable form;
* ``hf``: the same block as transformers' ``MambaMixer`` pure-PyTorch path (its sequential
  loop; no CUDA kernels here), on the strong weights, when transformers is installed.

``--carry-matrix`` adds both settings again with the chunk carry through the quadratic
``carry_matrix`` (the form before the chunk recurrence ``carry_in`` / ``carry_back``, and
still the form under graph capture), interleaved run by run, and prints each column's cost
growth from the first length to the last (issue 16 asks ≤ 4.5× from 256 to 1,024).

Exactness: the strong block's output against the step-by-step recurrence in fp64
(relative max error), fp32.

Run: ``.venv/bin/python benchmarks/mamba_scan.py`` (about 2 min).
"""

from __future__ import annotations

import argparse
import contextlib
import time
from collections.abc import Iterator

import torch

import archir
from archir.spec import spec_from_dict


def block(strong: bool) -> torch.nn.Module:
    spec = spec_from_dict(
        {
            "archir": 1,
            "name": "m",
            "model": {
                "vocab_size": 256,
                "d_model": 128,
                "max_seq_len": 4096,
                "embed": {"kind": "token_embedding"},
                "layers": [{"blocks": [{"kind": "mamba", "d_state": 16, "expansion": 2}]}],
                "head": {"kind": "lm_head"},
            },
        }
    )
    fn = archir.compile(spec, seed=0).blocks[0].fn
    if strong:
        with torch.no_grad():
            fn.A_log.add_(1.0)
            fn.dt_proj.bias.fill_(2.0)
    return fn


def hf_mixer(fn: torch.nn.Module) -> torch.nn.Module | None:
    try:
        import transformers
    except ImportError:
        return None
    cfg = transformers.MambaConfig(hidden_size=128, state_size=16, expand=2, conv_kernel=4)
    mix = transformers.models.mamba.modeling_mamba.MambaMixer(cfg, layer_idx=0)
    sd = {k.replace("conv.", "conv1d."): v for k, v in fn.state_dict().items()}
    mix.load_state_dict(sd)
    return mix


@contextlib.contextmanager
def matrix_carry() -> Iterator[None]:
    """Carry between chunks through ``carry_matrix`` (quadratic in the chunk count)."""
    from archir.blocks import ssm

    saved = ssm.carry_in, ssm.carry_back
    ssm.carry_in = lambda g, S: (ssm.carry_matrix(g) * S[:, None]).sum(2)  # type: ignore
    ssm.carry_back = lambda g, R: (ssm.carry_matrix(g) * R[:, :, None]).sum(1)  # type: ignore
    try:
        yield
    finally:
        ssm.carry_in, ssm.carry_back = saved


def timed(f, x: torch.Tensor) -> float:
    x = x.clone().requires_grad_(True)
    t0 = time.perf_counter()
    f(x).square().sum().backward()
    return (time.perf_counter() - t0) * 1000


def step_reference(fn: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    st = fn.init_state(x.shape[0], dtype=x.dtype)
    ys = []
    for t in range(x.shape[1]):
        y, st = fn.step(x[:, t], st)
        ys.append(y)
    return torch.stack(ys, 1)


def main() -> None:
    torch.set_num_threads(1)
    weak, strong = block(False), block(True)
    hf = hf_mixer(strong)
    with torch.no_grad():
        x = torch.randn(1, 200, 128)
        ref = step_reference(strong.double(), x.double())
        strong.float()
        err = float((strong(x).double() - ref).abs().max() / ref.abs().max())
        dmin = float(
            -(torch.exp(strong.A_log).max())
            * torch.nn.functional.softplus(strong.dt_proj.bias).max()
        )
    print(f"strong block: min Δ·A {dmin:.1f}; fp32 output vs fp64 step recurrence: {err:.2e}")
    print(
        f"\n{'T':>5} {'weak ms':>9} {'strong ms':>10} {'hf ms':>9} {'strong/weak':>12} {'hf/strong':>10}"
        + (f" {'weak mx ms':>11} {'strong mx ms':>13}" if ARGS.carry_matrix else "")
    )
    best: dict[str, list[float]] = {}
    for T in ARGS.lengths:
        x = torch.randn(8, T, 128)
        res: dict[str, list[float]] = {
            "weak": [],
            "strong": [],
            "hf": [],
            "weak_mx": [],
            "strong_mx": [],
        }
        for _ in range(ARGS.repeats):
            res["weak"].append(timed(weak, x))
            res["strong"].append(timed(strong, x))
            if ARGS.carry_matrix:
                with matrix_carry():
                    res["weak_mx"].append(timed(weak, x))
                    res["strong_mx"].append(timed(strong, x))
            if hf is not None and T <= ARGS.hf_max:
                res["hf"].append(timed(hf, x))
        for k, v in res.items():
            best.setdefault(k, []).append(min(v) if v else float("nan"))
        w, s = min(res["weak"]), min(res["strong"])
        h = min(res["hf"]) if res["hf"] else float("nan")
        line = f"{T:>5} {w:>9.1f} {s:>10.1f} {h:>9.1f} {s / w:>12.2f} {h / s:>10.2f}"
        if ARGS.carry_matrix:
            line += f" {min(res['weak_mx']):>11.1f} {min(res['strong_mx']):>13.1f}"
        print(line)
    if len(ARGS.lengths) > 1:
        grow = {k: v[-1] / v[0] for k, v in best.items() if v[0] == v[0]}
        print(
            f"cost growth {ARGS.lengths[0]} -> {ARGS.lengths[-1]}: "
            + ", ".join(f"{k} {g:.2f}x" for k, g in grow.items())
        )


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--lengths", type=int, nargs="+", default=[256, 1024])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--hf-max", type=int, default=256)
    p.add_argument("--carry-matrix", action="store_true", help="also time the quadratic carry")
    ARGS = p.parse_args()
    main()
