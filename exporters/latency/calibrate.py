"""Calibration: measure a designed set of parts and specs on this machine, store it, load it.

A calibration file is JSON (``format: archir-latency-calibration``, ``version``) holding the
**key** it is valid for — CPU model and logical CPU count, runtime (``ort``/``torch``) and its
version, intra-op threads — and the raw samples: ``specs`` (concrete spec data), ``parts``
(spec index, IR node name or ``"fixed"``, batch, seq, ``ms`` = the fastest call, best window
median, median, CV, runs, each window's median and fastest call), ``wholes`` (spec
index, batch, seq, the same statistics) and ``shared`` (shared subgraph key, seq, the fastest
call; absent in files written before 2026-11-29: nothing is then shared), and the predictor's uncertainty ``band`` fitted on
those samples (:func:`band_record`: its ``log`` bounds and the samples' hash). The predictor
(:class:`~.predictor.LatencyPredictor`) is refitted from the samples on load (a few seconds;
the band is refitted too, about 6 s more, only when the stored one was fitted on other
samples), so the file stays readable, diffable and free of pickles. Loading a file whose key
differs from the machine/runtime/threads asked for raises :class:`CalibrationMismatchError`;
a file of another format version raises :class:`CalibrationFormatError`.

The design (:func:`calibrate`) covers the search spaces: concrete specs drawn from every
space in ``specs/search/`` (plus extra space files), :data:`CANDIDATES` per turn of which
the one whose kinds are measured least is kept, with its width replaced by the level of
:data:`WIDTHS` (64-512) its least-measured kinds have been measured least at
(:class:`WidthCoverage`) and measured at a length cycling through :data:`SEQS` (64-1024). It
runs batch by batch. **Prepare**: every **part** of a drawn spec (a residual block, or the
fixed embedding/final-norm/head part) not prepared before is exported alone through the one
export path (:func:`exporters.graph.part_graph`: the shipped file's exporter and dynamic
length, at the precision the part's ``bits`` ship as) and loaded into a session, measured at
its own length and at up to :data:`EXTRA_SEQS` other lengths of :data:`SEQS` (one export,
several samples; every designed spec's ``max_seq_len`` is raised to the longest of
:data:`SEQS` so they can be any of them); while whole specs have taken less than
``whole_share`` of the export time, so is a whole spec (the graph ``archir export
--precision auto`` writes, at its length and its parts' other lengths) — two in three
(:data:`WHOLE_NATIVE`) drawn apart at the width their space draws, so the composition is
fitted where searches draw — until a batch (about a hundred samples, a few GB of sessions at
most) is ready. The exports run in up to :data:`EXPORT_WORKERS` spawned processes
(:func:`export_job`; one per CPU at the calibrated thread count), which write the graphs
into the batch's temporary folder while this process loads them; a process that dies fails
only the export it held. **Measure** (no export running): the batch in ``rounds``
round-robin windows (:func:`~.harness.measure_interleaved`) — with the speed probe
(:class:`~.harness.SpeedProbe`) timed every round, and more rounds (up to three times as
many) while fewer than two rounds ran at the probe's fastest speed so far, so a slow phase
longer than a batch does not go into the samples; then the next batch, while the budget
allows (a batch's newest samples whose rounds would not fit in the budget left are dropped,
counted as ``skipped["budget"]``). The probe's fastest time is stored (``probe_ms``) for
later measurements to compare against; a sample's value is its fastest call (``min_ms``, see
:mod:`.harness` on why). Last, the **shared subgraphs** (:func:`measure_shared`, at most
:data:`SHARED_S` of the budget): RetNet's decay matrix, which onnxruntime builds once for
every RetNet layer of the same heads and convention in a whole graph, is exported and timed
alone at :data:`SHARED_SEQS` for every such key of the designed specs (``shared``), so the
predictor prices a later layer's part without it. Interleaving matters on a shared machine: a slow phase of a few
seconds then costs every sample one window, instead of costing a few samples their whole
measurement. A part takes one to a few seconds to export through torch.export (a Mamba block
over ten: its dynamic-length scan makes torch.export reason about many symbolic shapes), so
the default 18-minute budget (:data:`DEFAULT_BUDGET_S`) covers a few hundred part samples
and 20-odd whole specs at up to three lengths each (the main job's calibration on the
2-core VM of session 26: 529 part samples and 66 samples of 22 whole specs in 1,097.8 s).

Files live in ``$ARCHIR_CACHE/latency/`` (default ``~/.cache/archir/latency/``) named
``<runtime>-t<threads>-<cpu slug>.json``.
"""

from __future__ import annotations

import copy
import datetime as _dt
import hashlib
import json
import math
import os
import platform
import random
import re
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, wait
from concurrent.futures.process import BrokenProcessPool
from contextlib import ExitStack
from functools import lru_cache
from pathlib import Path
from typing import Any, cast

from exporters.latency.harness import (
    DEFAULT_THREADS,
    INTERLEAVED_ROUNDS,
    INTERLEAVED_WINDOW_S,
    LatencyError,
    Runner,
    RuntimeUnavailableError,
    SpeedProbe,
    time_limit,
)
from exporters.latency.predictor import (
    COMPOSITION_VERSION,
    FEATURE_VERSION,
    FIXED,
    GraphFeatures,
    LatencyPredictor,
    PartFeatures,
    graph_features,
    shared_elements,
    shared_key,
)

FORMAT = "archir-latency-calibration"
#: 4: parts and wholes measured on the shipped graph (exporters.graph), at their precision;
#: 5: timed by the harness's clock (one thread: the calling thread's CPU time);
#: 6: a sample's ``ms`` is its fastest call over 20 interleaved rounds (was: the fastest
#: window's median over 5); 7: Hyena's exported long convolution is a factorised DFT past
#: 320 positions in models longer than that (``archir.blocks.conv.causal_conv_export``);
#: 8: that DFT computes half the spectrum and runs channels last, and takes over past 128;
#: 9: Gated DeltaNet's 1×1 inverse blocks are products, causal attention's mask is one
#: Trilu (both graphs changed); Hyena's DFT runs three stages past 1,024 positions;
#: 10: causal attention past 192 positions scores its queries in 8 chunks (16 past 1,024)
#: (``archir.blocks.attention.causal_attention``); 11: GLA's exported carry between chunks
#: is a Mul and a MatMul (was Expand, Where and an Einsum) and one MatMul places the pairs
#: within a sub-chunk (was a 7-D Mul with eye): 8 % of the graph at 1,024; 12: RetNet's
#: decay is a Trilu of exp(max(t - s, 0)·log γ) (was a broadcast Where over [H, T, T]); the
#: width design counts each kind's knob values apart; 13: causal attention's chunks slice
#: their mask from one [T/n, T] band (was a [T, T] mask built per layer), 32 chunks past
#: 2,048 positions; 14: every designed spec's max_seq_len reaches 1,024, so the extra
#: lengths of a sample span all of SEQS (they were mostly 256 or shorter); 15: the width
#: design fills each kind's least-measured width first and keeps, of :data:`CANDIDATES`
#: draws, the spec whose kinds are measured least (Hyena was never measured at 64-96);
#: 16: two of every three whole specs keep the width their space draws (:data:`WHOLE_NATIVE`)
VERSION = 16
#: specs drawn per turn of the calibration design, of which :meth:`WidthCoverage.choose`
#: keeps one
CANDIDATES = 3
#: (a, b): a of every b whole specs are drawn apart, keeping the width their space draws
#: (below WIDTHS: the width design's), so the composition stage is fitted on specs like
#: those searches draw (d_model 64-128 in ``specs/search/hybrid-lm*.yaml``); the others are
#: the width design's draw. With every whole from the width design, 8 of the dozen whole
#: specs a calibration affords sat at d_model 192-512 and 2 at 16 (session 23's).
WHOLE_NATIVE = (2, 3)
WIDTHS = (64, 96, 128, 192, 256, 320, 384, 448, 512)
#: 64 is the main job's latency shape (``specs/search/hybrid-lm-quick.yaml``): below 128 its
#: models were all predicted by extrapolation (session 15: Kendall tau 0.86-0.89 against the
#: shipped latency without 64, 0.91-0.93 with it, ``benchmarks/screen_fidelity.py``)
SEQS = (64, 128, 192, 256, 384, 512, 768, 1024)
DEPTH = (2, 12)
BITS = (4, 8, 16)
#: seconds a calibration runs by default (``archir latency calibrate``; the main job's
#: middle step; once per machine). 540 s until session 26: it affords 14-16 whole specs,
#: and the composition's level learned from so few moved by several percent between
#: calibrations. On two new seeds, five 540 s-sized calibrations (thirds and halves of
#: longer ones) put 87.8 % of specs within ±10 % on average (75-100 % each), four 1,080
#: s-sized ones 96.9 % (92.5-100 %) (benchmarks/README.md, "A longer calibration").
DEFAULT_BUDGET_S = 1080.0


class CalibrationError(LatencyError):
    """A calibration file cannot be used."""


class CalibrationMismatchError(CalibrationError):
    """The calibration file was made on another machine, runtime, version or thread count."""


class CalibrationFormatError(CalibrationError):
    """The file is not a calibration file of this format version."""


class NotACalibrationError(CalibrationFormatError):
    """The file reads as JSON but is not an archir latency calibration at all (somebody
    else's file: never replaced by ``archir latency calibrate --if-missing``)."""


class CalibrationMissingError(CalibrationError):
    """No calibration file matches this machine/runtime/threads."""


# --------------------------------------------------------------------------------------
# keys and files


def cpu_model() -> str:
    """The CPU model name (``/proc/cpuinfo``'s ``model name``, else ``platform``)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def runtime_version(runtime: str) -> str:
    if runtime == "ort":
        import onnxruntime

        return str(onnxruntime.__version__)
    import torch

    return str(torch.__version__)


def machine_key(runtime: str = "ort", threads: int = DEFAULT_THREADS) -> dict[str, Any]:
    """What a calibration is valid for: cpu, cpus, runtime, runtime_version, threads."""
    return {
        "cpu": cpu_model(),
        "cpus": os.cpu_count() or 1,
        "runtime": runtime,
        "runtime_version": runtime_version(runtime),
        "threads": int(threads),
    }


def cache_dir() -> Path:
    """``$ARCHIR_CACHE/latency`` or ``~/.cache/archir/latency``."""
    base = os.environ.get("ARCHIR_CACHE")
    root = Path(base) if base else Path.home() / ".cache" / "archir"
    return root / "latency"


def default_path(runtime: str = "ort", threads: int = DEFAULT_THREADS) -> Path:
    slug = re.sub(r"[^a-z0-9]+", "-", cpu_model().lower()).strip("-") or "cpu"
    return cache_dir() / f"{runtime}-t{int(threads)}-{slug}.json"


def save_calibration(data: dict[str, Any], path: str | Path) -> Path:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=False))
    tmp.replace(p)
    return p


def check_key(found: dict[str, Any], expected: dict[str, Any], path: str | Path) -> None:
    """Raise :class:`CalibrationMismatchError` naming every differing field."""
    diffs = [
        f"{k}: file has {found.get(k)!r}, this run needs {v!r}"
        for k, v in expected.items()
        if found.get(k) != v
    ]
    if diffs:
        raise CalibrationMismatchError(
            f"calibration {path} does not match: " + "; ".join(diffs),
            hint=(
                f"run `archir latency calibrate --runtime {expected.get('runtime')} "
                f"--threads {expected.get('threads')}` on this machine, or measure instead "
                "of predicting"
            ),
        )


def load_calibration(
    path: str | Path, *, runtime: str | None = None, threads: int | None = None
) -> dict[str, Any]:
    """Read a calibration file and check it against this machine.

    Args:
        path: the JSON file.
        runtime, threads: what the caller will predict for (default: the file's own).

    Raises:
        CalibrationFormatError: unreadable or another version; NotACalibrationError (a
            CalibrationFormatError): JSON of another format.
        CalibrationMismatchError: another CPU, runtime, runtime version or thread count.
    """
    p = Path(path)
    try:
        data = json.loads(p.read_text())
    except (OSError, ValueError) as exc:
        raise CalibrationFormatError(
            f"cannot read calibration {p}: {exc}", hint="run `archir latency calibrate`"
        ) from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise NotACalibrationError(
            f"{p} is not an archir latency calibration file",
            hint="run `archir latency calibrate`",
        )
    if data.get("version") != VERSION:
        raise CalibrationFormatError(
            f"calibration {p} has format version {data.get('version')}, this archir reads "
            f"version {VERSION}",
            hint="re-run `archir latency calibrate`",
        )
    key = data.get("key") or {}
    rt = runtime or key.get("runtime", "ort")
    th = int(threads if threads is not None else key.get("threads", DEFAULT_THREADS))
    check_key(key, machine_key(rt, th), p)
    return data


def find_calibration(runtime: str = "ort", threads: int = DEFAULT_THREADS) -> Path | None:
    """The default calibration path for this machine/runtime/threads if it exists."""
    p = default_path(runtime, threads)
    return p if p.exists() else None


def _samples_json(data: dict[str, Any]) -> str:
    payload = {k: data.get(k, []) for k in ("specs", "parts", "wholes")}
    if data.get("shared"):  # files before the shared subgraphs keep their stored band
        payload["shared"] = data["shared"]
    return json.dumps(payload, sort_keys=True)


def shared_samples(data: dict[str, Any]) -> list[tuple[str, float, float]]:
    """``(key, elements in millions, ms)`` of a calibration's ``shared`` samples (shared
    subgraphs measured alone: :func:`measure_shared`); malformed entries are skipped."""
    out = []
    for s in data.get("shared", []) or []:
        try:
            key, seq, ms = str(s["key"]), int(s["seq"]), float(s["ms"])
        except (KeyError, TypeError, ValueError):
            continue
        e = shared_elements(key, seq)
        if e > 0 and ms > 0:
            out.append((key, e, ms))
    return out


def _band_key(samples_json: str) -> str:
    """What a stored band was fitted on: the samples, the predictor's feature version and
    how it chooses its composition model."""
    h = hashlib.sha256(samples_json.encode())
    h.update(f"features {FEATURE_VERSION}".encode())
    h.update(f" composition {COMPOSITION_VERSION}".encode())
    return h.hexdigest()


def band_record(data: dict[str, Any]) -> dict[str, Any]:
    """The predictor's band for a calibration's samples, to store in its file (``band``):
    ``{"q": [log low, log high], "samples_sha256": ...}``. Fitting it refits the part
    stages once per fold (seconds); a file that carries it is loaded without."""
    samples = _samples_json(data)
    return {"q": list(_fit_cached(samples).band_q), "samples_sha256": _band_key(samples)}


def predictor_from(data: dict[str, Any]) -> LatencyPredictor:
    """Fit a predictor from a loaded calibration (cached per file content); the band is
    the file's stored one (``band``) when it was fitted on these samples."""
    samples = _samples_json(data)
    rec = data.get("band")
    if isinstance(rec, dict) and rec.get("samples_sha256") == _band_key(samples):
        q = rec.get("q")
        if isinstance(q, list) and len(q) == 2 and all(isinstance(v, int | float) for v in q):
            return _fit_cached(samples, (float(q[0]), float(q[1])))
    return _fit_cached(samples)


def samples_features(
    data: dict[str, Any], spreads: list[float] | None = None, groups: list[int] | None = None
) -> tuple[list[PartFeatures], list[float], list[GraphFeatures], list[float]]:
    """(part features, part ms, whole-spec features, whole ms) of a calibration's samples;
    samples whose spec no longer builds (a kind that changed) are skipped. ``spreads``, if
    given, receives each used whole sample's ``log(second-fastest window's fastest call /
    fastest call)`` (its measurement noise; 0 with fewer than two windows); ``groups``, if
    given, its spec's index."""
    from archir.ir import build_graph
    from archir.spec import spec_from_dict

    graphs: dict[int, Any] = {}
    feats: dict[tuple[int, int, int], GraphFeatures | None] = {}

    def gf(i: int, b: int, t: int) -> GraphFeatures | None:
        key = (i, b, t)
        if key not in feats:
            try:
                if i not in graphs:
                    graphs[i] = build_graph(spec_from_dict(data["specs"][i]))
                feats[key] = graph_features(graphs[i], b, t)
            except Exception:
                feats[key] = None
        return feats[key]

    parts, pms, wholes, wms = [], [], [], []
    for s in data.get("parts", []):
        g = gf(int(s["spec"]), int(s["batch"]), int(s["seq"]))
        part = next((p for p in g.parts if p.name == s["node"]), None) if g else None
        if part is not None:
            parts.append(part)
            pms.append(float(s["ms"]))
    for s in data.get("wholes", []):
        g = gf(int(s["spec"]), int(s["batch"]), int(s["seq"]))
        if g is not None:
            wholes.append(g)
            wms.append(float(s["ms"]))
            if groups is not None:
                groups.append(int(s["spec"]))
            if spreads is not None:
                w = sorted(float(x) for x in s.get("window_min_ms", []) if x > 0)
                spreads.append(math.log(w[1] / w[0]) if len(w) >= 2 else 0.0)
    return parts, pms, wholes, wms


@lru_cache(maxsize=8)
def _fit_cached(payload_json: str, band: tuple[float, float] | None = None) -> LatencyPredictor:
    spreads: list[float] = []
    groups: list[int] = []
    data = json.loads(payload_json)
    parts, pms, wholes, wms = samples_features(data, spreads, groups)
    if len(parts) < 3:
        raise CalibrationFormatError(
            "the calibration has fewer than 3 usable part samples",
            hint="re-run `archir latency calibrate` with a larger --budget-s",
        )
    return LatencyPredictor().fit(
        parts, pms, wholes, wms, spreads, groups, band, shared=shared_samples(data)
    )


# --------------------------------------------------------------------------------------
# the designed space


def _draw_params(rng: random.Random, kind: str, d_model: int) -> dict[str, Any]:
    """Draw values for the standard fields a kind declares (others keep their defaults)."""
    from archir import registry

    fields = registry.get(kind).params.model_fields
    out: dict[str, Any] = {}
    if "n_heads" in fields:
        heads = [h for h in (1, 2, 4, 8) if d_model % h == 0 and d_model // h >= 16]
        out["n_heads"] = rng.choice(heads or [1])
    if "d_state" in fields:
        out["d_state"] = rng.choice([8, 16, 32, 64])
    if "expansion" in fields:
        out["expansion"] = rng.choice([1.5, 2, 2.667, 3, 4])
    if "n_experts" in fields:
        out["n_experts"] = rng.choice([4, 8])
    if "top_k" in fields:
        out["top_k"] = rng.choice([1, 2])
    if "d_conv" in fields:
        out["d_conv"] = rng.choice([3, 4])
    if "window" in fields and rng.random() < 0.25:
        out["window"] = rng.choice([64, 128, 256])
    return out


def make_spec_data(
    rng: random.Random,
    token_mixer: str,
    channel_mixer: str,
    d_model: int,
    depth: int,
    max_seq: int,
    bits: float,
    second_mixer: str | None = None,
) -> dict[str, Any]:
    """Spec data of a causal LM from the built-in space (one group, or two for a hybrid)."""

    def layer(tm: str, repeat: int) -> dict[str, Any]:
        return {
            "repeat": repeat,
            "blocks": [
                {"role": "token_mixer", "kind": tm, **_draw_params(rng, tm, d_model)},
                {
                    "role": "channel_mixer",
                    "kind": channel_mixer,
                    "bits": bits,
                    **_draw_params(rng, channel_mixer, d_model),
                },
            ],
        }

    if second_mixer and depth >= 2:
        k = rng.randint(1, depth - 1)
        layers = [layer(token_mixer, k), layer(second_mixer, depth - k)]
    else:
        layers = [layer(token_mixer, depth)]
    return {
        "archir": 1,
        "name": f"lat-{token_mixer}-{channel_mixer}-d{d_model}-l{depth}",
        "model": {
            "task": "causal_lm",
            "vocab_size": 256,
            "d_model": d_model,
            "max_seq_len": max(1024, max_seq),
            "norm": "rmsnorm",
            "embed": {"kind": "token_embedding"},
            "layers": layers,
            "head": {"kind": "lm_head", "tie_embeddings": True},
        },
        "train": {"seq_len": min(max_seq, 1024)},
    }


def draw_from_space(space: Any, rng: random.Random, tries: int = 20) -> Any | None:
    """A random concrete spec from an open spec (``Spec.fix`` with random decisions),
    restricted to causal LMs of width ≤ 512; ``None`` when no draw builds."""
    from archir.ir import build_graph
    from archir.spec.space import random_decider

    for _ in range(tries):
        try:
            s = space.fix(random_decider(rng))
            m = s.model.model
            if m.task != "causal_lm" or m.d_model > 512:
                continue
            build_graph(s)
            return s
        except Exception:
            continue
    return None


# --------------------------------------------------------------------------------------
# running a calibration


def space_paths(extra: Sequence[str | Path] = ()) -> list[Path]:
    """The spaces calibration is designed on: ``specs/search/*.yaml`` plus ``extra``."""
    base = Path(__file__).resolve().parents[2] / "specs" / "search"
    paths = sorted(base.glob("*.y*ml")) if base.is_dir() else []
    return paths + [Path(p) for p in extra]


def load_spaces(paths: Sequence[str | Path]) -> list[Any]:
    """Open specs from ``paths`` (those that load and have decisions; others skipped)."""
    from archir.spec import load_spec

    out = []
    for p in paths:
        try:
            s = load_spec(p)
        except Exception:
            continue
        if s.nodes:
            out.append(s)
    return out


def _with(spec: Any, d_model: int | None, seq: int, max_seq: int = 0) -> Any:
    """The spec with ``d_model`` replaced (when given) and ``max_seq_len >= max(seq,
    max_seq)``."""
    from archir.ir import build_graph
    from archir.spec import spec_from_dict

    data = copy.deepcopy(spec.data)
    if d_model is not None:
        data["model"]["d_model"] = d_model
    data["model"]["max_seq_len"] = max(int(data["model"].get("max_seq_len", 0)), seq, max_seq)
    data.setdefault("train", {})["seq_len"] = seq
    data.pop("search", None)
    s = spec_from_dict(data)
    build_graph(s)
    return s


def space_specs(
    n: int,
    seed: int,
    spaces: Sequence[Any],
    *,
    widths: Sequence[int | None] | None = None,
    width_for: Callable[[Any], int | None] | None = None,
    seqs: Sequence[int] = SEQS,
    max_seq: int = 0,
    choose: Callable[[Sequence[Any]], tuple[Any, int | None]] | None = None,
    candidates: int = 1,
) -> Iterator[tuple[Any, int]]:
    """``n`` (concrete spec, seq) pairs drawn from the open specs ``spaces`` in turn (random
    decisions through ``Spec.fix``), ``seq`` cycling through shuffled ``seqs``; with
    ``widths``, ``d_model`` is replaced by levels cycling through them; with ``width_for``,
    by what it returns for the drawn spec (``None``: the width the space drew); with
    ``choose``, ``candidates`` specs are drawn from the space each turn and ``choose``
    returns the one kept and its width (:meth:`WidthCoverage.choose`). Each spec's
    ``max_seq_len`` is raised to ``seq`` and to ``max_seq``."""

    rng = random.Random(seed)

    def levels(xs: Sequence[Any]) -> Iterator[Any]:
        while True:
            ys = list(xs)
            rng.shuffle(ys)
            yield from ys

    s_it = levels(seqs)
    w_it = levels(widths) if widths else None
    made = tries = 0
    while made < n and tries < 20 * n + 100:
        tries += 1
        space = spaces[tries % len(spaces)]
        seq = next(s_it)
        d = next(w_it) if w_it else None
        if choose is not None:
            drawn = [draw_from_space(space, rng) for _ in range(max(candidates, 1))]
            pool = [c for c in drawn if c is not None]
            s, d = choose(pool) if pool else (None, None)
        else:
            s = draw_from_space(space, rng)
        if s is None:
            continue
        try:
            if width_for is not None and choose is None:
                d = width_for(s)
            s = _with(s, d, seq, max_seq)
        except Exception:
            continue
        made += 1
        yield s, seq


class WidthCoverage:
    """The calibration's width design: a drawn spec gets the level of :data:`WIDTHS` at
    which its least-measured kind (each at the precision it ships as) has the fewest
    prepared part exports so far — then the next least-measured, then the sum over its
    kinds with their knob values (:data:`~.predictor.KNOBS`) — so every kind is measured
    across the whole width range and not only at the widths of the few specs it happens to
    appear in. (A RetNet calibrated at d_model 256-512 alone was predicted at half its time
    at 96-128; one with 4 heads calibrated at d_model 96 and up was predicted 12-17 % fast at
    64-128; with the sum over kinds alone, kinds that appear in few specs — Hyena, in one
    spec in five — were left out at 64-96, the widths the search spaces draw most, and every
    held-out miss of the 2026-11-28 predictor was there.) One draw in ``native_every`` keeps
    the width its space drew (the search spaces' own widths, chosen at random). Ties go to
    a random level.

    Call it with a drawn spec (``space_specs(width_for=...)``), or give :meth:`choose`
    several (``space_specs(choose=..., candidates=...)``); :meth:`add` each prepared part.
    """

    def __init__(self, rng: random.Random, native_every: int = 4) -> None:
        self.count: dict[tuple[str, tuple[float, ...], int], int] = {}
        self.kind_count: dict[tuple[str, int], int] = {}
        self.rng = rng
        self.native_every = native_every

    def add(self, part: PartFeatures) -> None:
        key = (part.model_kind, part.knobs, part.d_model)
        self.count[key] = self.count.get(key, 0) + 1
        kw = (part.model_kind, part.d_model)
        self.kind_count[kw] = self.kind_count.get(kw, 0) + 1

    @staticmethod
    def _cells(spec: Any) -> set[tuple[str, tuple[float, ...]]]:
        return {
            (p.model_kind, p.knobs) for p in graph_features(spec, 1, 1).parts if p.kind != FIXED
        }

    def _native(self) -> bool:
        """One draw in ``native_every``, at random: keep the width the space drew."""
        return self.rng.randrange(self.native_every) == 0

    def _level(self, cells: set[tuple[str, tuple[float, ...]]]) -> int:
        kinds = {k for k, _ in cells}
        levels = list(WIDTHS)
        self.rng.shuffle(levels)

        def score(w: int) -> tuple[list[int], int]:
            return (
                sorted(self.kind_count.get((k, w), 0) for k in kinds),
                sum(self.count.get((*c, w), 0) for c in cells),
            )

        return min(levels, key=score)

    def _width(self, cells: set[tuple[str, tuple[float, ...]]]) -> int | None:
        """None (keep the space's width) one draw in ``native_every``, else the level."""
        return None if self._native() else self._level(cells)

    def __call__(self, spec: Any) -> int | None:
        return self._width(self._cells(spec))

    def level(self, spec: Any) -> int:
        """The level of :data:`WIDTHS` for ``spec``, never its own width."""
        return self._level(self._cells(spec))

    def choose(self, specs: Sequence[Any]) -> tuple[Any, int | None]:
        """Of drawn ``specs`` (one space's), the one whose kinds are measured least at the
        width it gets (sum over its kinds of ``1 / (1 + exports so far)``; the first on a
        tie), and that width: kinds that appear in few specs are drawn more often."""
        best: tuple[float, Any, int | None] | None = None
        for spec in specs:
            cells = self._cells(spec)
            d = self._width(cells)
            w = int(spec.model.model.d_model) if d is None else d
            gain = sum(1.0 / (1 + self.kind_count.get((k, w), 0)) for k in {k for k, _ in cells})
            if best is None or gain > best[0]:
                best = (gain, spec, d)
        if best is None:
            raise ValueError("choose() needs at least one spec")
        return best[1], best[2]


def part_callables(
    model: Any,
    parts: Sequence[PartFeatures],
    runtime: str,
    threads: int,
    tmpdir: str | Path,
) -> list[Callable[[], Any]]:
    """No-argument callables running one part of a compiled model alone at each of the
    shapes of ``parts`` (the same IR node at several lengths; onnxruntime: one graph from
    the one export path, dynamic length, at the precision its bits ship as, one session:
    :func:`~.parts.export_part` and :func:`~.parts.session_callables`; torch: eager,
    :func:`~.parts.module_callables`).

    Raises:
        RuntimeUnavailableError: the export fails.
    """
    from exporters.latency.parts import (
        export_part,
        module_callables,
        part_input,
        part_module_and_input,
        session_callables,
    )

    if runtime == "ort":
        path = Path(tmpdir) / f"m{len(list(Path(tmpdir).iterdir()))}.onnx"
        export_part(model, parts[0], path, threads=threads)
        xs = [part_input(model.spec.model.vocab_size, p) for p in parts]
        return session_callables(path, xs, threads)
    mods = [part_module_and_input(model, p) for p in parts]
    return module_callables(mods[0][0], [x for _, x in mods], runtime, threads, tmpdir)


def part_callable(
    model: Any, part: PartFeatures, runtime: str, threads: int, tmpdir: str | Path
) -> Callable[[], Any]:
    """:func:`part_callables` at the part's own shape.

    Raises:
        RuntimeUnavailableError: the export fails.
    """
    return part_callables(model, [part], runtime, threads, tmpdir)[0]


def measure_part(
    model: Any, part: PartFeatures, runtime: str = "ort", threads: int = DEFAULT_THREADS, **kw: Any
) -> Any:
    """Measure one part of a compiled model alone (see :func:`part_callable`). ``kw`` goes
    to :func:`~.harness.measure`."""
    import tempfile as _tf

    from exporters.latency.harness import measure, timing_defaults, torch_threads

    with _tf.TemporaryDirectory(prefix="archir-part-") as tmp, torch_threads(threads):
        fn = part_callable(model, part, runtime, threads, tmp)
        return measure(fn, **timing_defaults(kw, threads))


#: seconds of a calibration's budget kept for fitting its band (at most 2 % of the budget)
BAND_FIT_S = 10.0
BATCH_ITEMS = 120
BATCH_BYTES = 3 * 2**30  # resident memory a batch of prepared sessions may add


#: lengths each exported part is measured at besides its own (one export, several samples)
EXTRA_SEQS = 2
#: export processes preparing a batch (none runs while a batch is measured). Exports were
#: about 80 % of a 540 s calibration's time (416 s) and each runs on one core: two
#: processes on a 2-core machine gave 1.6 times the samples in the same budget (231 parts +
#: 27 wholes -> 368 + 42)
EXPORT_WORKERS = 2


def default_export_workers(threads: int = DEFAULT_THREADS) -> int:
    """Export processes for a calibration at ``threads`` intra-op threads: as many as the
    CPUs hold at that thread count, at most :data:`EXPORT_WORKERS`; 1 means in this
    process."""
    return max(1, min(EXPORT_WORKERS, (os.cpu_count() or 1) // max(1, int(threads))))


_LAST_MODEL: dict[str, tuple[Any, Any]] = {}


def _compiled(spec_data: dict[str, Any]) -> tuple[Any, Any]:
    """``(spec, model)`` of concrete spec data, compiled with seed 0 (the same initial
    weights in every process). The last one is kept: a spec's parts are exported in turn."""
    key = json.dumps(spec_data, sort_keys=True)
    if key not in _LAST_MODEL:
        import archir
        from archir.spec import spec_from_dict

        _LAST_MODEL.clear()
        spec = spec_from_dict(spec_data)
        _LAST_MODEL[key] = (spec, archir.compile(spec, seed=0).eval())
    return _LAST_MODEL[key]


def export_job(job: dict[str, Any]) -> dict[str, Any]:
    """Export one calibration graph to ``job["path"]``: the whole spec ``job["spec"]`` (spec
    data) as ``archir export --precision auto`` writes it when ``job["part"]`` is None, else
    that part alone (``{"name", "kind", "batch", "seq", "d_model"}``: a residual block, or
    the fixed part; :func:`~.parts.export_part`, as :func:`part_callables` exports it).
    Runs in an export process (or in this one), ``job["threads"]`` torch threads, stopped
    after ``job["limit_s"]`` seconds.

    Returns:
        ``{"s": seconds, "error": None}``, or with ``error`` ``"build:<exception type>"``
        (the spec did not compile), ``"whole:…"`` or ``"part:…"`` (the export failed or
        ran out of time) and ``message``. Never raises an ``Exception``.
    """
    from types import SimpleNamespace

    from exporters.latency.harness import export_onnx_file, torch_threads
    from exporters.latency.parts import export_part

    t = time.perf_counter()
    stage = "build"
    try:
        with torch_threads(int(job["threads"])):
            spec, model = _compiled(job["spec"])
            stage = "whole" if job["part"] is None else "part"
            with time_limit(float(job["limit_s"])):
                if job["part"] is None:
                    export_onnx_file(spec, job["path"], model)
                else:
                    part = SimpleNamespace(**job["part"])
                    export_part(model, part, job["path"], threads=int(job["threads"]))
    except Exception as exc:  # reported, counted under `skipped`
        return {
            "s": time.perf_counter() - t,
            "error": f"{stage}:{type(exc).__name__}",
            "message": str(exc)[:300],
        }
    return {"s": time.perf_counter() - t, "error": None}


class _Exporters:
    """Where :func:`export_job` runs: ``workers`` spawned processes, or this process (1).
    A process that dies (out of memory, a crash in a native library) fails the jobs it
    held; the pool is then started again."""

    def __init__(self, workers: int) -> None:
        self.workers = max(1, int(workers))
        self.pool: Any = None

    def submit(self, job: dict[str, Any]) -> Future[dict[str, Any]]:
        if self.workers == 1:
            done: Future[dict[str, Any]] = Future()
            done.set_result(export_job(job))
            return done
        if self.pool is None:
            import multiprocessing as mp
            from concurrent.futures import ProcessPoolExecutor

            self.pool = ProcessPoolExecutor(self.workers, mp_context=mp.get_context("spawn"))
        return cast("Future[dict[str, Any]]", self.pool.submit(export_job, job))

    @staticmethod
    def result(fut: Future[dict[str, Any]]) -> dict[str, Any]:
        try:
            return fut.result()
        except BrokenProcessPool as exc:
            return {"s": 0.0, "error": f"export:{type(exc).__name__}", "message": str(exc)}

    def restart_if_broken(self) -> None:
        if self.pool is not None and getattr(self.pool, "_broken", False):
            self.close()

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)
            self.pool = None


#: a prepared sample: ("part" | "whole", record fields, callable, estimated seconds per call)
Item = tuple[str, dict[str, Any], Callable[[], Any], float]


class _Batch:
    """The samples of one calibration batch being prepared: exports in flight (at most one
    per export process, so none waits in a queue) and the sessions loaded from the finished
    ones. Counts failures into ``skipped`` and export seconds into ``export_s``."""

    def __init__(
        self,
        runtime: str,
        threads: int,
        exporters: _Exporters,
        coverage: WidthCoverage,
        skipped: dict[str, int],
        export_s: dict[str, float],
    ) -> None:
        self.runtime, self.threads, self.exporters = runtime, threads, exporters
        self.coverage, self.skipped, self.export_s = coverage, skipped, export_s
        self.items: list[Item] = []
        # future -> (job, spec, spec index, the samples it serves: parts, or whole lengths)
        self.pending: dict[Future[dict[str, Any]], tuple[dict[str, Any], Any, int, list[Any]]]
        self.pending = {}
        self.stack: ExitStack | None = None
        self.tmp = ""

    def open(self, stack: ExitStack) -> None:
        """Sessions and files live until ``stack`` closes (after the batch is measured)."""
        self.stack = stack
        self.tmp = stack.enter_context(tempfile.TemporaryDirectory(prefix="archir-cal-"))

    def round_s(self, window_s: float) -> float:
        """Seconds of one measuring round, the samples still being exported included."""
        coming = sum(len(what) for *_, what in self.pending.values())
        known = sum(max(window_s, 2 * est) + 0.001 for *_, est in self.items)
        return known + coming * (window_s + 0.001)

    def fit_to(self, seconds: float, rounds: int, window_s: float) -> int:
        """Drop the newest samples until ``rounds`` measuring rounds (each with the speed
        probe's window) fit in ``seconds``; return how many were dropped. The budget is
        checked before each draw, but one draw's exports can add many slow samples (a
        d_model 512 spec at length 1,024): measured in full, they ran the default
        calibration 8-26 s past its budget."""
        dropped = 0
        while self.items and rounds * (self.round_s(window_s) + window_s) > seconds:
            self.items.pop()
            dropped += 1
        return dropped

    def whole_busy(self) -> bool:
        return any(job["part"] is None for job, *_ in self.pending.values())

    def submit(
        self,
        spec: Any,
        idx: int,
        part: PartFeatures | None,
        what: list[Any],
        limit_s: float,
        limit_for: Callable[[float], float],
    ) -> None:
        """Export the whole ``spec`` (``part`` None; ``what``: its lengths) or one part
        (``what``: the part at each of its lengths), within ``limit_for(limit_s)`` seconds
        reckoned once an export process is free."""
        while len(self.pending) >= self.exporters.workers:
            self.collect(block=True)
        job = {
            "spec": spec.data,
            "part": None
            if part is None
            else {k: getattr(part, k) for k in ("name", "kind", "batch", "seq", "d_model")},
            "path": str(Path(self.tmp) / f"g{idx}-{time.perf_counter_ns()}.onnx"),
            "threads": self.threads,
            "limit_s": limit_for(limit_s),
        }
        fut: Future[dict[str, Any]]
        if self.runtime == "ort":
            fut = self.exporters.submit(job)
        else:  # eager torch: nothing to export
            fut = Future()
            fut.set_result({"s": 0.0, "error": None})
        self.pending[fut] = (job, spec, idx, what)
        self.collect(block=False)

    def collect(self, block: bool) -> None:
        """Load the finished exports (waiting for one first when ``block``)."""
        if not self.pending:
            return
        done, _ = wait(
            list(self.pending), timeout=None if block else 0, return_when=FIRST_COMPLETED
        )
        for fut in done:
            job, spec, idx, what = self.pending.pop(fut)
            self._take(self.exporters.result(fut), job, spec, idx, what)
        self.exporters.restart_if_broken()

    def drain(self) -> None:
        while self.pending:
            self.collect(block=True)

    def _first_call_s(self, fn: Callable[[], Any]) -> float:
        fn()  # warm-up (allocations)
        t = time.perf_counter()
        fn()
        return time.perf_counter() - t

    def _take(
        self, res: dict[str, Any], job: dict[str, Any], spec: Any, idx: int, what: list[Any]
    ) -> None:
        whole = job["part"] is None
        self.export_s["whole" if whole else "part"] += float(res["s"])
        if res["error"]:
            self.skipped[res["error"]] = self.skipped.get(res["error"], 0) + 1
            return
        assert self.stack is not None
        ort = self.runtime == "ort"
        try:
            if whole:
                model = None if ort else _compiled(spec.data)[1]
                r = self.stack.enter_context(
                    Runner(
                        spec,
                        self.runtime,
                        threads=self.threads,
                        model=model,
                        onnx_file=job["path"] if ort else None,
                    )
                )
                new: list[Item] = []
                for t in what:
                    fn = r.call_for(1, t)
                    meta = {"spec": idx, "batch": 1, "seq": t}
                    new.append(("whole", meta, fn, self._first_call_s(fn)))
                self.items += new
                return
            if ort:
                from exporters.latency.parts import part_input, session_callables

                vocab = int(spec.model.model.vocab_size)
                xs = [part_input(vocab, q) for q in what]
                fns = session_callables(job["path"], xs, self.threads)
            else:
                model = _compiled(spec.data)[1]
                fns = part_callables(model, what, self.runtime, self.threads, self.tmp)
            ests = [self._first_call_s(fn) for fn in fns]
        except Exception as exc:
            name = f"{'whole' if whole else 'part'}:{type(exc).__name__}"
            self.skipped[name] = self.skipped.get(name, 0) + 1
            return
        self.coverage.add(what[0])
        for q, fn, est in zip(what, fns, ests):
            meta = {"spec": idx, "node": q.name, "kind": q.kind, "batch": 1, "seq": q.seq}
            self.items.append(("part", meta, fn, est))


def _more_seqs(rng: random.Random, seq: int, max_seq: int) -> list[int]:
    """Up to :data:`EXTRA_SEQS` other lengths of :data:`SEQS` (at most ``max_seq``), drawn."""
    pool = [t for t in SEQS if t != seq and t <= max_seq]
    return rng.sample(pool, min(EXTRA_SEQS, len(pool)))


def rss_bytes() -> int:
    """This process's resident memory in bytes (0 where ``/proc`` is not available)."""
    try:
        return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


#: lengths each shared subgraph is measured at (interpolated between them by its elements,
#: ``H·T²``)
SHARED_SEQS = (128, 256, 512, 1024)
#: seconds of the budget kept for measuring the shared subgraphs (at most 3 % of it)
SHARED_S = 30.0


def shared_modules(spec_datas: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Shared-subgraph key (:func:`~.predictor.shared_key`) -> (a module computing that
    subgraph alone from an input ``[1, T, d_model]``, only its length read; ``d_model``), for every
    key that a block of ``spec_datas`` has: RetNet's decay matrix
    (:meth:`archir.blocks.recurrent.RetNet.decay`, the very code the block runs). Specs
    that do not build are skipped."""
    import torch
    from torch import nn

    import archir
    from archir.blocks.recurrent import RetNet
    from archir.ir import build_graph
    from archir.spec import spec_from_dict
    from exporters.latency.parts import node_modules

    class Decay(nn.Module):
        def __init__(self, block: RetNet) -> None:
            super().__init__()
            self.block = block

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.block.decay(torch.arange(x.shape[1], device=x.device), x.dtype)

    out: dict[str, Any] = {}
    for data in spec_datas:
        try:
            spec = spec_from_dict(data)
            want = {
                n.name: shared_key(n.kind or "", n.params)
                for n in build_graph(spec)
                if n.op == "block"
            }
        except Exception:
            continue
        want = {name: k for name, k in want.items() if k and k not in out}
        if not want:
            continue
        model = archir.compile(spec, seed=0).eval()
        mods = node_modules(model)
        for name, key in want.items():
            rb = next((m for m in mods[name].modules() if isinstance(m, RetNet)), None)
            if rb is not None and key not in out:
                out[key] = (Decay(rb).eval(), spec.model.model.d_model)
    return out


def measure_shared(
    spec_datas: Sequence[dict[str, Any]],
    runtime: str,
    threads: int,
    *,
    rounds: int = INTERLEAVED_ROUNDS,
    window_s: float = INTERLEAVED_WINDOW_S,
    budget_s: float = SHARED_S,
    probe: Any = None,
    probe_ref_ms: float | None = None,
) -> list[dict[str, Any]]:
    """Measure every shared subgraph of ``spec_datas``' blocks alone (one export per key,
    dynamic length, at :data:`SHARED_SEQS`), interleaved; returns the calibration's
    ``shared`` records ``{"key", "seq", "ms", ...}``. Only onnxruntime shares them (eager
    torch recomputes RetNet's decay in every layer): another runtime returns ``[]``, as
    does a subgraph whose export fails."""
    import torch

    from exporters.latency.harness import clock, measure_interleaved, torch_threads
    from exporters.latency.parts import module_callables

    if runtime != "ort":
        return []
    t0 = time.perf_counter()
    fns: dict[tuple[str, int], Callable[[], Any]] = {}
    with tempfile.TemporaryDirectory(prefix="archir-shared-") as tmp, torch_threads(threads):
        for key, (mod, d) in shared_modules(spec_datas).items():
            if time.perf_counter() - t0 > budget_s / 2:
                break
            seqs = list(SHARED_SEQS)
            xs = [torch.zeros(1, t, d) for t in seqs]
            try:
                cs = module_callables(mod, xs, runtime, threads, tmp, max_seq=max(SEQS))
            except RuntimeUnavailableError:
                continue
            fns.update({(key, t): c for t, c in zip(seqs, cs)})
        if not fns:
            return []
        got = measure_interleaved(
            fns,
            rounds=rounds,
            window_s=window_s,
            warmup=1,
            probe=probe,
            probe_ref_ms=probe_ref_ms,
            budget_s=max(0.0, budget_s - (time.perf_counter() - t0)),
            min_rounds=3,
            timer=clock(threads),
        )
    return [
        {
            "key": key,
            "seq": t,
            "ms": m.min_ms,
            "median_ms": m.median_ms,
            "cv": round(m.cv, 4),
            "window_min_ms": [round(w, 5) for w in m.window_min_ms],
        }
        for (key, t), m in got.items()
    ]


def calibrate(
    runtime: str = "ort",
    *,
    threads: int = DEFAULT_THREADS,
    budget_s: float = DEFAULT_BUDGET_S,
    out: str | Path | None = None,
    seed: int = 1234,
    spaces: Sequence[str | Path] = (),
    whole_share: float = 0.5,
    window_s: float = INTERLEAVED_WINDOW_S,
    rounds: int = INTERLEAVED_ROUNDS,
    part_limit_s: float = 60.0,
    progress: Callable[[str], None] | None = None,
    export_workers: int | None = None,
) -> tuple[Path, dict[str, Any]]:
    """Prepare the designed set batch by batch, measure each batch interleaved, until
    ``budget_s`` seconds have passed; write the file (module docstring).

    The design: concrete specs drawn from ``specs/search/`` and ``spaces`` in turn
    (:data:`CANDIDATES` per turn, the one whose kinds are measured least kept), their
    width replaced by the level of :data:`WIDTHS` its kinds were measured least at (or kept
    as the space draws it, one draw in four: :class:`WidthCoverage`) and measured at a
    sequence length cycling through :data:`SEQS` (batch 1), its ``max_seq_len`` raised to
    the longest of them so the extra lengths span all of :data:`SEQS`. Of each drawn spec every
    **part** not prepared before (same kind, parameters, width, norm, residual, shape) is
    prepared alone; while whole specs have taken less than ``whole_share`` of the export
    time, a whole spec is prepared too (the composition stage): two in three
    (:data:`WHOLE_NATIVE`) drawn apart at the width their space draws, with their parts,
    the third the design's spec. onnxruntime graphs are
    exported by ``export_workers`` processes (default :func:`default_export_workers`; 1: in
    this process) while this one loads the finished ones; a batch (at most
    :data:`BATCH_ITEMS` samples or :data:`BATCH_BYTES` of new resident memory) is measured,
    with no export running, in ``rounds`` interleaved rounds and released before the next
    is prepared. A part or spec whose export takes longer than ``part_limit_s`` (a whole
    spec: twice that) is abandoned and counted under ``skipped``, as is one whose export
    process died.

    Returns:
        (path written, calibration data).

    Raises:
        RuntimeUnavailableError: no spaces, or no sample could be measured.
    """
    import archir
    from exporters.latency.harness import clock, clock_name, measure_interleaved, torch_threads

    t0 = time.perf_counter()
    key = machine_key(runtime, threads)
    path = Path(out) if out else default_path(runtime, threads)
    spaces_open = load_spaces(space_paths(spaces))
    if not spaces_open:
        raise RuntimeUnavailableError("no search space to calibrate on (specs/search/ empty?)")
    specs: list[dict[str, Any]] = []
    parts: list[dict[str, Any]] = []
    wholes: list[dict[str, Any]] = []
    seen: set[str] = set()
    skipped: dict[str, int] = {}
    prep_s = 0.0
    if export_workers is None:
        export_workers = default_export_workers(threads)
    n_rounds = 0

    def elapsed() -> float:
        return time.perf_counter() - t0

    def skip(exc: BaseException, what: str) -> None:
        name = f"{what}:{type(exc).__name__}"
        skipped[name] = skipped.get(name, 0) + 1

    # the budget less what fitting the band at the end takes (:func:`band_record`, 6-8 s
    # on the default calibration's samples here)
    shared_s = min(SHARED_S, 0.03 * budget_s) if runtime == "ort" else 0.0
    measure_s = budget_s - min(BAND_FIT_S, 0.02 * budget_s) - shared_s
    coverage = WidthCoverage(random.Random(seed + 2))
    # every spec reaches the longest calibrated length, so the extra lengths one export is
    # measured at span all of SEQS: with the spaces' own max_seq_len (256-512) they piled up
    # short (session 22's calibration: 66-86 part samples at each length up to 256, 12-17 at
    # 512-1,024; Hyena never past 512, and predicted 12-28 % fast at 768-1,024)
    draws = space_specs(
        100_000,
        seed,
        spaces_open,
        choose=coverage.choose,
        candidates=CANDIDATES,
        max_seq=max(SEQS),
    )
    # the whole specs' own draws: the spaces' widths, as a search draws them (a width
    # below WIDTHS, the test space's 16-32, takes the width design's instead)
    natives = space_specs(
        100_000,
        seed + 3,
        spaces_open,
        width_for=lambda s: None if s.model.model.d_model >= min(WIDTHS) else coverage.level(s),
        max_seq=max(SEQS),
    )
    n_wholes = 0
    rng = random.Random(seed + 1)
    out_of_time = False
    probe = SpeedProbe(runtime, threads)
    probe_ms: float | None = None  # the probe's fastest window so far: the machine's speed
    slow_batches = 0
    exporters = _Exporters(export_workers if runtime == "ort" else 1)
    export_s = {"whole": 0.0, "part": 0.0}  # export seconds, summed over the processes
    try:
        while not out_of_time:
            batch = _Batch(runtime, threads, exporters, coverage, skipped, export_s)

            def left_s(b: _Batch = batch) -> float:  # budget left once the batch is measured
                return measure_s - elapsed() - rounds * b.round_s(window_s)

            def export_limit_s(limit_s: float) -> float:
                # an export may not run past the budget either (a Mamba block takes a minute)
                return max(min(limit_s, left_s()), 1.0)

            rss0 = rss_bytes()
            with ExitStack() as stack, torch_threads(threads):
                batch.open(stack)
                tb = time.perf_counter()
                for spec, seq in draws:
                    if left_s() <= 0:
                        out_of_time = True
                        break
                    spent = export_s["whole"] + export_s["part"]
                    want_whole = not batch.whole_busy() and export_s["whole"] < whole_share * max(
                        spent, 1
                    )
                    if want_whole:
                        # most whole specs as the spaces draw them (:data:`WHOLE_NATIVE`)
                        if n_wholes % WHOLE_NATIVE[1] < WHOLE_NATIVE[0]:
                            spec, seq = next(natives)
                        elif spec.model.model.d_model < min(WIDTHS):
                            want_whole = False  # the test space's own 16-32: parts only
                        n_wholes += want_whole
                    try:
                        g = graph_features(spec, 1, seq)
                    except Exception as exc:
                        skip(exc, "build")
                        continue
                    todo = list(
                        {p.signature: p for p in g.parts if p.signature not in seen}.values()
                    )
                    if not todo and not want_whole:
                        continue
                    idx = len(specs)
                    specs.append(spec.data)
                    # one export serves several lengths (the graph's length is dynamic)
                    more = _more_seqs(rng, seq, spec.model.model.max_seq_len)
                    if want_whole and left_s() > 0:
                        batch.submit(
                            spec, idx, None, [seq, *more], 2 * part_limit_s, export_limit_s
                        )
                    others = [graph_features(spec, 1, t) for t in more]
                    for p in todo:
                        if left_s() <= 0:
                            break
                        seen.add(p.signature)
                        same = [p] + [
                            q
                            for o in others
                            for q in o.parts
                            if q.name == p.name and q.signature not in seen
                        ]
                        seen.update(q.signature for q in same)
                        batch.submit(spec, idx, p, same, part_limit_s, export_limit_s)
                    if progress:
                        progress(
                            f"[{elapsed():6.1f}s] {len(parts) + len(wholes)} measured, batch: "
                            f"{len(batch.items)} prepared (round ~{batch.round_s(window_s):.1f}s)"
                            f"  {spec.name} d{spec.model.model.d_model} seq {seq}"
                        )
                    if len(batch.items) >= BATCH_ITEMS or (
                        rss0 and rss_bytes() - rss0 > BATCH_BYTES
                    ):
                        break
                else:
                    out_of_time = True
                batch.drain()  # nothing is measured while an export runs
                prep_s += time.perf_counter() - tb
                late = batch.fit_to(measure_s - elapsed(), rounds, window_s)
                if late:
                    skipped["budget"] = skipped.get("budget", 0) + late
                    out_of_time = True
                items = batch.items
                if not items:
                    break

                def said(r: int, s: float, n: int = len(items)) -> None:
                    if progress:
                        progress(f"[{elapsed():6.1f}s] batch of {n}: round {r} ({s:.1f}s)")

                stats: dict[str, Any] = {}
                ms = measure_interleaved(
                    {i: it[2] for i, it in enumerate(items)},
                    rounds=rounds,
                    window_s=window_s,
                    warmup=1,
                    probe=probe,
                    probe_ref_ms=probe_ms,
                    probe_stats=stats,
                    budget_s=max(0.0, measure_s - elapsed()),
                    min_rounds=rounds,
                    progress=said,
                    timer=clock(threads),
                )
                probe_ms = min(probe_ms or math.inf, stats["best_ms"])
                slow_batches += stats["fast_rounds"] < 2
            n_rounds = max(n_rounds, rounds)
            for i, (what, meta, _, _) in enumerate(items):
                m = ms[i]
                rec = {
                    **meta,
                    "ms": m.min_ms,
                    "best_ms": m.best_ms,
                    "median_ms": m.median_ms,
                    "cv": round(m.cv, 4),
                    "runs": m.runs,
                    "windows": m.windows,
                    "window_ms": [round(w, 5) for w in m.window_ms],
                    "window_min_ms": [round(w, 5) for w in m.window_min_ms],
                }
                (parts if what == "part" else wholes).append(rec)
        # RetNet's decay, built once per graph for all its RetNet layers of one key
        shared = measure_shared(
            specs,
            runtime,
            threads,
            rounds=rounds,
            window_s=window_s,
            budget_s=max(0.0, min(shared_s, budget_s - elapsed() - BAND_FIT_S)),
            probe=probe,
            probe_ref_ms=probe_ms,
        )
    finally:
        exporters.close()
        probe.close()
        _LAST_MODEL.clear()
    if not parts:
        raise RuntimeUnavailableError(
            f"no calibration sample could be measured on runtime '{runtime}' ({skipped})"
        )
    cvs = sorted(float(r["cv"]) for r in parts + wholes)
    data = {
        "format": FORMAT,
        "version": VERSION,
        "feature_version": FEATURE_VERSION,
        "key": key,
        "created": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "archir_version": archir.__version__,
        "platform": platform.platform(),
        "graph": "exporters.graph (torch.export, dynamic axes, precision auto)",
        "clock": clock_name(clock(threads)),
        "wall_s": 0.0,  # set once the band is fitted
        "prepare_s": round(prep_s, 1),
        "export_workers": exporters.workers,
        "export_s": {k: round(v, 1) for k, v in export_s.items()},
        "rounds": n_rounds,
        "probe_ms": probe_ms,
        "slow_batches": slow_batches,
        "spaces": [str(p) for p in space_paths(spaces)],
        "skipped": skipped,
        "cv_median": cvs[len(cvs) // 2] if cvs else None,
        "specs": specs,
        "parts": parts,
        "wholes": wholes,
        "shared": shared,
    }
    try:
        data["band"] = band_record(data)
    except CalibrationFormatError:  # too few samples to fit: nothing to store
        pass
    data["wall_s"] = round(elapsed(), 1)
    return save_calibration(data, path), data
