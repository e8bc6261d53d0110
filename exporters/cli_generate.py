"""``archir generate SPEC_OR_RUN --prompt TEXT``: generate text with a causal language model,
one token at a time with a carried state (KV cache, recurrent and convolution states), the
bytes streamed to stdout as they come.

Examples::

    archir generate runs/lm --prompt "def main(" --max-new-tokens 80        # greedy, torch
    archir generate runs/lm --prompt "import " --runtime ort                  # same bytes, ORT
    archir generate runs/lm --prompt "class " --temperature 0.8 --top-k 20 --seed 1
    archir generate runs/lm --prompt "import " --runtime ort --precision auto  # searched bits
    archir generate step.onnx --prompt "for i in "     # a decode model from `export --decode`

Byte-level models (``vocab_size`` 256, the text tasks): the prompt's UTF-8 bytes are the
tokens and each generated token is one byte. ``--runtime torch`` steps the PyTorch model
(:meth:`archir.compiler.CompiledModel.step`); ``--runtime ort`` exports the decode step
(:mod:`exporters.decode`) and runs it in onnxruntime. Greedy decoding gives the same bytes on
both at ``--precision fp32`` (the default). ``--precision auto`` runs the decode graph at the
precision the spec's ``bits`` select — what ``best/decode.onnx`` of a search ships (int8 / int4
MatMul per block): its logits differ from PyTorch's by the quantization, so a greedy choice
between near-equal logits can differ. Timing (prefill and ms per generated token) goes to stderr, or into ``--json``.

Exit codes: 0 generated; 2 user error: a model that cannot decode, no weights (without
``--random-weights``), an empty prompt, a prompt byte outside the vocabulary, or a prompt
plus ``--max-new-tokens`` past the ``max_seq_len`` of a model that cannot go past it, or
``--precision`` other than fp32 where it does not apply (``--runtime torch``, a ``.onnx`` file).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from archir.cli import args as a

HELP = "generate text with a causal language model (stateful decoding; torch or onnxruntime)"
MAX_NEW = 100_000


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "spec",
        help="a concrete spec file, a run folder (its best/), a folder of spec.yaml + "
        "model.safetensors, or a decode model (.onnx from `archir export --decode`)",
    )
    p.add_argument("--prompt", required=True, help="the text to continue (UTF-8)")
    p.add_argument("--max-new-tokens", type=a.int_range(1, MAX_NEW), default=64, help="default 64")
    p.add_argument(
        "--temperature",
        type=float,
        default=0.0,
        help="0 (default): greedy; > 0: sample from softmax(logits / temperature)",
    )
    p.add_argument(
        "--top-k", type=a.int_range(1, 1 << 20), default=None, help="sample from the k best"
    )
    p.add_argument("--seed", type=a.int_range(0, 2**63 - 1), default=0, help="sampling seed")
    p.add_argument("--runtime", choices=("torch", "ort"), default=None, help="default torch")
    p.add_argument(
        "--precision",
        choices=("fp32", "fp16", "int8", "int4", "auto"),
        default="fp32",
        help="--runtime ort: the decode graph's precision (default fp32; auto: the spec's bits, "
        "as best/decode.onnx ships)",
    )
    p.add_argument("--weights", type=a.regular_file, default=None, help="model.safetensors")
    p.add_argument(
        "--random-weights", action="store_true", help="generate with untrained weights on purpose"
    )
    p.add_argument("--json", action="store_true", help="print one JSON object at the end")


def make_picker(temperature: float, top_k: int | None, seed: int) -> Callable[[np.ndarray], int]:
    """``pick(logits [vocab]) -> token``: argmax when ``temperature`` is 0, else a draw
    from ``softmax(logits / temperature)`` restricted to the ``top_k`` best (seeded)."""
    import torch

    gen = torch.Generator().manual_seed(seed)

    def pick(logits: np.ndarray) -> int:
        x = torch.from_numpy(np.asarray(logits, dtype=np.float32))
        if temperature == 0:
            return int(x.argmax())
        x = x / temperature
        if top_k is not None and top_k < x.numel():
            kth = torch.topk(x, top_k).values[-1]
            x = x.masked_fill(x < kth, float("-inf"))
        return int(torch.multinomial(torch.softmax(x, -1), 1, generator=gen))

    return pick


def torch_tokens(model: Any, prompt: list[int], max_new: int, pick: Any) -> Iterator[int]:
    """Generate with :meth:`CompiledModel.step` (batch 1); yields each new token."""
    import torch

    with torch.no_grad():
        state = model.init_state(1)
        logits = None
        for tok in prompt:
            logits, state = model.step(torch.tensor([tok]), state)
        for i in range(max_new):
            assert logits is not None
            nxt = int(pick(logits[0].numpy()))
            yield nxt
            if i + 1 < max_new:
                logits, state = model.step(torch.tensor([nxt]), state)


def _check_flags(args: argparse.Namespace) -> None:
    from archir.errors import DecodeError

    if not (math.isfinite(args.temperature) and args.temperature >= 0):
        raise DecodeError(
            f"--temperature must be a finite number >= 0, got {args.temperature}",
            hint="0 is greedy",
        )
    if args.top_k is not None and args.temperature == 0:
        raise DecodeError("--top-k applies to sampling only", hint="add --temperature 0.8")
    if not args.prompt:
        raise DecodeError("--prompt is empty: there is nothing to continue", hint='--prompt "def "')


def _prompt_tokens(prompt: str, vocab: int) -> list[int]:
    from archir.errors import DecodeError

    if vocab > 256:
        raise DecodeError(
            f"the model's vocabulary has {vocab} tokens: generate reads and writes bytes "
            "(vocab_size 256) only",
            hint="a tokenizer for other vocabularies is not supported yet",
        )
    data = list(prompt.encode("utf-8", "surrogateescape"))  # bytes argv could not decode
    bad = sorted({b for b in data if b >= vocab})
    if bad:
        raise DecodeError(
            f"prompt byte(s) {', '.join(str(b) for b in bad[:8])} are outside the model's "
            f"vocabulary of {vocab} tokens",
            hint="use ASCII text, or a model with vocab_size 256",
        )
    return data


def _check_limit(limit: int | None, n_prompt: int, max_new: int, what: str) -> None:
    from archir.errors import DecodeError

    if limit is not None and n_prompt + max_new > limit:
        raise DecodeError(
            f"the prompt ({n_prompt} tokens) plus --max-new-tokens {max_new} is "
            f"{n_prompt + max_new} tokens, past max_seq_len {limit} of {what} (a block "
            "cannot go past it: learned positions, token_mlp or hyena)",
            hint=f"use --max-new-tokens {max(1, limit - n_prompt)} or a shorter prompt",
        )


def run(args: argparse.Namespace) -> int:
    """Generate; exit 0, or 2 for a user error.

    Raises:
        ArchirError: see the module docstring.
    """
    from archir.errors import DecodeError

    _check_flags(args)
    pick = make_picker(args.temperature, args.top_k, args.seed)
    src = Path(args.spec)
    runtime = args.runtime or ("ort" if src.suffix == ".onnx" and src.is_file() else "torch")
    t0 = time.perf_counter()
    precision = getattr(args, "precision", "fp32")
    if precision != "fp32" and src.suffix == ".onnx":
        raise DecodeError(
            f"--precision {precision} does not apply to a decode model file: it runs at the "
            "precision it was exported at",
            hint="drop --precision",
        )
    if precision != "fp32" and runtime != "ort":
        raise DecodeError(
            f"--precision {precision} applies to --runtime ort: --runtime torch runs the "
            "trained weights as they are",
            hint="add --runtime ort, or drop --precision",
        )
    if src.suffix == ".onnx" and src.is_file():
        if runtime != "ort":
            raise DecodeError("a decode model (.onnx) runs on onnxruntime", hint="drop --runtime")
        from exporters.decode import ort_generate_loop, read_decode_metadata
        from exporters.parity import make_session

        meta = read_decode_metadata(src)
        prompt = _prompt_tokens(args.prompt, int(meta["vocab_size"]))
        _check_limit(meta.get("max_tokens"), len(prompt), args.max_new_tokens, str(src))
        sess = make_session(str(src), threads=None)
        tokens: Iterator[int] = ort_generate_loop(sess, meta, prompt, args.max_new_tokens, pick)
        name = str(src)
    else:
        import archir
        from exporters.cli_export import RANDOM_NOTE, check_weights, resolve_source
        from exporters.onnx_export import load_weights

        spec, weights = resolve_source(args.spec, args.weights)
        check_weights(
            args.spec, weights, args.random_weights, args.random_weights, "it would generate noise"
        )
        model = archir.compile(spec, seed=0)
        if weights is not None:
            load_weights(model, weights)
        model.eval()
        model.check_decodable()
        prompt = _prompt_tokens(args.prompt, spec.model.model.vocab_size)
        _check_limit(model.seq_limit, len(prompt), args.max_new_tokens, spec.model.name)
        name = spec.model.name
        if weights is None and not args.json:
            print(f"note: {RANDOM_NOTE}", file=sys.stderr)
        if runtime == "torch":
            tokens = torch_tokens(model, prompt, args.max_new_tokens, pick)
        else:
            from exporters.decode import (
                decode_proto,
                ort_generate_loop,
                read_decode_metadata,
                ship_decode,
            )
            from exporters.parity import make_session

            proto, layout, limit, used, _ = decode_proto(spec, model)
            if precision != "fp32":  # the graph best/decode.onnx ships at these bits
                proto, _ = ship_decode(proto, spec, model, layout, limit, used, precision)
            sess = make_session(proto.SerializeToString(), threads=None)
            tokens = ort_generate_loop(
                sess, read_decode_metadata(proto), prompt, args.max_new_tokens, pick
            )
    setup_s = time.perf_counter() - t0
    out = sys.stdout.buffer
    if not args.json:
        out.write(args.prompt.encode("utf-8", "surrogateescape"))
        out.flush()
    got: list[int] = []
    t1 = time.perf_counter()
    first_s = None
    for tok in tokens:
        if first_s is None:
            first_s = time.perf_counter() - t1  # prefill + the first choice
        got.append(tok)
        if not args.json:
            out.write(bytes([tok]) if tok < 256 else f"<{tok}>".encode())
            out.flush()
    total = time.perf_counter() - t1
    per_tok = (total - (first_s or 0.0)) / max(1, len(got) - 1) * 1e3
    info = {
        "model": name,
        "runtime": runtime,
        "precision": precision if runtime == "ort" and src.suffix != ".onnx" else None,
        "prompt_tokens": len(prompt),
        "new_tokens": len(got),
        "tokens": got,
        "text": bytes(t for t in got if t < 256).decode("utf-8", "replace"),
        "setup_s": round(setup_s, 3),
        "prefill_ms": round((first_s or 0.0) * 1e3, 3),
        "ms_per_token": round(per_tok, 3),
    }
    if args.json:
        print(json.dumps(info, indent=1))
    else:
        out.write(b"\n")
        out.flush()
        print(
            f"[{runtime}] {len(prompt)} prompt + {len(got)} new tokens: prefill "
            f"{info['prefill_ms']:.1f} ms, {info['ms_per_token']:.2f} ms per new token",
            file=sys.stderr,
        )
    return 0
