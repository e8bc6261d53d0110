"""Pareto bookkeeping: the front, ``pareto.json``, ``pareto.png`` and ``best/``.

The front is computed over feasible COMPLETE trials (every constraint met). ``pareto.json``
lists each member with every objective and constraint value and the path of its concrete
spec; ``pareto.png`` draws all trials on the first two objectives (one objective: value per
trial), infeasible ones greyed, the front highlighted. ``best/`` holds the chosen member
(best on the first objective among the front): ``spec.yaml``, ``model.safetensors``,
``model.onnx`` (parity-checked against onnxruntime), for a language model ``decode.onnx``
(the decode step with state, :mod:`exporters.decode`) and ``report.json``.

Everything here comes from the study's storage, not from the local run folder: each trial's
concrete spec is its ``spec_yaml`` user attribute (the folder's ``trials/<n>/spec.yaml`` is
the fallback for studies written before it was stored). Only the best trial's weights are
local files: when another machine trained it (its ``archir:host`` system attribute), ``best/``
gets ``spec.yaml`` and ``report.json``, the report names that host, and the export is
skipped — the search still finishes normally.

When a search optimizes or constrains ``latency_ms``, every front member is **re-measured**
before it is reported (:func:`searchers.latency.remeasure_all`: measured, never predicted,
with the full harness, on the trial's trained weights where the run folder holds them — what
``best/model.onnx`` ships; ``latency.weights`` says ``trained`` or ``initial``): its row
carries the re-measured value in ``values.latency_ms``, the search-time value in
``values.latency_ms_search`` and the measurement record in ``latency``; members that now
break a latency constraint, or that the re-measured values show to be dominated by another
member, leave the front.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from archir.errors import ArchirError, SearchError
from archir.paths import inside, write_text
from searchers.config import SearchConfig, SearchResult
from searchers.ladder import rungs_of, top_rung_trials
from searchers.objectives import PRE_TRAINING, Constraint, Objective, feasible, trial_attrs
from searchers.storage import ATTR_HOST, HOST, open_storage


def dominates(a: Sequence[float], b: Sequence[float], directions: Sequence[str]) -> bool:
    """True when ``a`` is at least as good as ``b`` everywhere and better somewhere."""
    better = False
    for x, y, d in zip(a, b, directions):
        if d == "maximize":
            x, y = -x, -y
        if x > y:
            return False
        if x < y:
            better = True
    return better


def pareto_front(points: Sequence[Sequence[float]], directions: Sequence[str]) -> list[int]:
    """Indices of the non-dominated points (duplicates of a front point are all kept)."""
    return [
        i
        for i, p in enumerate(points)
        if not any(dominates(q, p, directions) for j, q in enumerate(points) if j != i)
    ]


def hypervolume_2d(
    points: Sequence[Sequence[float]], directions: Sequence[str], ref: Sequence[float]
) -> float:
    """Area dominated by ``points`` up to the reference point ``ref`` (two objectives)."""
    pts = []
    for p in points:
        q = [(-v if d == "maximize" else v) for v, d in zip(p, directions)]
        r = [(-v if d == "maximize" else v) for v, d in zip(ref, directions)]
        if q[0] < r[0] and q[1] < r[1]:
            pts.append(q)
    if not pts:
        return 0.0
    r = [(-v if d == "maximize" else v) for v, d in zip(ref, directions)]
    pts.sort()
    area, best_y = 0.0, r[1]
    for i, (x, y) in enumerate(pts):
        nx = pts[i + 1][0] if i + 1 < len(pts) else r[0]
        best_y = min(best_y, y)
        area += (nx - x) * (r[1] - best_y)
    return area


def trial_row(
    t: FrozenTrial,
    objectives: list[Objective],
    constraints: list[Constraint],
    remeasured: dict[int, dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """One trial as a ``pareto.json`` row (``remeasured``: trial number -> latency record)."""
    a = trial_attrs(t)
    vals = dict(a.get("values", {}))
    rec = (remeasured or {}).get(t.number)
    if rec is not None:
        vals["latency_ms_search"] = vals.get("latency_ms")
        vals["latency_ms"] = float(rec["ms"])
    row: dict[str, Any] = {
        "trial": t.number,
        "state": t.state.name,
        "status": a.get("status", t.state.name.lower()),
        "spec": a.get("spec", f"trials/{t.number}/spec.yaml"),
        "objectives": {o.metric: vals.get(o.metric) for o in objectives},
        "constraints": {
            c.metric: {
                "expr": c.text,
                "value": vals.get(c.metric),
                "ok": c.metric in vals and c.ok(float(vals[c.metric])),
            }
            for c in constraints
        },
        "values": vals,
        "params": dict(t.params),
    }
    if a.get("steps") is not None:
        row["steps"] = a["steps"]  # optimizer steps it was trained and evaluated at
    if a.get("rungs"):
        row["rung"] = a.get("rung")
        row["rungs"] = [
            {
                "rung": r.get("rung"),
                "steps": r.get("steps"),
                **r.get("values", {}),
                **r.get("se", {}),
            }
            for r in a["rungs"]
        ]
        if a.get("continue_of") is not None:
            row["continue_of"] = a["continue_of"]
    se = {k: v for k, v in vals.items() if k.endswith("_se")}
    if se:
        row["noise"] = se
    if a.get("reason"):
        row["reason"] = a["reason"]
    if a.get("duplicate_of") is not None:
        row["duplicate_of"] = a["duplicate_of"]
    if rec is not None:
        row["latency"] = {**rec, "remeasured": True}
    return row


def trial_spec_text(t: FrozenTrial, run_dir: Path) -> tuple[str, str]:
    """Trial ``t``'s concrete spec as YAML text and where it came from: the storage (its
    ``spec_yaml`` attribute), else ``run_dir/trials/<n>/spec.yaml``.

    Raises:
        SearchError: neither is there (naming the trial and the host it ran on).
    """
    a = trial_attrs(t)
    text = a.get("spec_yaml")
    if isinstance(text, str):
        return text, f"trial {t.number} (storage)"
    path = run_dir / str(a.get("spec", f"trials/{t.number}/spec.yaml"))
    try:
        return inside(run_dir, path).read_text(encoding="utf-8"), str(path)
    except OSError as exc:
        raise SearchError(
            f"trial {t.number}: no concrete spec in the storage nor in {path} ({exc.strerror})",
            hint="it ran on host " + str(t.system_attrs.get(ATTR_HOST, "?")),
        ) from None


def trial_spec(t: FrozenTrial, run_dir: Path) -> Any:
    """Trial ``t``'s concrete :class:`~archir.spec.loader.Spec` (:func:`trial_spec_text`).

    Raises:
        ArchirError: it is missing or invalid.
    """
    from archir.spec.loader import spec_from_text

    text, where = trial_spec_text(t, run_dir)
    return spec_from_text(text, file=where)


def trial_weights(t: FrozenTrial, run_dir: Path) -> tuple[int, Path]:
    """The trial whose training produced ``t``'s model (``t`` itself, or the trial it
    repeated: its ``duplicate_of`` attribute) and that trial's weights file in ``run_dir``
    (which may not exist: pruned, never trained, or trained on another host)."""
    src = trial_attrs(t).get("duplicate_of")
    n = t.number if src is None else int(src)
    return n, run_dir / "trials" / str(n) / "model.safetensors"


def trained_model(spec: Any, weights: Path, run_dir: Path) -> Any:
    """``spec`` compiled with the trained ``weights`` (a safetensors file inside
    ``run_dir``), in eval mode.

    Raises:
        ArchirError: the file lies outside ``run_dir``; whatever safetensors raises for a
            file that is torn or does not fit the spec.
    """
    from safetensors.torch import load_model

    from archir.compiler import compile as compile_spec

    model = compile_spec(spec, seed=0)
    load_model(model, str(inside(run_dir, weights)))
    return model.eval()


def _vector(
    t: FrozenTrial, objectives: list[Objective], remeasured: dict[int, dict[str, Any]]
) -> list[float]:
    rec = remeasured.get(t.number)
    return [
        float(rec["ms"]) if rec is not None and o.metric == "latency_ms" else float(v)
        for o, v in zip(objectives, t.values)
    ]


def remeasure_front(
    cfg: SearchConfig,
    front: list[FrozenTrial],
    objectives: list[Objective],
    constraints: list[Constraint],
    say: Callable[[str], None],
) -> tuple[list[FrozenTrial], dict[int, dict[str, Any]]]:
    """Re-measure the latency of each front member (module docstring); return the front
    that survives and the records by trial number."""
    from searchers.latency import remeasure_all

    used = {o.metric for o in objectives} | {c.metric for c in constraints}
    if "latency_ms" not in used or not front:
        return front, {}
    run_dir = Path(cfg.run_dir)
    lat, seq = cfg.section.latency, cfg.train_section.seq_len
    specs: dict[int, Any] = {}
    models: dict[int, Any] = {}
    for t in front:
        try:
            specs[t.number] = trial_spec(t, run_dir)
        except (ArchirError, OSError) as exc:
            say(f"trial {t.number}: latency not re-measured ({exc}); search-time value kept")
            continue
        # with the weights that ship: a trained model can run slower than a freshly
        # initialized one (routing, tiny values), and best/model.onnx is the trained one
        _, weights = trial_weights(t, run_dir)
        if weights.is_file():
            try:
                models[t.number] = trained_model(specs[t.number], weights, run_dir)
            except Exception as exc:  # noqa: BLE001 - a torn file: measure the initial weights
                say(f"trial {t.number}: trained weights not loaded ({exc}); re-measured at init")
    out, errors = remeasure_all(specs, lat, seq, models)
    for n, rec in out.items():
        rec["weights"] = "trained" if n in models else "initial"
    for n, msg in errors.items():
        say(f"trial {n}: latency not re-measured ({msg}); search-time value kept")
    lat_cons = [c for c in constraints if c.metric == "latency_ms"]
    kept = [
        t
        for t in front
        if t.number not in out or all(c.ok(float(out[t.number]["ms"])) for c in lat_cons)
    ]
    for t in front:
        if t not in kept:
            say(
                f"trial {t.number} left the front: re-measured latency "
                f"{out[t.number]['ms']:.3g} ms breaks " + ", ".join(c.text for c in lat_cons)
            )
    idx = pareto_front(
        [_vector(t, objectives, out) for t in kept], [o.direction for o in objectives]
    )
    survivors = [kept[i] for i in idx]
    say(
        f"re-measured the latency of {len(out)} front member(s): "
        + ", ".join(f"trial {n} {r['ms']:.3g} ms" for n, r in out.items())
    )
    return survivors, out


def front_trials(trials: list[FrozenTrial], objectives: list[Objective]) -> list[FrozenTrial]:
    ok = [t for t in trials if feasible(t) and t.values is not None]
    ok = [t for t in ok if all(math.isfinite(v) for v in t.values)]
    idx = pareto_front([t.values for t in ok], [o.direction for o in objectives])
    front = [ok[i] for i in idx]
    # keep one member per distinct model (duplicates reuse results)
    seen: set[Any] = set()
    out = []
    for t in sorted(front, key=lambda t: (tuple(t.values), t.number)):
        key = trial_attrs(t).get("spec_hash", t.number)
        if key in seen:
            continue
        seen.add(key)
        out.append(t)
    return out


def plot_front(
    path: Path,
    trials: list[FrozenTrial],
    front: list[FrozenTrial],
    objectives: list[Objective],
    title: str,
    pool: list[FrozenTrial] | None = None,
    remeasured: dict[int, dict[str, Any]] | None = None,
) -> None:
    """Write the front as a PNG (matplotlib Agg): feasible points of the front's fidelity
    (``pool``: the top rung of a ladder) coloured, infeasible ones and those stopped at a
    lower rung grey; latency as in ``pareto.json`` (re-measured where it was)."""
    in_pool = {t.number for t in (trials if pool is None else pool)}
    again = remeasured or {}
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.5), dpi=110)
    m0 = objectives[0].metric
    if len(objectives) >= 2:
        m1 = objectives[1].metric

        def xy(t: FrozenTrial) -> tuple[float, float] | None:
            v = dict(trial_attrs(t).get("values", {}))
            if t.number in again:
                v["latency_ms"] = float(again[t.number]["ms"])
            if v.get(m0) is None or v.get(m1) is None:
                return None
            return float(v[m1]), float(v[m0])

        def shown(t: FrozenTrial) -> bool:
            return feasible(t) and t.number in in_pool

        lower = [p for t in trials if feasible(t) and not shown(t) for p in [xy(t)] if p]
        grey = [p for t in trials if not feasible(t) for p in [xy(t)] if p]
        ok = [p for t in trials if shown(t) for p in [xy(t)] if p]
        fr = sorted(p for t in front for p in [xy(t)] if p)
        for pts, style in (
            (grey, {"c": "0.75", "s": 18, "label": "infeasible / not finished"}),
            (
                lower,
                {"c": "tab:blue", "alpha": 0.25, "s": 14, "label": "stopped at a lower rung"},
            ),
            (ok, {"c": "tab:blue", "s": 22, "label": "feasible"}),
        ):
            if pts:
                ax.scatter([p[0] for p in pts], [p[1] for p in pts], **style)
        if fr:
            ax.plot(
                *zip(*fr), "o-", c="tab:red", ms=6, label="Pareto front", drawstyle="steps-post"
            )
        ax.set_xlabel(f"{m1} ({objectives[1].direction})")
        ax.set_ylabel(f"{m0} ({objectives[0].direction})")
    else:
        grey, ok = [], []
        for t in trials:
            v = trial_attrs(t).get("values", {}).get(m0)
            if v is None:
                continue
            (ok if feasible(t) else grey).append((t.number, float(v)))
        if grey:
            ax.scatter(
                [p[0] for p in grey],
                [p[1] for p in grey],
                c="0.75",
                s=18,
                label="infeasible / not finished",
            )
        if ok:
            ax.scatter([p[0] for p in ok], [p[1] for p in ok], c="tab:blue", s=22, label="feasible")
        if front:
            ax.scatter(
                [t.number for t in front],
                [t.values[0] for t in front],
                c="tab:red",
                s=50,
                label="best",
            )
        ax.set_xlabel("trial")
        ax.set_ylabel(f"{m0} ({objectives[0].direction})")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def export_best(best_dir: Path, spec: Any, model: Any) -> dict[str, Any]:
    """Write ``best_dir/model.onnx`` at the precision the searched ``bits`` select
    (``precision="auto"``: int8 / int4 MatMul for 8- / 4-bit blocks, fp32 elsewhere — the
    graph whose size the search constrained and whose latency ``runtime: ort`` timed). The
    fp32 graph passes the parity gate first; the quantized file's deviation and task quality
    beside PyTorch's are reported (``quantized_parity``, ``quality``), not gated."""
    from exporters import export_onnx

    report = export_onnx(spec, best_dir / "model.onnx", model=model, precision="auto", check=True)
    out: dict[str, Any] = report.to_dict()
    return out


def describe_export(rep: dict[str, Any]) -> str:
    """One line for the run log: the blocks' precisions and, for a quantized file, its task
    quality beside PyTorch's."""
    from exporters.quantize import precision_counts

    line = precision_counts(rep.get("block_precision") or {})
    q = rep.get("quality")
    if q:
        line += f"; {q['metric']} onnx {q['onnx']:.4g} vs torch {q['torch']:.4g}"
    return line


def export_decode_best(best_dir: Path, spec: Any, model: Any) -> dict[str, Any]:
    """Write ``best_dir/decode.onnx``, the decode step of a language model, at the precision
    the searched ``bits`` select (``precision="auto"``, as ``model.onnx``: the graph whose
    ``decode_ms_per_token`` a ``runtime: ort`` search timed). The fp32 decode graph passes
    the parity gate token by token against PyTorch's forward; the written graph's deviation
    (``quantized_parity``: max abs logit error; ``top1_agreement``) is reported, not gated.
    ``{"error": ...}`` when it cannot be made (a bidirectional mixer, an export or parity
    failure), which does not fail the search."""
    from exporters.decode import export_decode

    t0 = time.perf_counter()
    try:
        rep = export_decode(spec, best_dir / "decode.onnx", model=model, precision="auto")
    except ArchirError as exc:
        return {"error": str(exc)}
    q = rep.quantized_parity
    return {
        "path": rep.path,
        "exporter": rep.exporter,
        "states": len(rep.states),
        "parity": rep.parity.to_dict() if rep.parity is not None else None,
        "precision": rep.precision,
        "block_precision": rep.block_precision,
        "quantized_parity": q.to_dict() if q is not None else None,
        "top1_agreement": rep.top1_agreement,
        "file_bytes": rep.file_bytes,
        "fp32_bytes": rep.fp32_bytes,
        "wall_s": time.perf_counter() - t0,
    }


def describe_decode_export(rep: dict[str, Any]) -> str:
    """One line for the run log: the decode graph's block precisions and, for a quantized
    graph, its max abs logit error and top-1 agreement beside PyTorch's."""
    line = describe_export(rep)
    q, top1 = rep.get("quantized_parity"), rep.get("top1_agreement")
    if q and any(v != "fp32" for v in (rep.get("block_precision") or {}).values()):
        line += f"; max |logit error| {q['max_abs_err']:.3g}"
        if top1 is not None:
            line += f", top-1 agreement {top1:.3f}"
    return line


def _write_best(
    run_dir: Path,
    trials: list[FrozenTrial],
    best_t: FrozenTrial,
    objectives: list[Objective],
    constraints: list[Constraint],
    remeasured: dict[int, dict[str, Any]],
    cfg: SearchConfig,
    export: bool,
    say: Callable[[str], None],
) -> dict[str, Any]:
    """``best/``: the best trial's spec and report (from the storage), its weights and ONNX
    export when they are on this machine."""
    from archir.spec.loader import spec_from_text

    bdir = run_dir / "best"
    if bdir.is_symlink():
        bdir.unlink()  # a link: removed, never followed
    elif bdir.exists():
        shutil.rmtree(inside(run_dir, bdir))
    bdir.mkdir()
    text, where = trial_spec_text(best_t, run_dir)
    write_text(bdir / "spec.yaml", text)
    bspec = spec_from_text(text, file=where)
    best = trial_row(best_t, objectives, constraints, remeasured)
    src_n, weights = trial_weights(best_t, run_dir)
    src_t = next((t for t in trials if t.number == src_n), best_t)
    host = src_t.system_attrs.get(ATTR_HOST)
    cost_only = cfg.section.fidelity.kind == "cost"
    trained = not cost_only and any(
        m not in PRE_TRAINING
        for m in [o.metric for o in objectives] + [c.metric for c in constraints]
    )
    if weights.is_file():
        inside(run_dir, weights)
        shutil.copyfile(weights, bdir / "model.safetensors")  # normal mode, not the source's
    elif trained:
        where = (
            f"on host {host} (its run folder's trials/{src_n}/model.safetensors)"
            if host is not None and host != HOST
            else f"not in {weights.parent} (trial {src_n} ran on host {host or '?'})"
        )
        msg = f"the weights of trial {src_n} are {where}: best/ has its spec and report only"
        best["weights"] = {"trial": src_n, "host": host, "here": False}
        say(msg + (", export skipped" if export else ""))
        if export:
            best["export"] = {"skipped": msg}
    if export and weights.is_file():
        model = trained_model(bspec, weights, run_dir)
        t0 = time.perf_counter()
        try:
            best["export"] = export_best(bdir, bspec, model)
            best["export"]["wall_s"] = time.perf_counter() - t0
            say(
                f"exported {bdir / 'model.onnx'} (fp32 graph parity-checked; shipped at "
                f"{describe_export(best['export'])})"
            )
            used = {o.metric for o in objectives} | {c.metric for c in constraints}
            if "latency_ms" in used:
                _shipped_latency(best, bdir / "model.onnx", bspec, cfg, say)
            if bspec.model.model.task == "causal_lm":
                best["decode_export"] = export_decode_best(bdir, bspec, model)
                if "error" in best["decode_export"]:
                    say(f"no decode graph: {best['decode_export']['error']}")
                else:
                    say(
                        f"exported {bdir / 'decode.onnx'} (decode step, fp32 graph parity "
                        f"checked; shipped at {describe_decode_export(best['decode_export'])})"
                    )
        except ModuleNotFoundError as exc:
            best["export"] = {"error": f"exporters unavailable: {exc}"}
            say(f"no ONNX export: {exc}")
        except ArchirError as exc:  # e.g. ExportError on a parity failure
            best["export"] = {"error": str(exc)}
            say(f"ONNX export failed: {exc}")
    elif export and not trained:
        why = "fidelity cost" if cost_only else "no objective or constraint needs training"
        best["export"] = {"skipped": f"no trained weights ({why})"}
    write_text(bdir / "report.json", json.dumps(best, indent=2, default=str))
    return best


def _shipped_latency(
    best: dict[str, Any], path: Path, spec: Any, cfg: SearchConfig, say: Callable[[str], None]
) -> None:
    """``best["shipped_latency"]``: ``model.onnx`` timed on onnxruntime at the search's
    latency shape (:func:`searchers.latency.shipped_latency`), said beside the value the
    search ranked by when that was another runtime; an error is recorded, not raised."""
    from searchers.latency import shipped_latency

    lat = cfg.section.latency
    try:
        rec = shipped_latency(path, spec, lat, cfg.train_section.seq_len)
    except ArchirError as exc:
        best["shipped_latency"] = {"error": exc.message}
        say(f"model.onnx latency not measured: {exc.message}")
        return
    best["shipped_latency"] = rec
    searched = (best.get("values") or {}).get("latency_ms")
    also = (
        f"; the search ranked by {float(searched):.3f} ms on {lat.runtime}"
        if searched is not None and lat.runtime != "ort"
        else ""
    )
    say(
        f"model.onnx runs in {rec['ms']:.3f} ms on onnxruntime at its shipped precision "
        f"(batch {rec['batch']}, seq {rec['seq']}, {lat.threads} thread(s){also})"
    )


def _fidelity_doc(cfg: SearchConfig, trials: list[FrozenTrial], top: int | None) -> dict[str, Any]:
    """``pareto.json``'s ``fidelity``: the kind, and on a ladder its rungs, how many
    distinct models reached each, and the rung (and steps) the front was taken at."""
    from searchers.config import ladder_rungs

    kind = cfg.section.fidelity.kind
    if kind != "ladder":
        return {
            "kind": kind,
            "steps": cfg.train_section.steps if kind == "full" else cfg.section.fidelity.steps,
        }
    rungs = ladder_rungs(cfg)
    reached: dict[int, set[Any]] = {}
    for t in trials:
        for r in rungs_of(t):
            reached.setdefault(int(r["rung"]), set()).add(trial_attrs(t).get("spec_hash"))
    return {
        "kind": kind,
        "rungs": rungs,
        "eta": cfg.section.fidelity.eta,
        "models_per_rung": [len(reached.get(k, ())) for k in range(len(rungs))],
        "rung": top,
        "steps": rungs[top] if top is not None else None,
    }


def finalize(
    cfg: SearchConfig,
    objectives: list[Objective],
    constraints: list[Constraint],
    *,
    export: bool = True,
    say: Callable[[str], None] = print,
) -> SearchResult:
    """Write ``pareto.json``, ``pareto.png`` and ``best/``; drop weights of trials off the
    front; return the :class:`~searchers.run.SearchResult`. Reads everything but the best
    trial's weights from the storage (module docstring).

    Raises:
        PathError: ``best/`` or a trial folder leads outside the run folder (a link).
    """
    run_dir = Path(cfg.run_dir)
    storage = open_storage(
        cfg.storage_url, cfg.journal, cfg.heartbeat_interval, cfg.grace_period, say=say
    )
    study = optuna.load_study(study_name=cfg.study_name, storage=storage)
    trials = study.get_trials(deepcopy=False)
    pool, top = top_rung_trials(trials)  # a front compares models at one fidelity
    front = front_trials(pool, objectives)
    front, remeasured = remeasure_front(cfg, front, objectives, constraints, say)
    states: dict[str, int] = {}
    for t in trials:
        key = (
            trial_attrs(t).get("status", t.state.name.lower())
            if t.state != TrialState.RUNNING
            else "running"
        )
        states[key] = states.get(key, 0) + 1
    rows = [trial_row(t, objectives, constraints, remeasured) for t in front]
    fid = _fidelity_doc(cfg, trials, top)
    best_t = front[0] if front else None
    if front:
        sign = 1.0 if objectives[0].direction == "minimize" else -1.0
        best_t = sorted(front, key=lambda t: sign * _vector(t, objectives, remeasured)[0])[0]
    doc = {
        "study": cfg.study_name,
        "objectives": {o.metric: o.direction for o in objectives},
        "constraints": {c.metric: c.text for c in constraints},
        "n_trials": len(trials),
        "states": states,
        "fidelity": fid,
        "front": rows,
        "best": best_t.number if best_t else None,
        "trials": [trial_row(t, objectives, constraints, remeasured) for t in trials],
    }
    write_text(run_dir / "pareto.json", json.dumps(doc, indent=2, default=str))
    title = f"{cfg.study_name}: {len(trials)} trials"
    if top is not None:
        title += f"; front at rung {top} ({fid.get('steps')} steps)"
    plot_front(run_dir / "pareto.png", trials, front, objectives, title, pool, remeasured)
    # weights: keep the front's only; ladder checkpoints are not needed any more (a
    # promotion in a resumed search retrains from step 0, to the same numbers)
    keep = {t.number for t in front}
    for t in trials:
        tdir = run_dir / "trials" / str(t.number)
        w = tdir / "model.safetensors"
        if t.number not in keep and w.is_file() and not w.is_symlink():
            inside(run_dir, w).unlink()
        ck = tdir / "ladder"
        if ck.is_dir() and not ck.is_symlink():
            shutil.rmtree(inside(run_dir, ck))
    best: dict[str, Any] | None = None
    if best_t is not None:
        best = _write_best(
            run_dir, trials, best_t, objectives, constraints, remeasured, cfg, export, say
        )
    return SearchResult(
        run_dir=run_dir,
        study_name=cfg.study_name,
        storage=cfg.storage_url or str(cfg.journal),
        n_trials=len(trials),
        states=states,
        front=rows,
        best=best,
        wall_s=0.0,
    )
