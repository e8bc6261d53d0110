"""MatFormer: one nested run vs each width trained alone (issue 16 part 3, item 6).

Trains ``specs/zoo/matformer.yaml`` once (the granularities jointly, MatFormer's training),
then the same model with a plain SwiGLU FFN of each granularity's width alone
(``--widths``: the smallest and the largest by default), all for the same steps on the same
task and seed, and prints val_bpb of each granularity from the nested run beside the
separately trained one, with the wall and CPU seconds of each run (1 torch thread).

    python benchmarks/matformer.py --steps 300 [--widths 0.125,1.0] [--json out.json]
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import torch

from archir.spec import load_spec, spec_from_dict
from archir.train import train

ZOO = Path(__file__).resolve().parent.parent / "specs" / "zoo" / "matformer.yaml"


def plain(spec, g: float):
    """The zoo spec with a plain swiglu FFN of granularity ``g``'s width."""
    data = copy.deepcopy(spec.data)
    d = data["model"]["d_model"]
    for group in data["model"]["layers"]:
        for i, b in enumerate(group["blocks"]):
            if b.get("kind") == "matformer":
                h = round(b.get("expansion", 4.0) * d)
                group["blocks"][i] = {
                    "role": "channel_mixer",
                    "kind": "swiglu",
                    "d_ff": round(g * h),
                }
    data["name"] = f"{data['name']}-alone-{str(g).replace('.', 'p')}"
    return spec_from_dict(data)


def run(spec, steps: int, **train_: int) -> dict:
    cfg = spec.model.train.model_copy(update={"steps": steps, "threads": 1, **train_})
    t0, c0 = time.perf_counter(), time.process_time()
    res = train(spec, cfg=cfg)
    m = {k: v for k, v in res.metrics.items() if k != "history"}
    m["wall_s"] = time.perf_counter() - t0
    m["cpu_s"] = time.process_time() - c0
    return m


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--widths", default="0.125,1.0", help="alone runs: fractions, or none")
    ap.add_argument("--alone-only", action="store_true", help="skip the nested run")
    ap.add_argument("--batch-size", type=int, help="default: the spec's train.batch_size")
    ap.add_argument("--seq-len", type=int, help="default: the spec's train.seq_len")
    ap.add_argument("--json")
    ap.add_argument(
        "--merge", nargs="+", help="print the table of earlier --json files (nested and alone)"
    )
    args = ap.parse_args()
    if args.merge:
        out = {"nested": None, "alone": {}}
        for f in args.merge:
            part = json.loads(Path(f).read_text())
            out["nested"] = part.get("nested") or out["nested"]
            out["alone"].update(part.get("alone", {}))
        table(out)
        return
    torch.set_num_threads(1)
    spec = load_spec(ZOO)
    kw = {"batch_size": args.batch_size, "seq_len": args.seq_len}
    kw = {k: v for k, v in kw.items() if v is not None}
    out = {"steps": args.steps, **kw, "nested": None, "alone": {}}
    if args.widths != "none":
        for g in [float(x) for x in args.widths.split(",")]:
            out["alone"][f"{g:g}"] = run(plain(spec, g), args.steps, **kw)
            print(g, json.dumps(out["alone"][f"{g:g}"], default=float), flush=True)
            if args.json:
                Path(args.json).write_text(json.dumps(out, indent=2, default=float))
    if not args.alone_only:
        out["nested"] = run(spec, args.steps, **kw)
        print(json.dumps(out["nested"], default=float), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2, default=float))
    if out["nested"] is not None:
        table(out)


def table(out: dict) -> None:
    nested = out["nested"]
    print(f"\n{'granularity':>11} {'nested bpb':>10} {'alone bpb':>10} {'delta':>7}")
    for g, m in out["alone"].items():
        key = f"val_bpb@g{g}"
        print(
            f"{g:>11} {nested[key]:>10.4f} {m['val_bpb']:>10.4f} {nested[key] - m['val_bpb']:>+7.4f}"
        )
    alone_cpu = sum(m["cpu_s"] for m in out["alone"].values())
    print(
        f"nested run: {nested['wall_s']:.0f} s wall, {nested['cpu_s']:.0f} s CPU; "
        f"the {len(out['alone'])} widths alone: {alone_cpu:.0f} s CPU in all"
    )


if __name__ == "__main__":
    main()
