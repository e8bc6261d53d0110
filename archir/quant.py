"""Weight fake-quantization: evaluate a model at the weight bits its spec declares.

Each IR node carries weight ``bits`` (``archir.registry.ALLOWED_BITS``). To measure what fewer
bits cost in quality, :func:`quantize_model` replaces the weight matrices of every node with
``bits < 16`` by their quantized values (stored back in floating point, "fake" quantization),
in place. Vectors (norm gains, biases) stay in full precision, as in the papers below.

Schemes (``w``: a weight of shape ``[out, in, ...]``; rows are output channels):

* 8 / 4 / 2 bits — symmetric round-to-nearest per output channel:
  ``s = max|w_row| / (2^(b-1) - 1)``, ``q = clamp(round(w / s), -(2^(b-1) - 1), 2^(b-1) - 1) · s``
  (Jacob et al., 2018, 'Quantization and Training of Neural Networks for Efficient
  Integer-Arithmetic-Only Inference').
* 1.58 bits — ternary absmean, per tensor: ``γ = mean|w|``,
  ``q = clamp(round(w / γ), -1, 1) · γ`` (Ma et al., 2024, 'The Era of 1-bit LLMs: All Large
  Language Models are in 1.58 Bits' — BitNet b1.58).
* 1 bit — sign times the mean magnitude per output channel: ``q = sign(w) · mean|w_row|``
  (Rastegari et al., 2016, XNOR-Net; Wang et al., 2023, BitNet).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

QUANT_BITS: tuple[float, ...] = (8, 4, 2, 1.58, 1)


def quantize_tensor(w: torch.Tensor, bits: float) -> torch.Tensor:
    """The fake-quantized copy of ``w`` (same shape and dtype) at ``bits``.

    Bits of 16 or more return ``w`` unchanged.

    Raises:
        ValueError: ``bits`` is not one of 32, 16, 8, 4, 2, 1.58, 1.
    """
    b = float(bits)
    if b >= 16:
        return w
    if b not in QUANT_BITS:
        raise ValueError(f"no quantization scheme for {bits} bits (expected one of {QUANT_BITS})")
    x = w.detach().float()
    if b == 1.58:
        gamma = x.abs().mean().clamp_min(1e-8)
        return ((x / gamma).round().clamp(-1, 1) * gamma).to(w.dtype)
    rows = x.reshape(x.shape[0], -1) if x.dim() > 1 else x.reshape(1, -1)
    if b == 1:
        scale = rows.abs().mean(dim=1, keepdim=True)
        q = torch.where(rows >= 0, 1.0, -1.0) * scale
        return q.reshape(x.shape).to(w.dtype)
    qmax = 2 ** (int(b) - 1) - 1
    scale = (rows.abs().amax(dim=1, keepdim=True) / qmax).clamp_min(1e-12)
    q = (rows / scale).round().clamp(-qmax, qmax) * scale
    return q.reshape(x.shape).to(w.dtype)


@torch.no_grad()
def quantize_module(module: nn.Module, bits: float) -> int:
    """Fake-quantize, in place, every parameter of ``module`` with 2 or more dimensions.

    Returns the number of parameter elements quantized (0 when ``bits >= 16``).
    """
    if float(bits) >= 16:
        return 0
    n = 0
    seen: set[int] = set()
    for p in module.parameters():
        if p.dim() < 2 or id(p) in seen:
            continue
        seen.add(id(p))
        p.copy_(quantize_tensor(p, bits))
        n += p.numel()
    return n


def node_modules(model: Any) -> list[tuple[str, float, nn.Module]]:
    """``(node name, bits, module)`` for every IR node of a compiled model that owns weights.

    Block nodes map to the block's function (its norm excluded); nodes sharing another
    node's weights (``share_weights``) are skipped, so each tensor appears once. A tied LM
    head is skipped: its matrix is the embedding's.
    """
    out: list[tuple[str, float, nn.Module]] = []
    idx = 0
    for n in model.graph:
        if n.op == "embed":
            out.append((n.name, n.bits, model.embed))
        elif n.op == "block":
            if n.weights_of is not None:
                continue
            out.append((n.name, n.bits, model.blocks[idx].fn))
            idx += 1
        elif n.op == "head":
            if not getattr(n.params, "tie_embeddings", False):
                out.append((n.name, n.bits, model.head))
    return out


def quantize_model(model: Any) -> dict[str, Any]:
    """Fake-quantize a :class:`~archir.compiler.CompiledModel` in place, node by node, at
    each IR node's weight ``bits``.

    Returns:
        ``{"quantized": {node name: bits}, "elements": n}`` — the nodes that were changed and
        how many weight elements; empty when every node is at 16 bits or more.
    """
    done: dict[str, float] = {}
    total = 0
    for name, bits, mod in node_modules(model):
        n = quantize_module(mod, bits)
        if n:
            done[name] = bits
            total += n
    return {"quantized": done, "elements": total}


def needs_quantization(model: Any) -> bool:
    """True when some node of the compiled model has weight bits below 16."""
    return any(n.bits < 16 for n in model.graph if n.op in ("embed", "block", "head"))
