"""Lowering overhead: archir's compiled spec vs the same Transformer written by hand.

Both models are a pre-norm decoder (RMSNorm, RoPE attention, SwiGLU, tied embeddings):
d_model 256, 6 layers, 4 heads, vocab 256, seq 256, batch 8. The hand-written model gets the
compiled model's weights (same parameter count, same init), outputs are checked equal, then
forward+backward is timed with the repetitions interleaved (A B A B ...) and the medians
compared. Goal: ratio <= 1.05. Also times spec -> module for a 12-layer spec (goal < 100 ms).

    python benchmarks/lowering.py [--reps 10] [--threads 1]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn

import archir
from archir.cost import check_budget
from archir.ir import build_graph
from archir.spec import spec_from_text

D, LAYERS, HEADS, VOCAB, SEQ, BATCH = 256, 6, 4, 256, 256, 8

SPEC = """\
archir: 1
name: lowering-bench
model:
  task: causal_lm
  vocab_size: {vocab}
  d_model: {d}
  max_seq_len: {seq}
  norm: rmsnorm
  embed: {{kind: token_embedding}}
  layers:
    - repeat: {layers}
      blocks:
        - {{kind: attention, n_heads: {heads}, pos: rope}}
        - {{kind: swiglu, expansion: 2.667}}
  head: {{kind: lm_head, tie_embeddings: true}}
"""


# ---- the same model in plain PyTorch (nanoGPT style) ------------------------------------
class RMSNorm(nn.Module):
    def __init__(self, d: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return x * cos + torch.cat([-x[..., half:], x[..., :half]], dim=-1) * sin


class Block(nn.Module):
    def __init__(self, d: int, heads: int, hidden: int) -> None:
        super().__init__()
        self.heads, self.hd = heads, d // heads
        self.n1, self.n2 = RMSNorm(d), RMSNorm(d)
        self.q = nn.Linear(d, d, bias=False)
        self.k = nn.Linear(d, d, bias=False)
        self.v = nn.Linear(d, d, bias=False)
        self.o = nn.Linear(d, d, bias=False)
        self.gate = nn.Linear(d, hidden, bias=False)
        self.up = nn.Linear(d, hidden, bias=False)
        self.down = nn.Linear(hidden, d, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.shape
        h = self.n1(x)
        q = self.q(h).view(B, T, self.heads, self.hd).transpose(1, 2)
        k = self.k(h).view(B, T, self.heads, self.hd).transpose(1, 2)
        v = self.v(h).view(B, T, self.heads, self.hd).transpose(1, 2)
        y = F.scaled_dot_product_attention(rope(q, cos, sin), rope(k, cos, sin), v, is_causal=True)
        x = x + self.o(y.transpose(1, 2).reshape(B, T, -1))
        h = self.n2(x)
        return x + self.down(F.silu(self.gate(h)) * self.up(h))


class HandTransformer(nn.Module):
    def __init__(self, vocab: int, d: int, layers: int, heads: int, hidden: int) -> None:
        super().__init__()
        self.wte = nn.Parameter(torch.randn(vocab, d) * 0.02)
        self.blocks = nn.ModuleList(Block(d, heads, hidden) for _ in range(layers))
        self.norm = RMSNorm(d)
        self.hd = d // heads

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        T = tokens.shape[1]
        half = self.hd // 2
        inv = 1.0 / (10000.0 ** (torch.arange(half, dtype=torch.float32) / half))
        ang = torch.arange(T, dtype=torch.float32)[:, None] * inv[None, :]
        ang = torch.cat([ang, ang], dim=-1)
        cos, sin = ang.cos(), ang.sin()
        x = F.embedding(tokens, self.wte)
        for blk in self.blocks:
            x = blk(x, cos, sin)
        return F.linear(self.norm(x), self.wte)


def copy_weights(src: nn.Module, dst: HandTransformer) -> None:
    """Give the hand-written model the compiled model's weights."""
    sd = src.state_dict()
    with torch.no_grad():
        dst.wte.copy_(sd["embed.weight"])
        dst.norm.weight.copy_(sd["final_norm.weight"])
        for i, blk in enumerate(dst.blocks):
            a, m = f"blocks.{2 * i}", f"blocks.{2 * i + 1}"
            blk.n1.weight.copy_(sd[f"{a}.norm.weight"])
            blk.n2.weight.copy_(sd[f"{m}.norm.weight"])
            for name in "qkvo":
                getattr(blk, name).weight.copy_(sd[f"{a}.fn.{name}.weight"])
            blk.gate.weight.copy_(sd[f"{m}.fn.w_gate.weight"])
            blk.up.weight.copy_(sd[f"{m}.fn.w_up.weight"])
            blk.down.weight.copy_(sd[f"{m}.fn.w_down.weight"])


def step_time(model: nn.Module, x: torch.Tensor) -> float:
    t0 = time.perf_counter()
    logits = model(x)
    loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1))
    loss.backward()
    dt = time.perf_counter() - t0
    model.zero_grad(set_to_none=True)
    return dt


def build_times(layers: int, reps: int) -> tuple[float, float, float, float]:
    """Median ms for: spec text -> validated Spec -> nn.Module; compile alone; the
    hand-written model's constructor (the random weight init both pay); IR + cost pass."""
    text = SPEC.format(vocab=VOCAB, d=D, seq=SEQ, layers=layers, heads=HEADS)
    full, comp, hand, graph = [], [], [], []
    hidden = round(2.667 * D)
    for _ in range(reps):
        t0 = time.perf_counter()
        spec = spec_from_text(text)
        t1 = time.perf_counter()
        archir.compile(spec)
        t2 = time.perf_counter()
        HandTransformer(VOCAB, D, layers, HEADS, hidden)
        t3 = time.perf_counter()
        check_budget(build_graph(spec))
        graph.append((time.perf_counter() - t3) * 1e3)
        full.append((t2 - t0) * 1e3)
        comp.append((t2 - t1) * 1e3)
        hand.append((t3 - t2) * 1e3)
    med = statistics.median
    return med(full), med(comp), med(hand), med(graph)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    spec = spec_from_text(SPEC.format(vocab=VOCAB, d=D, seq=SEQ, layers=LAYERS, heads=HEADS))
    compiled = archir.compile(spec, seed=0)
    hidden = compiled.blocks[1].fn.w_gate.out_features
    hand = HandTransformer(VOCAB, D, LAYERS, HEADS, hidden)
    copy_weights(compiled, hand)
    n_c = sum(p.numel() for p in compiled.parameters())
    n_h = sum(p.numel() for p in hand.parameters())
    assert n_c == n_h == archir.analyze(spec).params, (n_c, n_h)
    x = torch.randint(0, VOCAB, (BATCH, SEQ), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        diff = (compiled(x) - hand(x)).abs().max().item()
    assert diff < 1e-4, f"outputs differ by {diff}"

    for _ in range(2):  # warm-up
        step_time(compiled, x)
        step_time(hand, x)
    t_c, t_h = [], []
    for i in range(args.reps):  # interleaved, alternating who goes first
        pair = [(compiled, t_c), (hand, t_h)]
        for model, out in pair if i % 2 == 0 else pair[::-1]:
            out.append(step_time(model, x))
    mc, mh = statistics.median(t_c) * 1e3, statistics.median(t_h) * 1e3
    print(f"threads {args.threads}, params {n_c:,} (both), max |diff| {diff:.1e}")
    print(f"forward+backward d_model {D}, {LAYERS} layers, seq {SEQ}, batch {BATCH}:")
    print(f"  archir compiled : {mc:8.1f} ms (median of {args.reps})")
    print(f"  hand-written    : {mh:8.1f} ms (median of {args.reps})")
    print(f"  ratio           : {mc / mh:8.3f}   (goal <= 1.05)")
    full, comp, hand_ms, graph_ms = build_times(12, reps=7)
    print("spec -> module, 12 layers (median of 7):")
    print(f"  load + validate + compile : {full:8.1f} ms   (goal < 100 ms)")
    print(f"  compile only              : {comp:8.1f} ms")
    print(f"  hand-written constructor  : {hand_ms:8.1f} ms   (same weights to initialize)")
    print(f"  archir overhead           : {full - hand_ms:8.1f} ms")
    print(f"  of which IR + cost pass   : {graph_ms:8.1f} ms")


if __name__ == "__main__":
    main()
