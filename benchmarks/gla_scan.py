"""GLA without the −4 clamp (issue 16, part 1): speed before and after, side by side.

One GLA block as in ``specs/zoo/gla.yaml`` (d_model 128, 4 heads, ``expand_k`` 0.5,
``expand_v`` 1), 1 torch thread. Three modules with the same weights:

* ``old``: the previous GLA, reimplemented here from the code before this change (git
  8e8a9d5): per-step log-gate clamped at −4, then always the rescaled-matmul form — in eager
  and in the exported graph. At closed gates it computes another function (the clamp);
* ``new weak``: the current GLA on the fresh weights (every log-gate ≥ −4: the fast form);
* ``new strong``: the current GLA with gate logits down to about −900 (per-step log-gates to
  −56, as a trained, firmly closed gate reaches): the stable sub-chunked form.

Eager: batch 8, T 256 and 1,024, forward (``no_grad``) and forward + backward, best of
``--repeats``, the three interleaved repeat by repeat. onnxruntime: each module exported
through archir's one export path (:func:`exporters.graph.export_graph`, dynamo, dynamic
batch and length), batch 1, 1 thread, T 128 and 512, median of ``--ort-repeats`` runs, the
sessions interleaved run by run; ``old`` exports the clamped fast form, ``new`` (weak or
strong weights: the same graph) the stable form, since a graph cannot choose by the data.

Also prints the fp32 output of the strong block against the step-by-step recurrence in fp64.

Run: ``.venv/bin/python benchmarks/gla_scan.py`` (about 2 min on a quiet 2-core machine).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from archir import registry
from archir.blocks.recurrent import GLA, GLA_CHUNK
from archir.registry import BuildContext

OLD_MAX_LOG_DECAY = 4.0


def _segsum(g: torch.Tensor) -> torch.Tensor:
    """The old decay between chunks: ``g [..., n] -> [..., n, n]``, ``Σ_{j<r≤i} g[r]`` for
    ``j ≤ i``, ``-inf`` above (its ``exp`` taken by the caller)."""
    n = g.shape[-1]
    idx = torch.arange(n, device=g.device)
    x = g[..., :, None].expand(*g.shape, n).masked_fill(idx[:, None] <= idx[None, :], 0.0)
    return x.cumsum(-2).masked_fill(idx[:, None] < idx[None, :], float("-inf"))


class OldGLA(GLA):
    """The GLA before issue 16 part 1 (git 8e8a9d5), reimplemented: clamped log-gate, and the
    within-chunk scores always by queries and keys rescaled around the chunk's middle step."""

    def _log_gate(self, x: torch.Tensor) -> torch.Tensor:
        return super()._log_gate(x).clamp(min=-OLD_MAX_LOG_DECAY)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.shape
        C, H, hk, hv = GLA_CHUNK, self.h, self.hk, self.hv
        pad = (C - T % C) % C
        xp = F.pad(x, (0, 0, 0, pad))
        nc = xp.shape[1] // C

        def chunks(t: torch.Tensor, e: int) -> torch.Tensor:
            return t.view(B, nc, C, H, e).permute(0, 3, 1, 2, 4)

        q = chunks(self.q(xp), hk) * self.scale
        k = chunks(self.k(xp), hk)
        v = chunks(self.v(xp), hv)
        la = chunks(self._log_gate(xp), hk)
        tril = torch.ones(C, C, dtype=x.dtype, device=x.device).tril()
        G = tril @ la
        qg = q * torch.exp(G)
        mid = G[..., C // 2 : C // 2 + 1, :]
        att = (q * torch.exp(G - mid)) @ (k * torch.exp(mid - G)).transpose(-1, -2)
        att = att.masked_fill(tril == 0, 0.0)
        o = att @ v
        g_end = G[..., -1, :]
        S = (k * torch.exp(g_end[..., None, :] - G)).transpose(-1, -2) @ v
        trans = torch.exp(_segsum(g_end.transpose(-1, -2)))
        E = torch.einsum("bhkij,bhjkv->bhikv", trans, S)
        carry = F.pad(E, (0, 0, 0, 0, 1, 0))[:, :, :-1]
        o = o + qg @ carry
        o = o.permute(0, 2, 3, 1, 4).reshape(B, nc * C, H, hv)[:, :T]
        return self._out(o, x)


def modules() -> dict[str, torch.nn.Module]:
    kind = registry.get("gla")
    ctx = BuildContext(d_model=128, vocab_size=256)
    p = kind.params(n_heads=4, expand_k=0.5, expand_v=1.0)
    torch.manual_seed(0)
    new = kind.build(p, ctx)
    old = OldGLA(128, p)
    old.load_state_dict(new.state_dict())
    strong = kind.build(p, ctx)
    strong.load_state_dict(new.state_dict())
    with torch.no_grad():
        dk = strong.gk2.bias.numel()
        strong.gk2.bias.copy_(torch.linspace(-900.0, 0.0, dk)[torch.randperm(dk)])
    return {"old": old.eval(), "new weak": new.eval(), "new strong": strong.eval()}


def step_reference(m: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    st = m.init_state(x.shape[0], dtype=x.dtype)  # type: ignore[operator]
    ys = []
    for t in range(x.shape[1]):
        y, st = m.step(x[:, t], st)  # type: ignore[operator]
        ys.append(y)
    return torch.stack(ys, 1)


def eager(mods: dict[str, torch.nn.Module], lengths: list[int], repeats: int) -> None:
    def fwd(m: torch.nn.Module, x: torch.Tensor) -> float:
        t0 = time.perf_counter()
        with torch.no_grad():
            m(x)
        return (time.perf_counter() - t0) * 1000

    def fwd_bwd(m: torch.nn.Module, x: torch.Tensor) -> float:
        xg = x.clone().requires_grad_(True)
        t0 = time.perf_counter()
        m(xg).square().sum().backward()
        return (time.perf_counter() - t0) * 1000

    names = list(mods)
    print(f"\neager, batch 8, 1 thread, best of {repeats} (ms)")
    head = " ".join(f"{n:>11}" for n in names)
    print(f"{'pass':>8} {'T':>5} {head} {'weak/old':>9} {'strong/old':>11}")
    for label, f in (("fwd", fwd), ("fwd+bwd", fwd_bwd)):
        for T in lengths:
            x = torch.randn(8, T, 128)
            for m in mods.values():  # warm-up
                f(m, x)
            res: dict[str, list[float]] = {n: [] for n in names}
            for _ in range(repeats):
                for n in names:
                    res[n].append(f(mods[n], x))
            best = {n: min(v) for n, v in res.items()}
            cols = " ".join(f"{best[n]:>11.1f}" for n in names)
            print(
                f"{label:>8} {T:>5} {cols} {best['new weak'] / best['old']:>9.2f} "
                f"{best['new strong'] / best['old']:>11.2f}"
            )


def onnxruntime(mods: dict[str, torch.nn.Module], lengths: list[int], repeats: int) -> None:
    import onnxruntime as ort

    from exporters.graph import Axis, export_graph

    axes = [{0: Axis("batch"), 1: Axis("seq")}]
    sessions: dict[str, Callable[[torch.Tensor], object]] = {}
    for n in ("old", "new strong"):
        t0 = time.perf_counter()
        ex = export_graph(
            mods[n],
            (torch.randn(2, 67, 128),),
            input_names=["x"],
            output_names=["y"],
            input_axes=axes,
            output_axes=[{0: "batch", 1: "seq"}],
        )
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = opts.inter_op_num_threads = 1
        s = ort.InferenceSession(
            ex.proto.SerializeToString(), opts, providers=["CPUExecutionProvider"]
        )
        print(
            f"exported {n!r} ({ex.exporter}, {len(ex.proto.graph.node)} nodes) in "
            f"{time.perf_counter() - t0:.1f} s"
        )
        sessions[n] = lambda x, s=s: s.run(None, {"x": x.numpy()})[0]
    print(f"\nonnxruntime, batch 1, 1 thread, median of {repeats} (ms)")
    print(f"{'T':>5} {'old':>9} {'new':>9} {'new/old':>8} {'max |new − torch|':>18}")
    for T in lengths:
        x = torch.randn(1, T, 128)
        with torch.no_grad():
            ref = mods["new strong"](x)
        err = float((torch.as_tensor(sessions["new strong"](x)) - ref).abs().max())
        res: dict[str, list[float]] = {n: [] for n in sessions}
        for _ in range(repeats):
            for n, run in sessions.items():
                t0 = time.perf_counter()
                run(x)
                res[n].append((time.perf_counter() - t0) * 1000)
        o, w = statistics.median(res["old"]), statistics.median(res["new strong"])
        print(f"{T:>5} {o:>9.2f} {w:>9.2f} {w / o:>8.2f} {err:>18.2e}")


def main() -> None:
    torch.set_num_threads(1)
    mods = modules()
    strong = mods["new strong"]
    with torch.no_grad():
        x = torch.randn(1, 200, 128)
        la = strong._log_gate(x)  # type: ignore[operator]
        ref = step_reference(strong.double(), x.double())
        strong.float()
        err = float((strong(x).double() - ref).abs().max() / ref.abs().max())
        old_err = float((mods["old"](x).double() - ref).abs().max() / ref.abs().max())
    print(
        f"strong block: per-step log-gate from {float(la.min()):.1f} to {float(la.max()):.2f}; "
        f"fp32 output vs the fp64 recurrence: new {err:.2e}, old (clamped) {old_err:.2e}"
    )
    if not ARGS.no_eager:
        eager(mods, ARGS.lengths, ARGS.repeats)
    if not ARGS.no_ort:
        onnxruntime(mods, ARGS.ort_lengths, ARGS.ort_repeats)


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--lengths", type=int, nargs="+", default=[256, 1024])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--ort-lengths", type=int, nargs="+", default=[128, 512])
    p.add_argument("--ort-repeats", type=int, default=30)
    p.add_argument("--no-eager", action="store_true")
    p.add_argument("--no-ort", action="store_true")
    ARGS = p.parse_args()
    main()
