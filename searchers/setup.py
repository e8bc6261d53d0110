"""The run set-up every searcher shares (DESIGN.md §7, §9): run folder, study, overrides,
``run.json``, preflight.

:func:`prepare_run` checks everything a search can be refused for — the spec, the command
line's overrides of the ``search:`` section (range-checked), names, the run folder, an
existing study, the latency runtime, decode metrics, constraints no candidate meets, and what
the searcher itself checks (:meth:`searchers.base.Searcher.prepare`) — and writes nothing.
:func:`open_run` then creates the run folder, the storage, ``run.json`` and ``spec.yaml``
and the study, remembering what it created so that a failing run removes exactly that.

**Run folder and resume rules.** The study is ``--study`` or the spec's name; the folder is
``--out`` or ``runs/<study>`` (one folder per study). Names are identifiers
(:func:`archir.paths.check_name`); ``--out`` is checked before any work, and a folder that
holds another study, another search space, another storage, another searcher or files that
archir did not write is refused. A resumed study must keep its search space, objectives,
training budget (fidelity kind, steps and the ``train:`` section, stored as
``archir:fidelity`` when the study is created) and searcher (``archir:searcher``): another
one is refused with the old and new values — start a new study (``--study``) or folder
(``--out``) instead.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import optuna
import pydantic

from archir.errors import ArchirError, Location, SearchError
from archir.paths import Created, check_name, check_out_dir, inside, write_text
from archir.spec.loader import Spec, load_spec
from archir.spec.sections import SearchSection, TrainSection
from archir.spec.space import random_decider
from searchers.base import RunPlan, Searcher
from searchers.config import (
    SearchConfig,
    _objectives,
    check_option_bounds,
    fidelity_changes,
    fidelity_signature,
)
from searchers.objectives import COST_METRICS, DECODE_METRICS, Constraint, Objective
from searchers.space import space_description, space_hash
from searchers.storage import grouped, open_storage


def prepare_run(
    spec: Spec | str | Path,
    searcher: Searcher,
    *,
    out: str | Path | None = None,
    storage: str | None = None,
    study: str | None = None,
    trials: int | None = None,
    seed: int | None = None,
    fidelity: str | None = None,
    steps: int | None = None,
    timeout_s: float | None = None,
    heartbeat_interval: int = 5,
    grace_period: int = 30,
    say: Callable[[str], None] | None = None,
) -> RunPlan:
    """Check and configure a search; write nothing.

    The ``search:`` section is the spec's, then ``searcher.section_overrides()``, then the
    common overrides given here (``None``: not given): ``trials`` and ``timeout_s`` (the
    budget), ``seed``, ``fidelity`` (kind) and ``steps`` (a proxy fidelity's step budget: a
    ``full`` fidelity becomes ``proxy``); every value range-checked
    (:func:`searchers.config.check_option_bounds` and the section's schema).

    Args:
        spec: an open spec or its file. A file is recorded as given (``spec.yaml`` is its
            text, workers read it); a spec object is written as YAML to ``spec.yaml``.
        searcher: the searcher that will run (its checks run here too).
        out, storage, study: run folder (default ``runs/<study>``), Optuna storage URL
            (default ``<run folder>/study.journal``), study name (default: the spec's name).
        heartbeat_interval, grace_period: the storage's heartbeat, seconds.

    Raises:
        SpecError: the spec is invalid. PathError: a name that is not one, an ``out`` where
            no folder can be written. SearchError: nothing to search (no search nodes, for
            a searcher that needs them), unknown objective,
            malformed constraint, an option out of range, ``--steps`` on a fidelity ladder,
            a ``train.init`` that is not a file, search nodes in ``train:`` where the
            searcher trains every trial with one ``train:`` section, unreachable storage, a
            run folder of another study or not made by archir, a study of that name with a
            different space, objectives, training budget or searcher, an unavailable
            latency runtime, decode metrics for a model that does not generate, or
            constraints no candidate meets. ArchirError: what the searcher refuses.
    """
    say = say or print
    spec_path = None if isinstance(spec, Spec) else Path(spec)
    if not isinstance(spec, Spec):
        spec = load_spec(spec)
    if spec.is_concrete and not searcher.searches_concrete:
        raise SearchError(
            f"spec '{spec.name}' has no search nodes: nothing to search",
            hint="write {choice: [...]}, {int: [lo, hi]} or {float: [lo, hi]} where a value may vary",
        )
    sec = _section(spec, searcher, trials, seed, fidelity, steps, timeout_s)
    run_dir, name = run_location(spec, out, study)
    train = searcher.prepare(spec, sec) or _train_section(spec, searcher)
    if train.init is not None:
        # every trial, worker and resumed run reads the same file: the path relative to the
        # spec file, made absolute once here
        from archir.inherit import resolve_init

        init = resolve_init(train.init, str(spec_path) if spec_path else spec.file)
        if not init.is_file():
            raise SearchError(
                f"train.init '{train.init}' is not a file (looked for {init})",
                hint="a model.safetensors, relative to the spec file's folder (archir import "
                "hf writes one)",
            )
        train = train.model_copy(update={"init": str(init.resolve())})
    shash = space_hash(spec.nodes)
    cfg = SearchConfig(
        spec_path=str(spec_path or run_dir / "spec.yaml"),
        run_dir=str(run_dir),
        storage_url=storage,
        study_name=name,
        search=sec.model_dump(),
        train=train.model_dump(),
        space_hash=shash,
        trials=sec.budget.trials,
        timeout_s=sec.budget.timeout_s,
        workers=sec.workers,
        heartbeat_interval=heartbeat_interval,
        grace_period=grace_period,
        searcher=searcher.name,
    )
    objectives, constraints, _ = _objectives(cfg)
    fid_sig = fidelity_signature(cfg)
    check_run_folder(run_dir, name, shash, storage, searcher.name)
    journal_exists = storage is None and cfg.journal.exists()
    st = (
        open_storage(storage, cfg.journal, heartbeat_interval, grace_period, say=say)
        if storage is not None or journal_exists
        else None
    )
    if st is not None:
        check_study(st, name, shash, objectives, fid_sig, searcher.name)
    used = {o.metric for o in objectives} | {c.metric for c in constraints}
    if "latency_ms" in used:
        from searchers.latency import check_available

        check_available(sec.latency)
    if used & set(DECODE_METRICS) and spec.data.get("model", {}).get("task") not in (
        None,
        "causal_lm",
    ):
        raise SearchError(
            f"{', '.join(sorted(used & set(DECODE_METRICS)))} measure generating text: "
            f"only a causal language model decodes (this spec's model.task is "
            f"{spec.data['model']['task']})",
            hint="drop the decode metrics from search.objectives / search.constraints",
        )
    preflight(spec, constraints, max(64, sec.max_rejections), sec.seed)
    return RunPlan(
        spec=spec,
        spec_file=str(spec_path or spec.file or run_dir / "spec.yaml"),
        spec_text=spec_path.read_text(encoding="utf-8") if spec_path else spec.to_yaml(),
        run_dir=run_dir,
        study_name=name,
        storage_url=storage,
        searcher=searcher,
        section=sec,
        cfg=cfg,
        objectives=objectives,
        constraints=constraints,
        fidelity=fid_sig,
        space_hash=shash,
        storage=st,
    )


def open_run(
    plan: RunPlan, created: Created, say: Callable[[str], None] | None = None
) -> optuna.Study:
    """Create what :func:`prepare_run` planned: the run folder, the storage (a journal in
    the folder unless a URL was given), ``run.json`` (with the searcher's name and its
    :meth:`~searchers.base.Searcher.record`) and ``spec.yaml``, the study (or load it), and
    ``trials/``. What did not exist is remembered in ``created``: ``created.undo()``
    removes exactly that.

    Returns:
        the study (Optuna's default sampler: a searcher sets its own).

    Raises:
        SearchError: see :func:`check_study` (another process made the study meanwhile).
    """
    say = say or print
    cfg = plan.cfg
    created.mkdir(plan.run_dir)
    st = plan.storage
    if st is None:
        if plan.storage_url is None:
            created.file(cfg.journal)
        st = open_storage(
            plan.storage_url, cfg.journal, cfg.heartbeat_interval, cfg.grace_period, say=say
        )
    write_run_files(
        plan.run_dir,
        created,
        spec=plan.spec,
        spec_file=plan.spec_file,
        spec_text=plan.spec_text,
        study=plan.study_name,
        storage=plan.storage_url,
        shash=plan.space_hash,
        objectives=plan.objectives,
        constraints=plan.constraints,
        section=plan.section,
        fidelity=plan.fidelity,
        searcher=plan.searcher.name,
        **plan.searcher.record(),
    )
    study = create_or_load_study(
        st,
        plan.study_name,
        plan.spec,
        plan.space_hash,
        plan.objectives,
        plan.constraints,
        plan.fidelity,
        plan.searcher.name,
    )
    created.mkdir(plan.run_dir / "trials")
    return study


def _section(
    spec: Spec,
    searcher: Searcher,
    trials: int | None,
    seed: int | None,
    fidelity: str | None,
    steps: int | None,
    timeout_s: float | None,
) -> SearchSection:
    """The spec's ``search:`` section with the searcher's and the given overrides.

    Raises:
        SearchError: a value out of range or of the wrong kind (the flag and the
            ``search:`` path named), ``steps`` on a fidelity ladder.
    """
    sec = SearchSection.model_validate(spec.data.get("search") or {})
    upd: dict[str, Any] = dict(searcher.section_overrides())
    if seed is not None:
        upd["seed"] = seed
    fid = sec.fidelity.model_dump()
    if fidelity is not None:
        fid["kind"] = fidelity
    if steps is not None:
        if fid["kind"] == "ladder":
            raise SearchError(
                f"--steps {steps} does not apply to a fidelity ladder: its budget is its rungs "
                f"({fid.get('rungs') or 'default'})",
                hint="set search.fidelity.rungs in the spec, or --fidelity proxy --steps N",
            )
        fid["steps"] = steps
        if fid["kind"] == "full":
            fid["kind"] = "proxy"
    upd["fidelity"] = fid
    budget = sec.budget.model_dump()
    if trials is not None:
        budget["trials"] = trials
    if timeout_s is not None:
        budget["timeout_s"] = timeout_s
    upd["budget"] = budget
    try:
        sec = SearchSection.model_validate({**sec.model_dump(), **upd})
    except pydantic.ValidationError as exc:
        raise _option_error(exc) from None
    check_option_bounds(
        trials=sec.budget.trials,
        workers=sec.workers,
        steps=sec.fidelity.steps,
        seed=sec.seed,
        timeout_s=sec.budget.timeout_s,
    )
    return sec


def _train_section(spec: Spec, searcher: Searcher) -> TrainSection:
    """The spec's ``train:`` section, which every trial trains with.

    Raises:
        SearchError: it holds search nodes (one ``train:`` section serves every trial).
    """
    nodes = sorted({n.name for n in spec.nodes if n.path[:1] == ("train",)})
    if nodes:
        raise SearchError(
            f"{nodes[0]} is a search node, but --searcher {searcher.name} trains every trial "
            "with one train: section",
            hint="give it one value (a search per value), or use a one-shot searcher "
            "(--searcher darts or spos), which holds it at one value",
        )
    return TrainSection.model_validate(spec.data.get("train") or {})


def preflight(spec: Spec, constraints: list[Constraint], tries: int, seed: int) -> None:
    """Refuse a search whose cost constraints no candidate meets: draw up to ``tries``
    random candidates through the cost pass (no training) and stop at the first feasible one.

    Raises:
        SearchError: none met the cost constraints; the closest three are listed.
    """
    from archir.cost import analyze

    cost_cons = [c for c in constraints if c.metric in COST_METRICS]
    if not cost_cons:
        return
    rng = random.Random(seed)
    seen: list[tuple[float, str]] = []
    for _ in range(tries):
        try:
            concrete = spec.fix(random_decider(rng))
            cost = analyze(concrete)
        except ArchirError:
            continue
        values = {k: float(getattr(cost, k)) for k in COST_METRICS}
        if all(c.ok(values[c.metric]) for c in cost_cons):
            return
        rel = sum(c.relative_violation(values[c.metric]) for c in cost_cons)
        broken = "; ".join(
            c.describe(values[c.metric]) for c in cost_cons if not c.ok(values[c.metric])
        )
        seen.append((rel, f"{json.dumps(concrete.decisions, default=str)}: {broken}"))
    seen.sort(key=lambda x: x[0])
    raise SearchError(
        f"no candidate meets the constraints ({len(seen)} of {tries} random candidates "
        f"checked by cost analysis); closest: " + " | ".join(s for _, s in seen[:3]),
        hint="loosen search.constraints or shrink the space",
    )


def run_location(spec: Spec, out: str | Path | None, study: str | None) -> tuple[Path, str]:
    """The run folder and study name of a search, checked before any work: the study is
    ``study`` or the spec's name, the folder ``out`` or ``runs/<study>`` (one folder per
    study, so two studies never share a default folder).

    Raises:
        PathError: the spec's name or ``study`` is not a name (:func:`archir.paths.check_name`:
            no ``.``/``..``, separators ...); ``out`` is a file, or nothing can be written there.
    """
    check_name(spec.name, "spec name", Location(file=spec.file, field="name"))
    name = check_name(study, "--study") if study is not None else spec.name
    if out is not None:
        return check_out_dir(out, "--out"), name
    return check_out_dir(Path("runs") / name, "run folder"), name


#: what a run folder may hold that archir wrote (anything else: not a run folder)
_MARKERS = ("run.json", "study.journal")
_OWN_PATHS = (
    "run.json",
    "study.journal",
    "spec.yaml",
    "trials",
    "best",
    "pareto.json",
    "pareto.png",
    "arch_weights.json",
    "oneshot.json",
)
_MAX_RUN_JSON = 16 * 2**20


def check_run_folder(
    run_dir: Path, name: str, shash: str, storage: str | None, searcher: str = "optuna"
) -> None:
    """Refuse a folder this search must not write into, before any work: one holding files
    but neither ``run.json`` nor ``study.journal`` (not an archir run folder: its files would
    be overwritten), an unreadable ``run.json``, or a run folder of another study, search
    space, storage or searcher (trial folders would collide; a study keeps its searcher);
    and any of archir's own paths in it that leads outside it (a link).

    Raises:
        SearchError, PathError: with the folder, what it holds and what to do.
    """
    if not run_dir.is_dir():
        return
    try:
        entries = {p.name for p in run_dir.iterdir()}
    except OSError as exc:
        raise SearchError(f"cannot read the run folder {run_dir}: {exc.strerror}") from None
    if not entries:
        return
    if not entries & set(_MARKERS):
        shown = ", ".join(sorted(entries)[:3]) + (" ..." if len(entries) > 3 else "")
        raise SearchError(
            f"{run_dir} is not empty ({shown}) and is not an archir run folder (no run.json)",
            hint="give --out a new or empty folder",
        )
    for own in _OWN_PATHS:
        if own in entries:
            inside(run_dir, run_dir / own)
    rj = run_dir / "run.json"
    if "run.json" not in entries:
        return  # a set-up cut short after the storage was created: resumed
    if not rj.is_file() or rj.stat().st_size > _MAX_RUN_JSON:
        raise SearchError(
            f"{rj} is not a run.json archir wrote (not a regular file, or too large)",
            hint="give another --out, or remove the folder",
        )
    try:
        prev = json.loads(rj.read_text(encoding="utf-8"))
        if not isinstance(prev, dict):
            raise ValueError("not a JSON object")
    except (OSError, ValueError) as exc:
        raise SearchError(
            f"{rj} cannot be read: {str(exc)[:120]}",
            hint="give another --out, or remove the folder",
        ) from None
    if prev.get("study") != name:
        raise SearchError(
            f"{run_dir} holds study {prev.get('study')!r}, not {name!r}",
            hint="each study needs its own folder: give another --out (or none: runs/<study>)",
        )
    if prev.get("space_hash") != shash:
        raise SearchError(
            f"{run_dir} holds study '{name}' of a different search space",
            hint="give another --out or --study, or delete the folder",
        )
    here = storage or "study.journal"
    if prev.get("storage", here) != here:
        raise SearchError(
            f"{run_dir} holds study '{name}' stored in {prev.get('storage')!r}, not {here!r}",
            hint="resume with the same --storage, or give another --out",
        )
    # run.json without "searcher": an Optuna search; "darts-softmax"/"darts-gumbel": the
    # one-shot runs of earlier versions, which recorded the relaxation with the name
    was = str(prev.get("searcher") or "optuna").split("-")[0]
    if was != searcher:
        raise _other_searcher(f"{run_dir} holds study '{name}'", was, searcher)


def _other_searcher(what: str, was: str, now: str) -> SearchError:
    return SearchError(
        f"{what}, searched by --searcher {was}, not {now}",
        hint=f"resume with --searcher {was}, or start a new study: --study NAME (or another --out)",
    )


def check_study(
    st: optuna.storages.BaseStorage,
    name: str,
    shash: str,
    objectives: list[Objective],
    fidelity: dict[str, Any],
    searcher: str = "optuna",
) -> bool:
    """Refuse to resume a study that searches another space, optimizes other objectives,
    trains at another budget (``archir:fidelity``; see
    :func:`searchers.config.fidelity_signature`) or was searched by another searcher
    (``archir:searcher``; a study made before it was recorded takes any).

    Returns:
        whether the study exists.

    Raises:
        SearchError: naming what changed, the old and the new value.
    """
    try:
        sid = st.get_study_id_from_name(name)
    except KeyError:
        return False
    attrs = st.get_study_user_attrs(sid)
    old = attrs.get("archir:space_hash")
    if old is None and st.get_all_trials(sid, deepcopy=False):
        raise SearchError(
            f"study '{name}' exists in the storage and was not made by archir",
            hint="use another --study name",
        )
    if old is not None and old != shash:
        raise SearchError(
            f"study '{name}' already exists in the storage with a different search space",
            hint="use another --study name (or --out folder)",
        )
    stored = st.get_study_directions(sid)
    if len(stored) != len(objectives):
        raise SearchError(
            f"study '{name}' exists with {len(stored)} objective(s), the spec has "
            f"{len(objectives)}",
            hint="use another --study name",
        )
    old_objs = attrs.get("archir:objectives")
    new_objs = [[o.metric, o.direction] for o in objectives]
    if old_objs is not None and [list(x) for x in old_objs] != new_objs:
        raise SearchError(
            f"study '{name}' optimizes "
            + ", ".join(f"{m} ({d})" for m, d in old_objs)
            + ", the spec "
            + ", ".join(f"{m} ({d})" for m, d in new_objs),
            hint="use another --study name",
        )
    old_fid = attrs.get("archir:fidelity")
    changes = fidelity_changes(old_fid, fidelity) if old_fid is not None else []
    if changes:
        raise SearchError(
            f"study '{name}' was trained at another budget than this run asks for: "
            + "; ".join(changes)
            + " (a study keeps one training budget, so its front compares like with like)",
            hint="resume with the same --fidelity/--steps and train: section, or start a new "
            "study: --study NAME (or another --out)",
        )
    was = attrs.get("archir:searcher")
    if was is not None and was != searcher:
        raise _other_searcher(f"study '{name}' exists", str(was), searcher)
    return True


def create_or_load_study(
    st: optuna.storages.BaseStorage,
    name: str,
    spec: Spec,
    shash: str,
    objectives: list[Objective],
    constraints: list[Constraint],
    fidelity: dict[str, Any],
    searcher: str = "optuna",
) -> optuna.Study:
    """Create the study (or load it) and store what a resume is checked against — space
    hash, objectives, constraints, the open spec, the fidelity and the searcher — in one
    grouped write; then check it again (another process may have created it meanwhile).

    Raises:
        SearchError: see :func:`check_study`.
    """
    study = optuna.create_study(
        storage=st,
        study_name=name,
        directions=[
            optuna.study.StudyDirection.MINIMIZE
            if o.direction == "minimize"
            else optuna.study.StudyDirection.MAXIMIZE
            for o in objectives
        ],
        load_if_exists=True,
    )
    want: dict[str, Any] = {
        "archir:space_hash": shash,
        "archir:objectives": [[o.metric, o.direction] for o in objectives],
        "archir:constraints": [[c.metric, c.text] for c in constraints],
        "archir:spec": spec.to_yaml(),
        "archir:fidelity": fidelity,
        "archir:searcher": searcher,
    }
    if study.metric_names is None:  # names on the study: optuna-dashboard shows them
        study.set_metric_names([o.metric for o in objectives])
    have = study.user_attrs
    missing = {k: v for k, v in want.items() if k not in have}
    if missing:
        with grouped(st):
            for k, v in missing.items():
                study.set_user_attr(k, v)
    check_study(st, name, shash, objectives, fidelity, searcher)
    return study


def write_run_files(
    run_dir: Path,
    created: Created,
    *,
    spec: Spec,
    spec_file: str,
    spec_text: str,
    study: str,
    storage: str | None,
    shash: str,
    objectives: list[Objective],
    constraints: list[Constraint],
    section: SearchSection,
    fidelity: dict[str, Any],
    **extra: Any,
) -> None:
    """Write ``run.json`` (first: it marks the folder as a run folder; ``extra`` keys are
    added to it) and ``spec.yaml`` (``spec_text``) atomically with normal permissions; files
    that did not exist are remembered in ``created`` (removed if the run fails)."""
    doc = {
        "spec": spec_file,
        "study": study,
        "storage": storage or "study.journal",
        "space_hash": shash,
        "space": space_description(spec.nodes),
        "objectives": {o.metric: o.direction for o in objectives},
        "constraints": {c.metric: c.text for c in constraints},
        "search": section.model_dump(),
        "fidelity": fidelity,
        **extra,
    }
    for fname, text in (
        ("run.json", json.dumps(doc, indent=2, default=str)),
        ("spec.yaml", spec_text),
    ):
        p = run_dir / fname
        if not p.exists():
            created.file(p)
        write_text(p, text)


_FLAGS = {
    ("budget", "trials"): "--trials",
    ("budget", "timeout_s"): "--timeout",
    ("workers",): "--workers",
    ("seed",): "--seed",
    ("sampler",): "--sampler",
    ("fidelity", "kind"): "--fidelity",
    ("fidelity", "steps"): "--steps",
}


def _option_error(exc: pydantic.ValidationError) -> SearchError:
    """A one-line error for a search option override that fails validation: the option
    (``--flag`` and ``search.`` path), pydantic's message and the value given."""
    err = exc.errors()[0]
    loc = tuple(str(x) for x in err.get("loc", ()))
    path = "search." + ".".join(loc)
    flag = _FLAGS.get(loc)
    name = f"{flag} ({path})" if flag else path
    got = err.get("input")
    msg = str(err.get("msg", "invalid value"))
    return SearchError(
        f"bad search option {name}: {msg[:1].lower() + msg[1:]} (got {got!r})",
        hint="see 'archir search --help'",
    )
