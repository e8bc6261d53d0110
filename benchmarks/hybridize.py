"""Hybridize an imported Hugging Face model under a decode-latency objective (issue 15).

1. A tiny Llama (byte vocabulary, d 64, 4 layers, 4 query / 2 KV heads, SwiGLU 172) is
   trained with ``transformers`` on ``text:pydoc`` for ``--pretrain`` steps and saved with
   ``save_pretrained`` — the "model the user already has".
2. ``archir import hf`` brings it in (logit parity with transformers checked).
3. A search spec keeps its layout and asks, per layer, attention or Mamba or GLA, and a
   SwiGLU width of 172 or 128, every candidate starting from the imported weights
   (``train.init``; replaced mixers start fresh, narrower MLPs are sliced) and retrained
   ``--retrain`` steps; objectives ``val_bpb`` and ``decode_ms_per_token`` (onnxruntime
   decode graph, context ``--context``).
4. Printed side by side: the imported model as it is, the imported model retrained the
   same steps (the all-attention point), each front member, and the front's fastest hybrid
   trained from a fresh initialization for the same steps (what inheritance is worth).

Run: ``.venv/bin/python benchmarks/hybridize.py --out bench-out/hybridize`` (about 15 min
on 2 cores). Needs ``transformers`` (the ``hf`` extra).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
import yaml

LAYERS = 4


def pretrain_llama(out: Path, steps: int, seed: int = 0) -> dict:
    import transformers

    from archir.tasks.base import get_task

    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=172,
        num_hidden_layers=LAYERS,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
    )
    model = transformers.LlamaForCausalLM(cfg)
    task = get_task("text:pydoc")
    gen = torch.Generator().manual_seed(seed + 1)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.1)
    t0 = time.perf_counter()
    model.train()
    for step in range(steps):
        lr = 3e-3 * min(1.0, (step + 1) / 20) * 0.5 * (1 + math.cos(math.pi * step / steps))
        for g in opt.param_groups:
            g["lr"] = max(lr, 3e-5)
        x, y = task.train_batch(16, 128, gen)
        logits = model(input_ids=x).logits
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, 256), y.reshape(-1))
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
    model.save_pretrained(out)
    return {"steps": steps, "train_loss": float(loss), "wall_s": time.perf_counter() - t0}


def evaluate(spec, weights: Path | None, steps: int) -> dict:
    """val_bpb of ``spec`` (loaded from ``weights``, then trained ``steps`` steps when > 0)
    and its decode cost."""
    from safetensors.torch import load_model

    from archir.compiler import compile
    from archir.tasks.base import get_task
    from archir.train import train
    from exporters.decode import measure_decode

    cfg = spec.model.train.model_copy(update={"steps": steps})
    if steps > 0:
        res = train(spec, cfg=cfg)
        model, bpb = res.model, res.metrics["val_bpb"]
    else:
        model = compile(spec)
        if weights is not None:
            load_model(model, str(weights))
        task = get_task(cfg.task)
        model.eval()
        bpb = task.evaluate(model, 16, cfg.seq_len, cfg.eval_batches)["val_bpb"]
    model.eval()
    dec = measure_decode(spec, model, runtime="ort", context=ARGS.context, threads=1)
    return {"val_bpb": bpb, "decode_ms_per_token": dec["decode_ms_per_token"]}


def search_spec(imported: dict, retrain: int, trials: int) -> dict:
    m = imported["model"]
    attn = dict(m["layers"][0]["blocks"][0])
    mixers = [
        attn,
        {"kind": "mamba", "d_state": 16, "expansion": 2},
        {"kind": "gla", "n_heads": 4},
    ]
    layers = []
    for _ in range(LAYERS):
        layers.append(
            {"blocks": [{"choice": mixers}, {"kind": "swiglu", "d_ff": {"choice": [172, 128]}}]}
        )
    data = {
        "archir": 1,
        "name": "hybrid-from-llama",
        "model": {**m, "layers": layers},
        "train": {
            "task": "text:pydoc",
            "steps": retrain,
            "batch_size": 16,
            "seq_len": 128,
            "lr": 1e-3,
            "warmup_steps": 10,
            "eval_batches": 40,
            "init": "imported/model.safetensors",
        },
        "search": {
            "objectives": {"val_bpb": "minimize", "decode_ms_per_token": "minimize"},
            "budget": {"trials": trials},
            "sampler": "nsga2",
            "population": 4,
            "fidelity": "full",
            "decode": {"context": ARGS.context, "runtime": "ort", "threads": 1},
        },
    }
    return data


def main() -> None:
    from archir.interop import import_hf
    from archir.spec import spec_from_dict
    from searchers.run import run_search

    out = Path(ARGS.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    pre = pretrain_llama(out / "llama-hf", ARGS.pretrain)
    print(f"pretrained tiny Llama with transformers: {pre}")
    rep = import_hf(out / "llama-hf", out / "imported")
    print(rep)
    imported = yaml.safe_load((out / "imported" / "spec.yaml").read_text())
    imported["train"] = {
        "task": "text:pydoc",
        "steps": ARGS.retrain,
        "batch_size": 16,
        "seq_len": 128,
        "lr": 1e-3,
        "warmup_steps": 10,
        "eval_batches": 40,
    }
    base_spec = spec_from_dict(imported)
    rows = []
    before = evaluate(base_spec, out / "imported" / "model.safetensors", 0)
    rows.append(("imported Llama, as is", before))
    spec_path = out / "hybrid.yaml"
    spec_path.write_text(
        yaml.safe_dump(search_spec(imported, ARGS.retrain, ARGS.trials), sort_keys=False)
    )
    res = run_search(spec_path, out=out / "run", export=False, say=lambda s: None)
    front = sorted(res.front, key=lambda r: r["objectives"].get("decode_ms_per_token") or math.inf)
    fastest = None
    for r in front:
        kinds = [b["kind"] for b in _blocks(out / "run", r)]
        label = (
            "front: "
            + "/".join(k[:4] for k in kinds[0::2])
            + " d_ff "
            + "/".join(str(b.get("d_ff")) for b in _blocks(out / "run", r)[1::2])
        )
        rows.append((label, dict(r["objectives"], trial=r["trial"])))
        if fastest is None:
            fastest = r
    # the all-attention point retrained the same steps, and the fastest hybrid from scratch
    keep = dict(imported)
    keep["train"] = {
        **imported["train"],
        "init": str((out / "imported" / "model.safetensors").resolve()),
    }
    rows.insert(
        1, ("imported Llama, retrained", evaluate(spec_from_dict(keep), None, ARGS.retrain))
    )
    if fastest is not None:
        fresh = yaml.safe_load(_spec_text(out / "run", fastest))
        fresh["train"].pop("init", None)
        rows.append(
            ("fastest hybrid, fresh init", evaluate(spec_from_dict(fresh), None, ARGS.retrain))
        )
    print(f"\n{'model':52s} {'val_bpb':>8s} {'decode ms/token':>16s}")
    for label, r in rows:
        print(f"{label:52s} {r['val_bpb']:8.3f} {r['decode_ms_per_token']:16.3f}")
    summary = {
        "pretrain": pre,
        "parity": rep.parity.to_dict() if rep.parity else None,
        "rows": [{"model": label, **r} for label, r in rows],
        "trials": res.n_trials,
        "wall_s": time.perf_counter() - t0,
    }
    (out / "hybridize.json").write_text(json.dumps(summary, indent=2))
    print(f"\nwall {summary['wall_s']:.0f} s; written {out / 'hybridize.json'}")


def _spec_text(run: Path, r: dict) -> str:
    return (run / r["spec"]).read_text()


def _blocks(run: Path, r: dict) -> list[dict]:
    data = yaml.safe_load(_spec_text(run, r))
    return [
        b for g in data["model"]["layers"] for _ in range(g.get("repeat", 1)) for b in g["blocks"]
    ]


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="bench-out/hybridize")
    p.add_argument("--pretrain", type=int, default=400)
    p.add_argument("--retrain", type=int, default=100)
    p.add_argument("--trials", type=int, default=12)
    p.add_argument("--context", type=int, default=512)
    ARGS = p.parse_args()
    main()
