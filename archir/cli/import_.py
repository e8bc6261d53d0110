"""``archir import hf DIR --out OUT``: bring a Hugging Face causal-LM folder into archir.

    archir import hf ./my-llama --out imported/       # spec.yaml + model.safetensors
    archir train imported/spec.yaml --init imported/model.safetensors ...

Families: see ``archir import hf --list``. The logits of the imported model are compared with
``transformers`` when it is installed (``pip install 'archir[hf]'``); a mismatch is refused
and nothing is written.
"""

from __future__ import annotations

import argparse
import json

HELP = "import a Hugging Face model folder (config.json + weights) as spec.yaml + safetensors"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("source", choices=("hf",), help="where the model comes from (hf)")
    p.add_argument("folder", nargs="?", help="the model folder (config.json + weights)")
    p.add_argument("--out", "-o", default=None, help="output folder (spec.yaml, model.safetensors)")
    p.add_argument("--name", default=None, help="the spec's name (default: the folder's)")
    p.add_argument(
        "--no-check", action="store_true", help="skip the logit comparison with transformers"
    )
    p.add_argument("--list", action="store_true", help="list the families archir imports")
    p.add_argument("--json", action="store_true", help="machine-readable report")


def run(args: argparse.Namespace) -> int:
    from archir.errors import InteropError
    from archir.interop import families, import_hf

    if args.list:
        for f in families():
            print(f"{f.name:8s} {', '.join(f.architectures):24s} {f.paper}")
        return 0
    if not args.folder or not args.out:
        raise InteropError(
            "give the model folder and --out", hint="archir import hf FOLDER --out OUT"
        )
    report = import_hf(args.folder, args.out, check=not args.no_check, name=args.name)
    print(json.dumps(report.to_dict(), indent=2) if args.json else report)
    return 0
