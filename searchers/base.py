"""One interface for every searcher (DESIGN.md §7) and the registry the CLI looks them up in.

A :class:`Searcher` takes the search space (an open spec), an evaluator
(:class:`searchers.run.Evaluator`: exact cost, latency, training at the search's fidelity),
the objectives and constraints, a budget and a storage, and returns a Pareto front of
concrete specs with their measurements (:class:`searchers.config.SearchResult`). All of
that but the choosing is the shared set-up of :mod:`searchers.setup` — run folder, study,
the command line's overrides of the ``search:`` section, ``run.json``, preflight — done
once by :func:`searchers.run.run_search` for every searcher::

    searcher = get_searcher(name)(**its_options)     # refuses options it does not take
    plan = prepare_run(spec, searcher, ...)          # every check; nothing written yet
    study = open_run(plan, created)                  # run folder, storage, run.json, study
    result = searcher.search(plan, study, export=..., say=...)

Adding a searcher: subclass :class:`Searcher` (or :class:`searchers.run.OptunaSearcher`,
whose :meth:`~Searcher.search` runs the worker loop of :mod:`searchers.run`: the same
evaluator and study, ``SearchConfig.searcher`` telling the workers who proposes) and add its
entry to :data:`BUILTIN` below (or call :func:`register_searcher`). The name is what
``--searcher`` takes, what ``run.json`` and the study record (``archir:searcher``), and what
a resumed run must give again; a searcher's own CLI flags are those of its
:attr:`Searcher.options` that :mod:`searchers.cli_search` defines.
"""

from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from archir.errors import SearchError

if TYPE_CHECKING:
    from pathlib import Path

    import optuna

    from archir.spec.loader import Spec
    from archir.spec.sections import SearchSection, TrainSection
    from searchers.config import SearchConfig, SearchResult
    from searchers.objectives import Constraint, Objective


@dataclass
class RunPlan:
    """A search checked and configured by :func:`searchers.setup.prepare_run`; nothing written yet.

    Attributes:
        spec: the open spec. spec_file: its file as ``run.json`` records it.
        spec_text: what ``spec.yaml`` holds (the file as given, else the spec's YAML).
        run_dir: the run folder. study_name: the study. storage_url: ``--storage`` or None
            (``<run_dir>/study.journal``).
        searcher: the searcher that will run.
        section: the ``search:`` section with every override applied.
        cfg: what a worker needs (:class:`searchers.config.SearchConfig`).
        objectives, constraints: parsed from ``section``.
        fidelity: the study's training budget (:func:`searchers.config.fidelity_signature`).
        space_hash: :func:`searchers.space.space_hash` of the spec's nodes.
        storage: the storage, opened when it existed already (else None: :func:`searchers.setup.open_run`
            creates it).
    """

    spec: Spec
    spec_file: str
    spec_text: str
    run_dir: Path
    study_name: str
    storage_url: str | None
    searcher: Searcher
    section: SearchSection
    cfg: SearchConfig
    objectives: list[Objective]
    constraints: list[Constraint]
    fidelity: dict[str, Any]
    space_hash: str
    storage: optuna.storages.BaseStorage | None = None


class Searcher(ABC):
    """Chooses the architectures of one search (DESIGN.md §7).

    Constructed with its own options (keyword arguments of :func:`searchers.run.run_search`
    beyond the common ones, the CLI's searcher flags); run on a :class:`RunPlan`
    by :meth:`search`. The hooks :meth:`section_overrides`, :meth:`prepare` and
    :meth:`record` let it take part in the shared set-up; each runs before anything is written.

    Attributes:
        name: what ``--searcher`` takes (class attribute).
        family: what kind of searcher, in messages: ``"trial-based"``, ``"one-shot"``.
        options: the options it takes beyond the common ones (``out``, ``storage``,
            ``study``, ``trials``, ``seed``, ``fidelity``, ``steps``, ``timeout_s``,
            ``export``); the CLI flag of option ``x_y`` is ``--x-y``.
        given: the options it was constructed with.
        searches_concrete: whether it searches a concrete spec too (evolution mutates the
            graph itself); the others need search nodes.

    Raises:
        SearchError: (constructor) an option it does not take: one another searcher takes
            is named with who takes it (:func:`refuse_options`).
    """

    name: ClassVar[str] = ""
    family: ClassVar[str] = ""
    options: ClassVar[frozenset[str]] = frozenset()
    searches_concrete: ClassVar[bool] = False

    def __init__(self, **options: Any) -> None:
        refuse_options(type(self), {k: k for k in options})
        self.given = options

    def section_overrides(self) -> dict[str, Any]:
        """``search:`` fields this searcher sets over the spec's (``{"sampler": "tpe"}``,
        ``{"pruner": "none"}``), before the command line's common overrides."""
        return {}

    def prepare(self, spec: Spec, section: SearchSection) -> TrainSection | None:
        """Checks that need the spec and the ``search:`` section, before anything is written.

        Returns:
            the ``train:`` section the trials train with when it is not the spec's own
            (a one-shot supernet holds search nodes there at one value), else None.

        Raises:
            ArchirError: the spec cannot be searched this way.
        """
        return None

    def record(self) -> dict[str, Any]:
        """Keys this searcher adds to ``run.json`` (beyond ``searcher``: its name)."""
        return {}

    @abstractmethod
    def search(
        self,
        run: RunPlan,
        study: optuna.Study,
        *,
        export: bool,
        say: Callable[[str], None],
    ) -> SearchResult:
        """Search: propose, have ``run``'s evaluator measure, record in ``study``; then the
        front (:func:`searchers.pareto.finalize`: ``pareto.json``, ``best/``, ONNX export
        when ``export``).

        Returns:
            the front and the best trial; searcher-specific summaries in ``extra``.

        Raises:
            ArchirError: a failure the user can act on (the caller removes what the run
                created). KeyboardInterrupt: interrupted (resumable).
        """

    @classmethod
    def summary(cls, result: SearchResult) -> list[str]:
        """Lines the CLI prints after the front's report."""
        return [f"search finished in {result.wall_s:.1f} s: {result.run_dir}"]


# -- the registry ---------------------------------------------------------------------------
_REGISTRY: dict[str, type[Searcher] | str] = {}
_SUMMARIES: dict[str, str] = {}


def register_searcher(name: str, searcher: type[Searcher] | str, summary: str = "") -> None:
    """Make ``searcher`` available as ``--searcher name``.

    Args:
        name: the registry name (letters, digits, ``-``).
        searcher: the class, or ``"module:Class"`` imported when first asked for (so that
            ``archir --help`` does not import torch).
        summary: one line for ``archir search --help``.

    Raises:
        ValueError: ``name`` is registered already (a programming error).
    """
    if name in _REGISTRY:
        raise ValueError(f"searcher '{name}' is registered already")
    _REGISTRY[name] = searcher
    _SUMMARIES[name] = summary


def searcher_names() -> list[str]:
    """The registered names, in registration order (the built-ins first)."""
    return list(_REGISTRY)


def searcher_summaries() -> dict[str, str]:
    """``{name: one-line summary}`` for help texts (imports nothing)."""
    return dict(_SUMMARIES)


def get_searcher(name: str) -> type[Searcher]:
    """The searcher class registered as ``name``.

    Raises:
        SearchError: no searcher of that name; the hint lists the names.
    """
    entry = _REGISTRY.get(name)
    if entry is None:
        raise SearchError(
            f"unknown searcher '{name}'", hint="one of: " + ", ".join(searcher_names())
        )
    if isinstance(entry, str):
        module, _, attr = entry.partition(":")
        entry = getattr(importlib.import_module(module), attr)
        assert isinstance(entry, type) and issubclass(entry, Searcher), entry
        _REGISTRY[name] = entry
    if entry.name != name:
        raise ValueError(f"searcher class {entry.__name__} is named '{entry.name}', not '{name}'")
    return entry


def refuse_options(cls: type[Searcher], given: Mapping[str, str]) -> None:
    """Refuse options ``cls`` does not take, naming who takes them.

    Args:
        cls: the searcher.
        given: option name -> how the user wrote it (``"relax"``, or ``"--relax"`` from
            the command line).

    Raises:
        SearchError: ``--relax does not apply to --searcher spos: --relax applies to
            --searcher darts only`` (a sibling of the same family takes it), ``... applies
            to the one-shot searchers only`` (searchers of another family take it), or
            ``unknown one-shot option 'temperature'`` (no searcher takes it).
    """
    refused = [k for k in given if k not in cls.options]
    if not refused:
        return
    takers = {k: [n for n in searcher_names() if k in get_searcher(n).options] for k in refused}
    unknown = [k for k in refused if not takers[k]]
    if unknown:
        raise SearchError(
            f"unknown {cls.family} option '{given[unknown[0]]}'",
            hint=", ".join(sorted(cls.options)) or f"--searcher {cls.name} takes none",
        )
    first = refused[0]
    who = takers[first]
    families = {get_searcher(n).family for n in who}
    if cls.family in families or len(families) != 1:
        where = "--searcher " + " / ".join(who)
    else:
        where = f"the {families.pop()} searchers"
    shown = [given[k] for k in refused]
    raise SearchError(
        f"{shown[0]} does not apply to --searcher {cls.name}"
        + (f" (nor {', '.join(shown[1:])})" if shown[1:] else "")
        + f": {shown[0]} applies to {where} only",
        hint=f"drop {shown[0]}, or use --searcher {who[0]}"
        + (f" (or {', '.join(who[1:])})" if who[1:] else ""),
    )


#: the searchers archir ships (imported when first asked for)
BUILTIN = (
    (
        "optuna",
        "searchers.run:OptunaSearcher",
        "trial by trial with Optuna's samplers (TPE / NSGA-II / random / GP; default)",
    ),
    (
        "darts",
        "searchers.oneshot:DartsSearcher",
        "one-shot supernet with relaxed choices (first-order DARTS; --relax gumbel: GDAS)",
    ),
    (
        "spos",
        "searchers.oneshot:SposSearcher",
        "single-path one-shot supernet + evolutionary selection of its sub-networks",
    ),
    (
        "evolution",
        "searchers.run:EvolutionSearcher",
        "mutates the graph itself within search.evolution (lineage, weight inheritance)",
    ),
)
for _name, _target, _summary in BUILTIN:
    register_searcher(_name, _target, _summary)
