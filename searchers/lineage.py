"""Lineage of an evolutionary search: which model descends from which, by which mutations.

The evolution searcher records, in every trial's ``archir:trial`` user attribute (read with
:func:`searchers.objectives.trial_attrs`), a ``lineage`` dict::

    {"origin": "seed" | "sampled" | "mutation" | "crossover",
     "parents": [3, 7],               # trial numbers of the parent models
     "mutations": ["crossover: layers 0-1 of #3 + 2-3 of #7", "d_model 96 -> 128"],
     "inherited_from": 3}             # the trial whose trained weights it started from, or null

(a child still queued, or one whose record an interruption cut short, has it in the system
attribute :data:`ATTR_LINEAGE` it was queued with).

A **model** is one node of the family tree, whatever number of trials it took: a promotion on
the fidelity ladder (``continue_of``) trains the same model further, and the retry of an
interrupted trial (system attribute ``failed_trial``) is the same model again. Both are
resolved to the model's **root** trial (:func:`model_roots`): the first trial that drew it,
or for a retried one the retry that took its place. Parent numbers are resolved the same way.

:func:`build_tree` makes the tree (a networkx ``DiGraph``, edges parent -> child),
:func:`path_to` the chain from a seed to a model following first parents,
:func:`format_path` its printout and :func:`draw_lineage` the PNG (generations left to
right, front members and their ancestry in red). :func:`read_trials` reads a run's study
without writing anything: a journal is parsed by a read-only backend (a torn last line,
which a running search may be appending right now, is left alone), a database is opened
without creating tables (SQLite read-only).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import networkx as nx
from optuna.trial import FrozenTrial, TrialState

from archir.errors import ArchirError, SearchError
from searchers.ladder import ATTR_CONTINUE, rungs_of
from searchers.objectives import trial_attrs

#: the key of the lineage dict in a trial's attributes
LINEAGE_KEY = "lineage"
#: system attribute of a queued evolution child holding its lineage
#: (:data:`searchers.evolution.ATTR_LINEAGE`; a retry or a promotion carries it too)
ATTR_LINEAGE = "archir:lineage"
#: origins the evolution searcher records; ``unknown``: a model whose lineage is not
#: recorded, ``missing``: a parent number that is not a trial of the study
ORIGINS = ("seed", "sampled", "mutation", "crossover")
#: the file ``archir report RUN --lineage`` writes in the run folder
PNG_NAME = "lineage.png"
#: PNG ``Software`` text of a lineage drawing: archir overwrites only a file that carries it
PNG_MARK = "archir lineage"
#: run.json / a spec file larger than this is not one archir wrote
MAX_FILE_BYTES = 64 * 2**20
_PNG_SIG = b"\x89PNG\r\n\x1a\n"
_ABBREV = {"attention": "attn", "linear_attention": "linattn"}
_NO_LINEAGE_HINT = (
    "lineage is recorded by 'archir search SPEC --searcher evolution'; other searchers "
    "draw from the spec's choices and have no parents"
)


# -- reading a run's study without writing to it -----------------------------------------------
def _journal_backend(path: Path) -> Any:
    """A read-only Optuna journal backend over the records of ``path`` as they are now."""
    from optuna.storages.journal import BaseJournalBackend

    class ReadOnlyJournal(BaseJournalBackend):
        def __init__(self, logs: list[dict[str, Any]]) -> None:
            self._logs = logs

        def read_logs(self, log_number_from: int) -> list[dict[str, Any]]:
            return self._logs[log_number_from:]

        def append_logs(self, logs: list[dict[str, Any]]) -> None:
            raise SearchError(f"{path} is opened read-only for the report")

    try:
        data = path.read_bytes()
    except OSError as exc:
        raise SearchError(
            f"cannot read the study's journal {path}: {exc.strerror}",
            hint="check that the run folder is readable",
        ) from None
    lines = data.split(b"\n")
    lines.pop()  # after the last newline: empty, or a record being appended now
    logs: list[dict[str, Any]] = []
    for i, line in enumerate(lines):
        try:
            rec = json.loads(line)
            if not isinstance(rec, dict):
                raise ValueError("not an object")
        except (ValueError, RecursionError):
            if i == len(lines) - 1:
                break  # a torn last record: the search resumes (and repairs) it, not us
            raise SearchError(
                f"{path}: line {i + 1} is not a journal record",
                hint="run the same 'archir search' command: it checks and repairs the journal",
            ) from None
        logs.append(rec)
    return ReadOnlyJournal(logs)


def _open_readonly(run: Path, where: str) -> Any:
    """The Optuna storage ``where`` (run.json's ``storage``) opened for reading only."""
    if "://" not in where:
        # the default journal lives in the run folder; a --storage path is as it was given
        path = run / where if where == "study.journal" else Path(where)
        if not path.is_file():
            raise SearchError(
                f"the study's journal {path} is missing",
                hint="run the report from the folder the search ran in"
                if where != "study.journal"
                else "the run folder has lost its storage; re-run the search",
            )
        from optuna.storages import JournalStorage

        backend = _journal_backend(path)
        try:
            return JournalStorage(backend)
        except Exception as exc:  # noqa: BLE001 - records Optuna cannot replay
            raise SearchError(
                f"{path} is not an Optuna journal ({type(exc).__name__}: {exc})",
                hint="it was not written by 'archir search'",
            ) from None
    import optuna
    from sqlalchemy.engine import make_url

    from searchers.storage import _resolve_driver, _shown

    url = where
    try:
        u = make_url(where)
    except Exception:  # noqa: BLE001 - any unparsable URL
        raise SearchError(
            f"run.json names storage {where!r}, which is not a database URL",
            hint="it was not written by 'archir search'",
        ) from None
    if u.drivername.startswith("sqlite"):
        db = u.database or ""
        if db in ("", ":memory:") or not Path(db).is_file():
            raise SearchError(
                f"the study's database {db or where!r} is missing",
                hint="run the report from the folder the search ran in",
            )
        from urllib.parse import quote

        url = f"sqlite:///file:{quote(str(Path(db).resolve()))}?mode=ro&uri=true"
    else:
        url = _resolve_driver(where)
    try:
        return optuna.storages.RDBStorage(url, skip_table_creation=True)
    except Exception as exc:  # noqa: BLE001 - any driver/connection failure is a user error
        first = str(exc).splitlines()[0][:200] if str(exc) else ""
        raise SearchError(
            f"cannot open storage {_shown(where)!r}: {type(exc).__name__}: {first}",
            hint="check the URL, the server and the database driver",
        ) from None


def read_run_json(run: Path) -> dict[str, Any]:
    """The run folder's ``run.json``, checked to name a study and its storage.

    Raises:
        SearchError: it is missing, too large, not JSON or lacks ``study``/``storage``.
    """
    p = Path(run) / "run.json"
    if not p.is_file():
        raise SearchError(
            f"no run.json in {run}", hint="give a folder made by 'archir search' (runs/<name>)"
        )
    if p.stat().st_size > MAX_FILE_BYTES:
        raise SearchError(f"{p} is too large to be one archir wrote")
    try:
        doc = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        doc = None
    if (
        not isinstance(doc, dict)
        or not isinstance(doc.get("study"), str)
        or not isinstance(doc.get("storage"), str)
    ):
        raise SearchError(
            f"{p} does not name the study and its storage",
            hint="it was not written by 'archir search'",
        )
    return doc


def read_trials(run: str | Path) -> tuple[str, list[FrozenTrial]]:
    """The study name and every trial of run folder ``run``, read from the storage that
    ``run.json`` records, without writing to it (module docstring).

    Raises:
        SearchError: ``run.json`` is missing or bad, the storage is missing, damaged in the
            middle or unreachable, or does not hold the study.
    """
    run = Path(run)
    doc = read_run_json(run)
    name, where = doc["study"], doc["storage"]
    storage = _open_readonly(run, where)
    try:
        sid = storage.get_study_id_from_name(name)
        trials = storage.get_all_trials(sid, deepcopy=False)
    except KeyError:
        raise SearchError(
            f"study {name!r} is not in its storage {where!r}",
            hint="the storage was replaced after the search; re-run the search",
        ) from None
    except SearchError:
        raise
    except Exception as exc:  # noqa: BLE001 - a database error while reading
        raise SearchError(f"cannot read study {name!r}: {type(exc).__name__}: {exc}") from None
    return name, sorted(trials, key=lambda t: t.number)


# -- models and the tree -------------------------------------------------------------------
def _int(v: Any) -> int | None:
    if isinstance(v, bool):
        return None
    if isinstance(v, int):
        return v
    if isinstance(v, float) and v.is_integer():
        return int(v)
    if isinstance(v, str) and v.strip().lstrip("-").isdigit():
        return int(v)
    return None


def _continue_of(t: FrozenTrial) -> int | None:
    n = trial_attrs(t).get("continue_of")
    return _int(n if n is not None else t.system_attrs.get(ATTR_CONTINUE))


def model_roots(trials: Iterable[FrozenTrial]) -> dict[int, int]:
    """Trial number -> the number of its model's root trial: a promotion resolves to the
    trial whose model it continues (``continue_of``, followed to its start), an interrupted
    trial to the retry that replaced it (``failed_trial``, followed to the last retry)."""
    trials = list(trials)
    retry: dict[int, int] = {}
    for t in trials:
        m = _int(t.system_attrs.get("failed_trial"))
        if m is not None and m != t.number:
            retry[m] = max(retry.get(m, t.number), t.number)
    cont = {t.number: _continue_of(t) for t in trials}
    out: dict[int, int] = {}
    for t in trials:
        n, seen = t.number, {t.number}
        while True:
            nxt = retry.get(n)
            if nxt is None:
                nxt = cont.get(n)
            if nxt is None or nxt in seen:
                break
            seen.add(nxt)
            n = nxt
        out[t.number] = n
    return out


def _lineage(t: FrozenTrial) -> dict[str, Any] | None:
    """The trial's recorded lineage; for a queued or interrupted child whose record does not
    hold it (yet), the one it was queued with (system attribute :data:`ATTR_LINEAGE`)."""
    for lin in (trial_attrs(t).get(LINEAGE_KEY), t.system_attrs.get(ATTR_LINEAGE)):
        if isinstance(lin, dict):
            return lin
    return None


def _status(t: FrozenTrial) -> str:
    if t.state == TrialState.RUNNING:
        return "running"
    if t.state == TrialState.WAITING:
        return "waiting"
    return str(trial_attrs(t).get("status", t.state.name.lower()))


def _representative(members: list[FrozenTrial]) -> FrozenTrial:
    """The trial that says most about a model: the finished one that went furthest up the
    ladder (the latest of those), else the latest trial."""
    done = [t for t in members if t.state == TrialState.COMPLETE]
    if done:
        return max(done, key=lambda t: (len(rungs_of(t)), t.number))
    return max(members, key=lambda t: t.number)


def _token_mixer(block: Mapping[str, Any]) -> bool:
    role = block.get("role")
    if isinstance(role, str):
        return role == "token_mixer"
    try:
        from archir.registry import get

        return get(str(block.get("kind"))).role == "token_mixer"
    except (KeyError, ImportError):
        return False


def arch_label(spec: Mapping[str, Any] | str) -> str:
    """A short label of a concrete spec (a dict, or its YAML text): ``d_model`` and the
    token mixers layer by layer, runs of three or more counted (``d96 attn×3·mamba·gla``);
    a model without token mixers lists every block kind. ``?`` for anything unreadable."""
    try:
        if isinstance(spec, str):
            import yaml

            spec = yaml.safe_load(spec)
        model = spec["model"]  # type: ignore[index]
        kinds: list[str] = []
        every: list[str] = []
        for g in model["layers"]:
            rep = _int(g.get("repeat", 1)) or 1
            mixers = [str(b["kind"]) for b in g["blocks"] if _token_mixer(b)]
            kinds += mixers * rep
            every += [str(b["kind"]) for b in g["blocks"]] * rep
        seq = [_ABBREV.get(k, k) for k in (kinds or every)]
        runs: list[list[Any]] = []
        for k in seq:
            if runs and runs[-1][0] == k:
                runs[-1][1] += 1
            else:
                runs.append([k, 1])
        parts = []
        for k, n in runs:
            parts += [f"{k}×{n}"] if n >= 3 else [k] * n
        return f"d{model['d_model']} " + "·".join(parts)
    except Exception:  # noqa: BLE001 - a label is a convenience: never an error
        return "?"


def _spec_label(members: list[FrozenTrial], run_dir: Path | None) -> str:
    for t in members:
        text = trial_attrs(t).get("spec_yaml")
        if isinstance(text, str):
            return arch_label(text)
    if run_dir is None:
        return "?"
    from archir.paths import inside

    for t in members:
        rel = trial_attrs(t).get("spec")
        if not isinstance(rel, str):
            continue
        try:
            p = inside(run_dir, run_dir / rel)
            if p.is_file() and p.stat().st_size <= MAX_FILE_BYTES:
                return arch_label(p.read_text(encoding="utf-8"))
        except (ArchirError, OSError, ValueError):
            continue
    return "?"


def build_tree(
    trials: Sequence[FrozenTrial],
    front: Iterable[int] = (),
    run_dir: str | Path | None = None,
    study: str = "",
) -> nx.DiGraph:
    """The family tree of a search's models.

    Nodes are model root numbers (:func:`model_roots`) with attributes ``origin`` (one of
    :data:`ORIGINS`, ``unknown`` where no lineage is recorded, ``missing`` for a parent
    number the study lacks), ``parents`` (roots, in the recorded order), ``mutations``,
    ``inherited_from`` (a root or None), ``status`` (of the trial that went furthest:
    ``ok``, ``infeasible``, ``failed``, ``running`` ...), ``values`` (metric -> value of that
    trial), ``steps``, ``trial`` (that trial's number), ``trials`` (every trial of the model),
    ``duplicate_of`` (root or None), ``on_front``, ``label`` (:func:`arch_label`) and
    ``generation`` (0 for a model without parents, else one more than its latest parent's).
    ``tree.graph`` holds ``study`` and ``roots`` (trial number -> model root).
    Edges go parent -> child with ``index`` (the parent's position: 0 is the first parent)
    and ``inherited`` (the child started from this parent's weights).

    Args:
        trials: every trial of the study.
        front: trial numbers of the front (``pareto.json``'s front rows; promotions are
            resolved to their models).
        run_dir: the run folder, for concrete specs not held in the storage.
        study: the study name, kept in ``tree.graph["study"]``.

    Raises:
        SearchError: no trial records a lineage (hint: ``--searcher evolution``), or the
            recorded parents form a cycle.
    """
    trials = sorted(trials, key=lambda t: t.number)
    if not any(_lineage(t) is not None for t in trials):
        raise SearchError(
            f"no lineage in {'study ' + repr(study) if study else 'this study'}: "
            "none of its trials records parents or mutations",
            hint=_NO_LINEAGE_HINT,
        )
    rundir = Path(run_dir) if run_dir is not None else None
    roots = model_roots(trials)
    groups: dict[int, list[FrozenTrial]] = {}
    for t in trials:
        groups.setdefault(roots[t.number], []).append(t)
    on_front = {roots.get(n, n) for n in front}
    tree = nx.DiGraph(study=study, roots=roots)
    for root, members in groups.items():
        members.sort(key=lambda t: (t.number != root, t.number))  # the root's own first
        lin = next((x for t in members for x in [_lineage(t)] if x is not None), None)
        rep = _representative(members)
        a = trial_attrs(rep)
        values = a.get("values") if isinstance(a.get("values"), dict) else {}
        dup = _int(trial_attrs(members[0]).get("duplicate_of"))
        parents: list[int] = []
        for p in (lin or {}).get("parents") or []:
            q = _int(p)
            if q is not None:
                q = roots.get(q, q)
                if q != root and q not in parents:
                    parents.append(q)
        inh = _int((lin or {}).get("inherited_from"))
        muts = (lin or {}).get("mutations") or []
        origin = (lin or {}).get("origin")
        tree.add_node(
            root,
            origin=str(origin) if lin is not None and origin is not None else "unknown",
            parents=parents,
            mutations=[str(m) for m in muts] if isinstance(muts, list) else [str(muts)],
            inherited_from=roots.get(inh, inh) if inh is not None else None,
            status=_status(rep),
            values=dict(values),
            steps=a.get("steps"),
            trial=rep.number,
            trials=[t.number for t in sorted(members, key=lambda t: t.number)],
            duplicate_of=roots.get(dup, dup) if dup is not None else None,
            on_front=root in on_front,
            label=_spec_label(members, rundir),
        )
    for child, attrs in list(tree.nodes(data=True)):
        for i, p in enumerate(attrs["parents"]):
            if p not in tree:
                tree.add_node(
                    p,
                    origin="missing",
                    parents=[],
                    mutations=[],
                    inherited_from=None,
                    status="missing",
                    values={},
                    steps=None,
                    trial=p,
                    trials=[],
                    duplicate_of=None,
                    on_front=False,
                    label="?",
                )
            tree.add_edge(p, child, index=i, inherited=attrs["inherited_from"] == p)
    if not nx.is_directed_acyclic_graph(tree):
        cycle = [u for u, _ in nx.find_cycle(tree)]
        raise SearchError(
            "the recorded lineage has a cycle: " + " -> ".join(f"#{n}" for n in cycle),
            hint="the storage was edited by hand or by another program",
        )
    for n in nx.topological_sort(tree):
        preds = [tree.nodes[p]["generation"] for p in tree.predecessors(n)]
        tree.nodes[n]["generation"] = 1 + max(preds) if preds else 0
    return tree


# -- paths ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Step:
    """One model on a path from a seed: its root trial number, how it came about
    (``origin``, ``parents``, ``mutations`` in the order applied, ``inherited_from``), its
    architecture label, status and values."""

    node: int
    origin: str
    parents: tuple[int, ...]
    mutations: tuple[str, ...]
    inherited_from: int | None
    label: str
    status: str
    values: dict[str, Any] = field(default_factory=dict)


def path_to(tree: nx.DiGraph, n: int) -> list[Step]:
    """The chain from the first ancestor (a seed, a sampled model, or the oldest model whose
    lineage is known) to model ``n``, following first parents; a crossover step names both
    parents. ``n`` may be any trial number of the model (a promotion or a retry is resolved
    to the model's root through ``tree.graph["roots"]``).

    Raises:
        SearchError: ``n`` is not a model of the tree.
    """
    n = tree.graph.get("roots", {}).get(n, n)
    if n not in tree:
        raise SearchError(
            f"trial {n} is not a model of the lineage",
            hint="give a trial number of the study (a front member's, e.g.)",
        )
    chain: list[int] = []
    seen: set[int] = set()
    cur: int | None = n
    while cur is not None and cur not in seen:
        seen.add(cur)
        chain.append(cur)
        parents = tree.nodes[cur]["parents"]
        cur = parents[0] if parents else None
    out = []
    for m in reversed(chain):
        a = tree.nodes[m]
        out.append(
            Step(
                node=m,
                origin=a["origin"],
                parents=tuple(a["parents"]),
                mutations=tuple(a["mutations"]),
                inherited_from=a["inherited_from"],
                label=a["label"],
                status=a["status"],
                values=dict(a["values"]),
            )
        )
    return out


def fmt_value(v: Any) -> str:
    """A value as the report prints it: 4 significant digits, ``-`` for none."""
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4g}" if math.isfinite(v) else str(v)
    return str(v)


def _how(s: Step) -> str:
    ps = " + ".join(f"#{p}" for p in s.parents)
    if s.origin in ("seed", "sampled", "missing"):
        how = s.origin if s.origin != "missing" else "not in the study"
    elif s.origin == "unknown":
        how = "lineage not recorded"
    elif s.parents:
        how = f"{s.origin} of {ps}"
    else:
        how = s.origin
    if s.inherited_from is not None:
        how += f", weights of #{s.inherited_from}"
    return how


def format_path(
    tree: nx.DiGraph,
    n: int,
    values: Mapping[str, Any] | None = None,
    metrics: Sequence[str] | None = None,
    title: str | None = None,
) -> str:
    """The printout of :func:`path_to`: a title line, one line per model (trial number, how
    it came about, architecture label) with its mutations below it in order, and the values
    at the end.

    Args:
        values: the values to end with (default: the model's own, from the tree).
        metrics: which values to show, in order (default: every one).
        title: the first line (default ``model #n``).
    """
    steps = path_to(tree, n)
    vals = dict(values if values is not None else steps[-1].values)
    keys = list(metrics) if metrics is not None else sorted(vals)
    shown = ", ".join(f"{k} {fmt_value(vals.get(k))}" for k in keys)
    w_num = max(len(f"#{s.node}") for s in steps)
    w_how = max(len(_how(s)) for s in steps)
    lines = [title if title is not None else f"model #{n}"]
    for s in steps:
        status = "" if s.status == "ok" else f"  [{s.status}]"
        lines.append(f"  {f'#{s.node}':<{w_num}}  {_how(s):<{w_how}}  {s.label}{status}")
        for m in s.mutations:
            lines.append(f"  {'':<{w_num}}    - {m}")
    lines.append(f"  = {shown}" if shown else "  = no values recorded")
    return "\n".join(lines)


# -- drawing ----------------------------------------------------------------------------------
def written_by_archir(path: str | Path) -> bool:
    """Whether ``path`` is a PNG that :func:`draw_lineage` wrote (its ``Software`` text)."""
    try:
        data = Path(path).read_bytes()[:MAX_FILE_BYTES]
    except OSError:
        return False
    if not data.startswith(_PNG_SIG):
        return False
    i = len(_PNG_SIG)
    want = b"Software\x00" + PNG_MARK.encode()
    while i + 8 <= len(data):
        length = int.from_bytes(data[i : i + 4], "big")
        kind = data[i + 4 : i + 8]
        if kind == b"tEXt" and data[i + 8 : i + 8 + length] == want:
            return True
        if kind == b"IEND":
            break
        i += 12 + length
    return False


def check_png_target(path: str | Path) -> Path:
    """``path`` checked to be writable by :func:`draw_lineage`: absent, or a regular file that
    an earlier :func:`draw_lineage` wrote (a file anyone else wrote is never overwritten).

    Raises:
        SearchError: something else is there (a link, a folder, a user's file).
    """
    p = Path(path)
    if p.is_symlink() or (p.exists() and not p.is_file()):
        raise SearchError(
            f"{p} exists and is not a regular file",
            hint="remove it or move it aside; archir writes only a lineage.png of its own there",
        )
    if p.exists() and not written_by_archir(p):
        raise SearchError(
            f"{p} exists and was not written by archir",
            hint="move it aside; archir overwrites only a lineage.png it wrote itself",
        )
    return p


_COLOURS = {"front": "tab:red", "ok": "tab:blue", "infeasible": "tab:orange"}
_MARKERS = {"seed": "s", "sampled": "D", "mutation": "o", "crossover": "h"}


def _layout(tree: nx.DiGraph) -> dict[int, tuple[float, float]]:
    """Generations left to right; within one, models ordered by the mean position of their
    parents (fewer crossing edges), then by trial number; each column centred."""
    by_gen: dict[int, list[int]] = {}
    for n, g in tree.nodes(data="generation"):
        by_gen.setdefault(int(g), []).append(n)
    tall = max(len(v) for v in by_gen.values())
    pos: dict[int, tuple[float, float]] = {}
    for g in sorted(by_gen):

        def key(n: int) -> tuple[float, int]:
            ys = [pos[p][1] for p in tree.predecessors(n) if p in pos]
            return (-sum(ys) / len(ys) if ys else 0.0, n)

        col = sorted(by_gen[g], key=key) if g else sorted(by_gen[g])
        gap = tall / len(col)
        for i, n in enumerate(col):
            pos[n] = (float(g), (len(col) - 1) / 2 * gap - i * gap)
    return pos


def draw_lineage(tree: nx.DiGraph, png_path: str | Path, title: str | None = None) -> Path:
    """Draw the family tree as a PNG (matplotlib Agg): generations left to right, an arrow
    from each parent to its child (dashed: a crossover's second parent; thick: the child
    started from that parent's weights), marker shape by origin, colour by status; front
    members and the edges of their ancestry in red; every node labelled with its trial
    number (and, up to 40 models, its architecture label). Written atomically; the file
    carries :data:`PNG_MARK` so that a later call may replace it.

    Returns:
        The path written.

    Raises:
        SearchError: ``png_path`` holds something :func:`draw_lineage` did not write, or
            cannot be written.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    from archir.paths import write_file

    path = check_png_target(png_path)
    pos = _layout(tree)
    n_nodes = tree.number_of_nodes()
    gens = 1 + max(int(g) for _, g in tree.nodes(data="generation"))
    tall = max(sum(1 for _, g in tree.nodes(data="generation") if g == k) for k in range(gens))
    width = min(4.0 + 1.6 * gens, 48.0)
    height = min(3.0 + 0.32 * tall, 48.0)
    small = n_nodes > 80
    fig, ax = plt.subplots(figsize=(width, height), dpi=100)
    ancestry: set[tuple[int, int]] = set()
    for n in [m for m, f in tree.nodes(data="on_front") if f]:
        for a in nx.ancestors(tree, n) | {n}:
            for p in tree.predecessors(a):
                ancestry.add((p, a))

    def gap(p: int, c: int) -> int:
        return int(tree.nodes[c]["generation"]) - int(tree.nodes[p]["generation"])

    for p, c, d in tree.edges(data=True):
        red = (p, c) in ancestry
        ax.annotate(
            "",
            xy=pos[c],
            xytext=pos[p],
            arrowprops={
                "arrowstyle": "-|>",
                "color": "tab:red" if red else "0.55",
                "lw": (2.0 if d.get("inherited") else 0.9) * (1.2 if red else 1.0),
                "linestyle": "--" if d.get("index", 0) > 0 else "-",
                "shrinkA": 6,
                "shrinkB": 6,
                "alpha": 0.9 if red else 0.6,
                "mutation_scale": 8,
                # an edge that skips generations bends, so it does not run through the
                # models in between (often on the same row)
                "connectionstyle": f"arc3,rad={0.25 if gap(p, c) > 1 else 0.0}",
            },
            zorder=1,
        )
    for n, a in tree.nodes(data=True):
        kind = "front" if a["on_front"] else a["status"]
        colour = _COLOURS.get(kind, "0.8")
        size = (40 if small else 110) * (1.6 if a["on_front"] else 1.0)
        r = math.sqrt(size) / 2 + 1.5  # the marker's radius and a little, in points
        ax.scatter(
            [pos[n][0]],
            [pos[n][1]],
            s=size,
            c=colour,
            marker=_MARKERS.get(a["origin"], "X"),
            edgecolors="black" if a["on_front"] else "none",
            linewidths=1.0,
            zorder=3,
        )
        ax.annotate(
            f"#{n}",
            pos[n],
            xytext=(0, r),
            textcoords="offset points",
            ha="center",
            va="bottom",
            fontsize=5 if small else 7,
            fontweight="bold" if a["on_front"] else "normal",
            zorder=4,
        )
        if n_nodes <= 40 and a["label"] != "?":
            ax.annotate(
                a["label"],
                pos[n],
                xytext=(0, -r),
                textcoords="offset points",
                ha="center",
                va="top",
                fontsize=5.5,
                color="0.25",
                zorder=4,
            )
    handles = [
        Line2D([], [], ls="", marker="o", color=_COLOURS["front"], mec="black", label="front"),
        Line2D([], [], ls="", marker="o", color=_COLOURS["ok"], label="ok"),
        Line2D([], [], ls="", marker="o", color=_COLOURS["infeasible"], label="infeasible"),
        Line2D([], [], ls="", marker="o", color="0.8", label="failed / other"),
    ]
    handles += [Line2D([], [], ls="", marker=m, color="0.4", label=o) for o, m in _MARKERS.items()]
    handles += [
        Line2D([], [], color="0.55", ls="--", label="crossover's 2nd parent"),
        Line2D([], [], color="0.55", lw=2.0, label="weights inherited"),
    ]
    ax.legend(handles=handles, fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    ax.set_xticks(range(gens))
    ax.set_xlabel("generation")
    ax.set_yticks([])
    for s in ("left", "right", "top", "bottom"):
        ax.spines[s].set_visible(False)
    ax.tick_params(axis="x", length=0)
    ax.margins(x=0.08, y=0.15)
    n_front = sum(1 for _, f in tree.nodes(data="on_front") if f)
    ax.set_title(
        title
        or f"{tree.graph.get('study') or 'lineage'}: {n_nodes} models, {gens} generations, "
        f"{n_front} on the front"
    )
    fig.tight_layout()
    try:
        write_file(
            path, lambda tmp: fig.savefig(tmp, format="png", metadata={"Software": PNG_MARK})
        )
    except OSError as exc:
        raise SearchError(
            f"cannot write {path}: {exc.strerror or exc}", hint="check the run folder's permissions"
        ) from None
    finally:
        plt.close(fig)
    return path
