"""Training-step speed of each token mixer against attention at the same size.

One spec per mixer: a pre-norm causal LM (d_model 128, 4 layers, vocab 256, RMSNorm, tied
embeddings) whose layers are ``{token mixer} + swiglu``; ``moe`` is the exception: it is a
channel mixer, so its spec is ``attention + moe``. Each kind is built with its defaults
(``mamba``: d_state 16, d_conv 4, expansion 2 as in ``specs/zoo/mamba.yaml``; attention:
4 heads, RoPE). One step = forward + backward of the mean logit at batch 16; the
repetitions are interleaved (every kind once per round, the order rotated each round) and
the median is reported with its ratio to attention's median at the same length.

    python benchmarks/mixers_speed.py [--seq 128 512] [--reps 5] [--threads 1] [--kinds ...]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import archir
from archir.spec import spec_from_dict

KINDS = [
    "attention",
    "mamba",
    "s4d",
    "gla",
    "retnet",
    "rwkv",
    "hyena",
    "linear_attention",
    "mlstm",
    "moe",
]
D, LAYERS, VOCAB, BATCH = 128, 4, 256, 16


def spec_for(kind: str, seq: int) -> dict[str, object]:
    """The benchmark spec for ``kind`` at max length ``seq`` (a dict for ``spec_from_dict``)."""
    if kind == "moe":
        blocks = [{"kind": "attention", "n_heads": 4, "pos": "rope"}, {"kind": "moe"}]
    else:
        mixer: dict[str, object] = {"kind": kind}
        if kind == "attention":
            mixer.update(n_heads=4, pos="rope")
        if kind == "mamba":
            mixer.update(d_state=16, d_conv=4, expansion=2)
        blocks = [mixer, {"kind": "swiglu", "expansion": 2.667}]
    return {
        "archir": 1,
        "name": f"speed-{kind}",
        "model": {
            "task": "causal_lm",
            "vocab_size": VOCAB,
            "d_model": D,
            "max_seq_len": seq,
            "norm": "rmsnorm",
            "embed": {"kind": "token_embedding"},
            "layers": [{"repeat": LAYERS, "blocks": blocks}],
            "head": {"kind": "lm_head", "tie_embeddings": True},
        },
    }


def step_seconds(model: torch.nn.Module, x: torch.Tensor) -> float:
    """Wall seconds of one forward + backward."""
    t0 = time.perf_counter()
    model(x).float().mean().backward()
    return time.perf_counter() - t0


def bench(kinds: list[str], seq: int, reps: int) -> dict[str, float]:
    """Median fwd+bwd seconds per kind at length ``seq`` (interleaved repetitions)."""
    torch.manual_seed(0)
    models = {k: archir.compile(spec_from_dict(spec_for(k, seq)), seed=0) for k in kinds}
    x = torch.randint(0, VOCAB, (BATCH, seq))
    for m in models.values():  # warm-up (allocator, lazy init)
        step_seconds(m, x)
    times: dict[str, list[float]] = {k: [] for k in kinds}
    for r in range(reps):
        order = kinds[r % len(kinds) :] + kinds[: r % len(kinds)]
        for k in order:
            models[k].zero_grad(set_to_none=True)
            times[k].append(step_seconds(models[k], x))
    return {k: statistics.median(v) for k, v in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seq", type=int, nargs="+", default=[128, 512])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--kinds", nargs="+", default=KINDS)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    kinds = ["attention", *[k for k in args.kinds if k != "attention"]]
    results = {T: bench(kinds, T, args.reps) for T in args.seq}
    head = " | ".join(f"T={T} ms | ×attn" for T in args.seq)
    print(f"| mixer | {head} |")
    print("|---|" + "---:|---:|" * len(args.seq))
    for k in kinds:
        cells = []
        for T in args.seq:
            ms, ref = 1000 * results[T][k], results[T]["attention"]
            cells.append(f"{ms:.0f} | {results[T][k] / ref:.2f}")
        print(f"| {k} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
