"""Evolution that mutates the concrete graph itself (``archir search --searcher evolution``).

The genome is the concrete spec: its layer groups unrolled into **layers** (one repeat of a
group's blocks; a run of layers with ``share_weights`` is one set of weights). A child is
one or two parents changed by operators the spec's ``search.evolution`` section allows
(:class:`archir.spec.sections.EvolutionSection`):

* ``swap_token_mixer`` / ``swap_channel_mixer``: a block (a whole shared run) takes another
  allowed kind, its knobs drawn from that kind's listed values;
* ``insert_layer`` (a copy of a neighbour, or a new layer with freshly drawn mixers) and
  ``drop_layer``, within ``depth``;
* ``d_model`` (head counts repaired to divide it), ``expansion``, ``d_state``, ``n_heads``
  (within the kind's listed values), ``bits`` (a mixer's weight bits);
* ``share_weights``: tie a run of identical neighbouring layers, or untie one;
* ``skip``: add or remove a DenseFormer-style input (the block then reads a learned
  weighted average of the previous output and an earlier layer's output; Pagliardini et
  al., 2024);
* crossover: the first layers of one parent and the last of the other, cut at layer
  boundaries (model-wide settings from the first).

Selection is constraint-aware and elitist in the NSGA-II way (Deb et al., 2002): models are
ordered by the ladder rung they reached (a model promoted further beat its cohort), then
feasibility (smaller total constraint violation first), then Pareto rank and crowding on the
search's objectives at that rung; parents are drawn by binary tournaments from the best
``population`` of them. Before any training a child must validate, pass the shape and cost
passes and the cost constraints, and not be a model the study has already seen (canonical
hash); otherwise it is redrawn, and the number of redrawn proposals is recorded with the
child (``lineage.rejected``).

Lineage (the trial's ``archir:trial`` record, key ``lineage``): ``origin`` (``seed``,
``sampled``, ``mutation``, ``crossover``), ``parents`` (trial numbers), ``mutations`` (one line
each), ``inherited_from`` (the trial whose weights the child started from, or None),
``rejected`` (proposals redrawn before this one). :mod:`searchers.lineage` draws the tree.

Weight inheritance (``inherit: true``): every block of a child remembers which block of
which parent it came from; the parent's trained ``model.safetensors`` is renamed onto the
child's block indices and loaded by :func:`archir.inherit.inherit` (same shape copied,
resized sliced or padded, new blocks fresh).
"""

from __future__ import annotations

import copy
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from optuna.trial import FrozenTrial, TrialState

from archir.errors import ArchirError, SearchError
from archir.spec.loader import Spec
from archir.spec.sections import EvolutionSection
from searchers.ladder import continues, crowding, pareto_ranks
from searchers.objectives import (
    PRE_TRAINING,
    Constraint,
    Objective,
    check_constraints,
    trial_attrs,
)

#: system attributes of a queued evolution trial: its concrete spec (YAML), its lineage and
#: how its blocks map onto its parents' (for weight inheritance)
ATTR_GENOME = "archir:genome"
ATTR_LINEAGE = "archir:lineage"
ATTR_ORIGINS = "archir:origins"
#: the queued child's spec hash (proposals in flight are not proposed twice)
ATTR_GENOME_HASH = "archir:genome_hash"
#: the population when neither ``search.evolution.population`` nor ``search.population`` is set
DEFAULT_POPULATION = 8
#: block keys every kind has (kept when a block's kind is swapped)
_COMMON = ("norm", "bits", "name", "inputs", "merge", "residual", "residual_scale")

#: a block's origin: (index of the parent in ``parents``, the parent's weight-block index)
Origin = tuple[int, int] | None


# -- the genome -------------------------------------------------------------------------------
@dataclass
class Layer:
    """One layer: a repeat of a layer group's ``blocks``.

    ``origins[i]`` is where block ``i``'s weights come from; ``run`` is an id shared by the
    layers of one weight-shared run (None: weights of its own); ``residual`` is the group's
    residual structure."""

    blocks: list[dict[str, Any]]
    origins: list[Origin]
    residual: str = "pre_norm"
    run: int | None = None

    def roles(self) -> list[str]:
        return [_role(b) for b in self.blocks]


@dataclass
class Genome:
    """A concrete spec as evolution sees it: the spec data (model-wide settings, train, search)
    and its layers."""

    data: dict[str, Any]
    layers: list[Layer]
    mutations: list[str] = field(default_factory=list)

    @property
    def d_model(self) -> int:
        return int(self.data["model"]["d_model"])

    def copy(self) -> Genome:
        return copy.deepcopy(self)


def _role(block: dict[str, Any]) -> str:
    from archir import registry

    role = block.get("role")
    if isinstance(role, str):
        return role
    try:
        return registry.get(str(block.get("kind"))).role
    except KeyError:
        return "?"


def genome_of(data: dict[str, Any], parent: int = 0) -> Genome:
    """Unroll a concrete spec's layer groups into layers; every block's origin is its own
    weight-block index in ``data`` (the ``blocks.{i}`` of its ``state_dict``), tagged with
    parent slot ``parent``."""
    data = copy.deepcopy(data)
    layers: list[Layer] = []
    index = 0
    run_id = 0
    for gi, g in enumerate(data["model"]["layers"]):
        repeat = int(g.get("repeat", 1))
        stage = [k for k in ("d_model", "downsample") if g.get(k) is not None]
        if stage:
            raise SearchError(
                f"model.layers.{gi}: evolution cannot mutate a vision hierarchy yet (this "
                f"group opens a stage: {', '.join(stage)}); its operators would move blocks "
                "across stages of different widths",
                hint="search its choices with --searcher tpe, nsga2, random or gp",
            )
        if repeat > 1 and any("name" in b or "inputs" in b for b in g["blocks"]):
            raise SearchError(
                f"model.layers.{gi}: evolution cannot unroll a repeated layer group with named "
                "blocks or inputs (each repeat would reuse the names)",
                hint="write the repeats out as groups of their own",
            )
        shared = bool(g.get("share_weights", False)) and repeat > 1
        residual = g.get("residual", "pre_norm")
        if shared:
            run_id += 1
            origins: list[Origin] = [(parent, index + i) for i in range(len(g["blocks"]))]
            index += len(g["blocks"])
        for _ in range(repeat):
            if not shared:
                origins = [(parent, index + i) for i in range(len(g["blocks"]))]
                index += len(g["blocks"])
            layers.append(
                Layer(
                    copy.deepcopy(g["blocks"]),
                    list(origins),
                    residual,
                    run_id if shared else None,
                )
            )
    return Genome(data, layers)


def _same(a: Layer, b: Layer) -> bool:
    return a.blocks == b.blocks and a.residual == b.residual


def to_data(g: Genome) -> tuple[dict[str, Any], list[Origin]]:
    """The spec data of genome ``g`` (consecutive identical layers without names folded into
    ``repeat`` groups; a shared run into one ``share_weights`` group) and, for each weight
    block of the result in ``state_dict`` order, its origin."""
    groups: list[dict[str, Any]] = []
    origins: list[Origin] = []
    i = 0
    n = len(g.layers)
    while i < n:
        lay = g.layers[i]
        j = i + 1
        if lay.run is not None:
            while j < n and g.layers[j].run == lay.run:
                j += 1
        else:
            named = any("name" in b for b in lay.blocks)
            while (
                not named
                and j < n
                and g.layers[j].run is None
                and _same(lay, g.layers[j])
                and g.layers[j].origins == lay.origins
            ):
                j += 1
        grp: dict[str, Any] = {"repeat": j - i}
        if lay.run is not None and j - i > 1:
            grp["share_weights"] = True
        if lay.residual != "pre_norm":
            grp["residual"] = lay.residual
        grp["blocks"] = copy.deepcopy(lay.blocks)
        groups.append(grp)
        if lay.run is not None and j - i > 1:
            origins += lay.origins
        else:
            for k in range(i, j):
                origins += g.layers[k].origins
        i = j
    data = copy.deepcopy(g.data)
    data["model"]["layers"] = groups
    return data, origins


# -- what evolution may draw from ------------------------------------------------------------
@dataclass
class Space:
    """The ranges of :class:`EvolutionSection`, completed from the seed spec where the
    section leaves them out."""

    token_mixers: dict[str, dict[str, Any]]
    channel_mixers: dict[str, dict[str, Any]]
    depth: tuple[int, int]
    d_model: list[int]
    bits: list[float]
    rates: dict[str, float]
    crossover: float
    mutations: int
    population: int
    inherit: bool
    max_proposals: int

    def kinds(self, role: str) -> dict[str, dict[str, Any]]:
        return self.token_mixers if role == "token_mixer" else self.channel_mixers


def _as_list(v: Any) -> list[Any]:
    return list(v) if isinstance(v, list) else [v]


def make_space(sec: EvolutionSection, seed_data: dict[str, Any], population: int | None) -> Space:
    """Check the ``search.evolution`` section against the registry and complete it from the
    seed spec (its kinds and knobs, depth, ``d_model``).

    Raises:
        SearchError: an unknown kind, a kind of the wrong role, a knob the kind does not
            have or a value it refuses (the message names the field path).
    """
    from archir import registry

    g = genome_of(seed_data)
    used: dict[str, dict[str, dict[str, Any]]] = {"token_mixer": {}, "channel_mixer": {}}
    for lay in g.layers:
        for b in lay.blocks:
            role = _role(b)
            if role in used:
                knobs = {k: v for k, v in b.items() if k not in (*_COMMON, "kind", "role")}
                used[role].setdefault(str(b["kind"]), knobs)
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for role, given in (("token_mixer", sec.token_mixers), ("channel_mixer", sec.channel_mixers)):
        field_name = "token_mixers" if role == "token_mixer" else "channel_mixers"
        kinds = dict(given) if given else used[role]
        for kind, knobs in kinds.items():
            where = f"search.evolution.{field_name}.{kind}"
            try:
                k = registry.get(kind)
            except KeyError:
                near = ", ".join(registry.names(role))
                raise SearchError(
                    f"{where}: no block kind {kind!r}", hint=f"{role} kinds: {near}"
                ) from None
            if k.role != role:
                raise SearchError(
                    f"{where}: {kind!r} is a {k.role}, not a {role}",
                    hint=f"list it under {'token_mixers' if k.role == 'token_mixer' else 'channel_mixers'}",
                )
            for knob, values in knobs.items():
                if knob in ("kind", "role", "name", "inputs", "merge"):
                    raise SearchError(
                        f"{where}.{knob}: not a knob (evolution sets the graph's structure)",
                        hint="remove it",
                    )
                if knob in _COMMON:
                    continue
                if knob not in k.params.model_fields:
                    raise SearchError(
                        f"{where}.{knob}: {kind} has no parameter {knob!r}",
                        hint=f"its parameters: {', '.join(k.params.model_fields)}",
                    )
                for v in _as_list(values):
                    try:
                        k.params.model_validate({knob: v})
                    except Exception as exc:  # noqa: BLE001 - pydantic's message, shortened
                        msg = str(exc).splitlines()
                        raise SearchError(
                            f"{where}.{knob}: {v!r} is refused: "
                            f"{msg[-1].strip() if msg else type(exc).__name__}"
                        ) from None
        out[role] = {kind: dict(knobs) for kind, knobs in kinds.items()}
    from archir.registry import ALLOWED_BITS

    bad = [b for b in sec.bits or [] if float(b) not in ALLOWED_BITS]
    if bad:
        raise SearchError(
            f"search.evolution.bits: {bad[0]} is not a weight bit width",
            hint="one of " + ", ".join(str(b) for b in ALLOWED_BITS),
        )
    depth0 = len(g.layers)
    depth = tuple(sec.depth) if sec.depth else (max(1, depth0 - 1), depth0 + 2)
    dm = sec.d_model or [g.d_model]
    pop = sec.population or population or DEFAULT_POPULATION
    return Space(
        token_mixers=out["token_mixer"],
        channel_mixers=out["channel_mixer"],
        depth=(int(depth[0]), int(depth[1])),
        d_model=[int(d) for d in dm],
        bits=list(sec.bits or []),
        rates=sec.rates(),
        crossover=sec.crossover,
        mutations=sec.mutations,
        population=int(pop),
        inherit=sec.inherit,
        max_proposals=sec.max_proposals,
    )


# -- operators ---------------------------------------------------------------------------------
class NotApplicable(Exception):
    """The operator has nothing to change in this genome (another one is drawn)."""


def _heads_ok(block: dict[str, Any], d_model: int) -> bool:
    h = block.get("n_heads")
    return not isinstance(h, int) or d_model % h == 0


def _draw_block(
    space: Space, role: str, kind: str, d_model: int, rng: random.Random
) -> dict[str, Any]:
    out: dict[str, Any] = {"kind": kind}
    for knob, values in space.kinds(role)[kind].items():
        opts = _as_list(values)
        if knob == "n_heads":
            opts = [v for v in opts if isinstance(v, int) and d_model % v == 0] or opts
        out[knob] = rng.choice(opts)
    return out


def _units(g: Genome) -> list[list[int]]:
    """Layer indices grouped into mutation units: a shared run is one unit."""
    units: list[list[int]] = []
    for i, lay in enumerate(g.layers):
        if lay.run is not None and units and g.layers[units[-1][0]].run == lay.run:
            units[-1].append(i)
        else:
            units.append([i])
    return units


def _set_block(g: Genome, unit: list[int], bi: int, block: dict[str, Any], fresh: bool) -> None:
    for li in unit:
        g.layers[li].blocks[bi] = copy.deepcopy(block)
        if fresh:
            g.layers[li].origins[bi] = None


def _swap(role: str) -> Callable[[Genome, Space, random.Random], str]:
    def op(g: Genome, space: Space, rng: random.Random) -> str:
        allowed = space.kinds(role)
        sites = [
            (u, bi)
            for u in _units(g)
            for bi, b in enumerate(g.layers[u[0]].blocks)
            if _role(b) == role and any(k != b.get("kind") for k in allowed)
        ]
        if not sites:
            raise NotApplicable
        unit, bi = rng.choice(sites)
        old = g.layers[unit[0]].blocks[bi]
        kind = rng.choice([k for k in allowed if k != old.get("kind")])
        new = _draw_block(space, role, kind, g.d_model, rng)
        for k in _COMMON:
            if k in old:
                new[k] = copy.deepcopy(old[k])
        _set_block(g, unit, bi, new, fresh=True)
        knobs = ", ".join(f"{k}={v}" for k, v in new.items() if k not in (*_COMMON, "kind"))
        return f"swap {role.replace('_', ' ')} at layer {unit[0]}: {old.get('kind')} -> {kind}" + (
            f" ({knobs})" if knobs else ""
        )

    return op


def _fresh_layer(g: Genome, like: Layer, space: Space, rng: random.Random) -> Layer:
    blocks: list[dict[str, Any]] = []
    for b in like.blocks:
        role = _role(b)
        if role in ("token_mixer", "channel_mixer") and space.kinds(role):
            nb = _draw_block(space, role, rng.choice(list(space.kinds(role))), g.d_model, rng)
            for k in ("norm", "bits", "residual", "residual_scale"):
                if k in b:
                    nb[k] = b[k]
            blocks.append(nb)
        else:
            blocks.append({k: v for k, v in b.items() if k not in ("name", "inputs", "merge")})
    return Layer(blocks, [None] * len(blocks), like.residual, None)


def _strip_names(lay: Layer) -> Layer:
    out = copy.deepcopy(lay)
    for b in out.blocks:
        for k in ("name", "inputs", "merge"):
            b.pop(k, None)
    out.run = None
    return out


def _insert(g: Genome, space: Space, rng: random.Random) -> str:
    if len(g.layers) >= space.depth[1]:
        raise NotApplicable
    p = rng.randrange(len(g.layers) + 1)
    nb = g.layers[min(p, len(g.layers) - 1)] if p == len(g.layers) else g.layers[p]
    if p > 0 and rng.random() < 0.5:
        nb = g.layers[p - 1]
    src = next(i for i, x in enumerate(g.layers) if x is nb)
    if rng.random() < 0.5:
        lay = _strip_names(nb)
        what = f"insert layer at {p} (copy of layer {src})"
    else:
        lay = _fresh_layer(g, nb, space, rng)
        kinds = "/".join(str(b["kind"]) for b in lay.blocks)
        what = f"insert layer at {p} (new: {kinds})"
    # a copy placed inside a shared run joins it, anywhere else it has weights of its own
    if 0 < p < len(g.layers) and g.layers[p - 1].run is not None:
        if g.layers[p - 1].run == g.layers[p].run and _same(g.layers[p - 1], lay):
            lay.run = g.layers[p].run
            lay.origins = list(g.layers[p].origins)
    g.layers.insert(p, lay)
    # a block after it that read the old previous output by name now reads the new layer's
    # (otherwise the inserted layer would feed nothing)
    if 0 < p < len(g.layers) - 1:
        prev = g.layers[p - 1].blocks[-1].get("name")
        for b in g.layers[p + 1].blocks:
            ins = b.get("inputs")
            if prev is not None and isinstance(ins, list) and prev in ins:
                last = lay.blocks[-1]
                if "name" not in last:
                    last["name"] = _fresh_name(g, "l")
                b["inputs"] = [last["name"] if x == prev else x for x in ins]
    return what


def _names_in(lay: Layer) -> set[str]:
    return {str(b["name"]) for b in lay.blocks if "name" in b}


def _drop_refs(g: Genome, gone: set[str]) -> None:
    for lay in g.layers:
        for b in lay.blocks:
            ins = b.get("inputs")
            if isinstance(ins, list) and any(x in gone for x in ins):
                keep = [x for x in ins if x not in gone]
                if len(keep) >= 2:
                    b["inputs"] = keep
                else:  # one input left: the default input (the previous output) again
                    b.pop("inputs", None)
                    b.pop("merge", None)


def _drop(g: Genome, space: Space, rng: random.Random) -> str:
    if len(g.layers) <= max(1, space.depth[0]):
        raise NotApplicable
    p = rng.randrange(len(g.layers))
    lay = g.layers.pop(p)
    _drop_refs(g, _names_in(lay))
    kinds = "/".join(str(b["kind"]) for b in lay.blocks)
    return f"drop layer {p} ({kinds})"


def _repair_heads(g: Genome, space: Space) -> list[str]:
    fixed: list[str] = []
    d = g.d_model
    for li, lay in enumerate(g.layers):
        for b in lay.blocks:
            if _heads_ok(b, d):
                continue
            listed = space.kinds(_role(b)).get(str(b["kind"]), {}).get("n_heads")
            opts = (
                [v for v in _as_list(listed) if isinstance(v, int) and d % v == 0] if listed else []
            )
            opts = opts or [h for h in range(int(b["n_heads"]), 0, -1) if d % h == 0]
            old = b["n_heads"]
            b["n_heads"] = min(opts, key=lambda h: abs(h - old))
            fixed.append(f"layer {li} n_heads {old} -> {b['n_heads']}")
    return fixed


def _d_model(g: Genome, space: Space, rng: random.Random) -> str:
    opts = [d for d in space.d_model if d != g.d_model]
    if not opts:
        raise NotApplicable
    old = g.d_model
    g.data["model"]["d_model"] = rng.choice(opts)
    fixed = _repair_heads(g, space)
    return f"d_model {old} -> {g.d_model}" + (
        f" (heads kept dividing it: {'; '.join(fixed)})" if fixed else ""
    )


def _knob(knob: str) -> Callable[[Genome, Space, random.Random], str]:
    def op(g: Genome, space: Space, rng: random.Random) -> str:
        sites = []
        for u in _units(g):
            for bi, b in enumerate(g.layers[u[0]].blocks):
                role = _role(b)
                listed = (
                    space.kinds(role).get(str(b.get("kind")), {}).get(knob)
                    if role
                    in (
                        "token_mixer",
                        "channel_mixer",
                    )
                    else None
                )
                if listed is None:
                    continue
                opts = [v for v in _as_list(listed) if v != b.get(knob)]
                if knob == "n_heads":
                    opts = [v for v in opts if isinstance(v, int) and g.d_model % v == 0]
                if opts:
                    sites.append((u, bi, opts))
        if not sites:
            raise NotApplicable
        unit, bi, opts = rng.choice(sites)
        b = dict(g.layers[unit[0]].blocks[bi])
        old = b.get(knob, "default")
        b[knob] = rng.choice(opts)
        _set_block(g, unit, bi, b, fresh=False)  # resized weights: sliced or padded
        return f"{knob} of {b['kind']} at layer {unit[0]}: {old} -> {b[knob]}"

    return op


def _bits(g: Genome, space: Space, rng: random.Random) -> str:
    sites = [
        (u, bi)
        for u in _units(g)
        for bi, b in enumerate(g.layers[u[0]].blocks)
        if _role(b) in ("token_mixer", "channel_mixer")
        and any(x != b.get("bits") for x in space.bits)
    ]
    if not sites:
        raise NotApplicable
    unit, bi = rng.choice(sites)
    b = dict(g.layers[unit[0]].blocks[bi])
    old = b.get("bits", "model default")
    new = rng.choice([x for x in space.bits if x != b.get("bits")])
    b["bits"] = int(new) if float(new).is_integer() else new
    _set_block(g, unit, bi, b, fresh=False)
    return f"bits of {b['kind']} at layer {unit[0]}: {old} -> {b['bits']}"


def _share(g: Genome, space: Space, rng: random.Random) -> str:
    shared = [u for u in _units(g) if len(u) > 1]
    tie = [
        i
        for i in range(len(g.layers) - 1)
        if g.layers[i].run is None
        and g.layers[i + 1].run is None
        and _same(g.layers[i], g.layers[i + 1])
        and not _names_in(g.layers[i])
    ]
    if not shared and not tie:
        raise NotApplicable
    if tie and (not shared or rng.random() < 0.5):
        i = rng.choice(tie)
        run = max((lay.run or 0) for lay in g.layers) + 1
        for k in (i, i + 1):
            g.layers[k].run = run
        g.layers[i + 1].origins = list(g.layers[i].origins)  # one set of weights: the first's
        return f"share weights of layers {i}-{i + 1}"
    u = rng.choice(shared)
    for k in u:
        g.layers[k].run = None
    return f"untie the shared layers {u[0]}-{u[-1]}"


def _fresh_name(g: Genome, base: str) -> str:
    names = {n for lay in g.layers for n in _names_in(lay)}
    i = 0
    while f"{base}{i}" in names:
        i += 1
    return f"{base}{i}"


def _skip(g: Genome, space: Space, rng: random.Random) -> str:
    # remove: a block reading a merge of inputs loses one of them
    def plain(li: int) -> bool:  # weights of its own, the default residual structure
        return g.layers[li].run is None and g.layers[li].residual == "pre_norm"

    has = [
        (li, bi)
        for li, lay in enumerate(g.layers)
        for bi, b in enumerate(lay.blocks)
        if isinstance(b.get("inputs"), list) and plain(li)
    ]
    add = [
        li
        for li in range(1, len(g.layers))
        if plain(li)
        and plain(li - 1)
        and _role(g.layers[li].blocks[0]) == "token_mixer"
        and "inputs" not in g.layers[li].blocks[0]
    ]
    if not has and not add:
        raise NotApplicable
    if has and (not add or rng.random() < 0.5):
        li, bi = rng.choice(has)
        b = g.layers[li].blocks[bi]
        ins = list(b["inputs"])
        gone = ins.pop(rng.randrange(len(ins) - 1)) if len(ins) > 1 else ins.pop()
        if len(ins) >= 2:
            b["inputs"] = ins
        else:
            b.pop("inputs", None)
            b.pop("merge", None)
        return f"skip removed: layer {li} no longer reads {gone}"
    li = rng.choice(add)
    # an earlier layer with weights of its own (-1: the embedding)
    src = rng.choice([-1] + [j for j in range(li - 1) if plain(j)])
    prev = g.layers[li - 1].blocks[-1]
    if "name" not in prev:
        prev["name"] = _fresh_name(g, "l")
    if src < 0:
        early = "embed"
    else:
        last = g.layers[src].blocks[-1]
        if "name" not in last:
            last["name"] = _fresh_name(g, "l")
        early = str(last["name"])
    b = g.layers[li].blocks[0]
    b["inputs"] = [early, str(prev["name"])]
    b["merge"] = "weighted"
    return f"skip added: layer {li} reads a weighted average of {early} and {prev['name']}"


OPERATORS: dict[str, Callable[[Genome, Space, random.Random], str]] = {
    "swap_token_mixer": _swap("token_mixer"),
    "swap_channel_mixer": _swap("channel_mixer"),
    "insert_layer": _insert,
    "drop_layer": _drop,
    "d_model": _d_model,
    "expansion": _knob("expansion"),
    "d_state": _knob("d_state"),
    "n_heads": _knob("n_heads"),
    "bits": _bits,
    "share_weights": _share,
    "skip": _skip,
}


def mutate(g: Genome, space: Space, rng: random.Random, n: int = 1) -> Genome:
    """``g`` changed by ``n`` operators drawn at their rates (one that has nothing to change
    is replaced by another draw); each applied operator is appended to ``mutations``.

    Raises:
        NotApplicable: no allowed operator can change ``g``.
    """
    child = g.copy()
    names = [k for k, r in space.rates.items() if r > 0]
    for _ in range(n):
        left = list(names)
        while left:
            name = rng.choices(left, weights=[space.rates[k] for k in left])[0]
            try:
                child.mutations.append(OPERATORS[name](child, space, rng))
                break
            except NotApplicable:
                left.remove(name)
        else:
            raise NotApplicable
    return child


def crossover(a: Genome, b: Genome, space: Space, rng: random.Random) -> Genome:
    """The first layers of ``a`` and the last of ``b`` (origins keep their parent slots: ``a``
    is slot 0, ``b`` slot 1), cut at layer boundaries outside shared runs, depth within
    bounds; model-wide settings from ``a``, heads repaired for ``a``'s ``d_model``; names
    made unique and inputs naming a block the child lacks dropped.

    Raises:
        NotApplicable: no cut gives a depth within bounds.
    """
    cuts_a = [
        i
        for i in range(1, len(a.layers))
        if a.layers[i].run is None or a.layers[i].run != a.layers[i - 1].run
    ]
    cuts_b = [
        j
        for j in range(1, len(b.layers))
        if b.layers[j].run is None or b.layers[j].run != b.layers[j - 1].run
    ]
    pairs = [
        (i, j)
        for i in cuts_a
        for j in cuts_b
        if space.depth[0] <= i + len(b.layers) - j <= space.depth[1]
    ]
    if not pairs:
        raise NotApplicable
    i, j = rng.choice(pairs)
    child = a.copy()
    child.mutations = []
    head = child.layers[:i]
    tail = copy.deepcopy(b.layers[j:])
    offset = max([lay.run or 0 for lay in head] + [0])
    for lay in tail:
        lay.origins = [(1, o[1]) if o is not None else None for o in lay.origins]
        if lay.run is not None:
            lay.run += offset
    # a tail block reading a name of b's head has nothing to read in the child
    own = {"embed"} | {n for lay in tail for n in _names_in(lay)}
    tmp = Genome(child.data, tail)
    _drop_refs(
        tmp, {x for lay in tail for blk in lay.blocks for x in blk.get("inputs") or []} - own
    )
    names = {n for lay in head for n in _names_in(lay)}
    renamed: dict[str, str] = {}
    for lay in tail:
        for blk in lay.blocks:
            if "name" in blk and blk["name"] in names:
                new = _fresh_name(Genome(child.data, head + tail), str(blk["name"]) + "_")
                renamed[str(blk["name"])] = new
                blk["name"] = new
    for lay in tail:
        for blk in lay.blocks:
            if isinstance(blk.get("inputs"), list):
                blk["inputs"] = [renamed.get(x, x) for x in blk["inputs"]]
    child.layers = head + tail
    present = {"embed"} | {n for lay in child.layers for n in _names_in(lay)}
    referenced = {x for lay in child.layers for blk in lay.blocks for x in blk.get("inputs") or []}
    _drop_refs(child, referenced - present)
    fixed = _repair_heads(child, space)
    child.mutations.append(
        f"crossover: layers 0-{i - 1} of parent 1 + layers {j}-{len(b.layers) - 1} of parent 2"
        + (f" ({'; '.join(fixed)})" if fixed else "")
    )
    return child


# -- selection ------------------------------------------------------------------------------
@dataclass
class Member:
    """A model of the study: its first trial (``root``), its most-trained finished trial
    (``trial``), the ladder rung that trial reached, its objective values (oriented so that
    smaller is better) and its total constraint violation."""

    root: int
    trial: FrozenTrial
    rung: int
    vector: list[float]
    violation: float
    spec_yaml: str


def _root(n: int, by_number: dict[int, FrozenTrial]) -> int:
    seen = set()
    while n in by_number and n not in seen:
        seen.add(n)
        src = continues(by_number[n])
        if src is None:
            return n
        n = src
    return n


def members(trials: Sequence[FrozenTrial], objectives: Sequence[Objective]) -> list[Member]:
    """Every finished model of the study (duplicates left out), at its most-trained trial."""
    by_number = {t.number: t for t in trials}
    best: dict[int, Member] = {}
    for t in trials:
        if t.state != TrialState.COMPLETE:
            continue
        a = trial_attrs(t)
        if a.get("duplicate_of") is not None or not a.get("spec_yaml"):
            continue
        vals = a.get("values") or {}
        if any(vals.get(o.metric) is None for o in objectives):
            continue
        vec = [float(vals[o.metric]) * (1 if o.direction == "minimize" else -1) for o in objectives]
        viol = sum(max(0.0, float(v)) for v in a.get("violations") or [0.0])
        m = Member(
            _root(t.number, by_number), t, int(a.get("rung") or 0), vec, viol, a["spec_yaml"]
        )
        old = best.get(m.root)
        if old is None or m.rung > old.rung:
            best[m.root] = m
    return list(best.values())


def elite(ms: list[Member], k: int) -> list[Member]:
    """The best ``k`` members: higher rung first, then feasible before infeasible (smaller
    violation first), then Pareto rank and crowding distance among the feasible of a rung."""
    key: dict[int, tuple[float, ...]] = {}
    for rung in {m.rung for m in ms}:
        group = [m for m in ms if m.rung == rung and m.violation <= 0]
        if group:
            vecs = [m.vector for m in group]
            ranks = pareto_ranks(vecs)
            crowd = crowding(vecs)
            for m, r, c in zip(group, ranks, crowd):
                key[m.root] = (-rung, 0.0, float(r), -c)
        for m in ms:
            if m.rung == rung and m.violation > 0:
                key[m.root] = (-rung, 1.0, m.violation, 0.0)
    return sorted(ms, key=lambda m: (key[m.root], m.root))[:k]


def tournament(pool: list[Member], rng: random.Random) -> Member:
    """The better (earlier in ``pool``'s elite order) of two members drawn at random."""
    i, j = rng.randrange(len(pool)), rng.randrange(len(pool))
    return pool[min(i, j)]


# -- proposals -------------------------------------------------------------------------------
@dataclass
class Proposal:
    """A child ready to be queued: its spec data, its spec hash, lineage and block origins
    (``origins[i]``: ``[parent trial, parent weight-block index]`` or None)."""

    data: dict[str, Any]
    spec_hash: str
    lineage: dict[str, Any]
    origins: list[list[int] | None]


def genome_data(text: str) -> dict[str, Any]:
    """The spec data of a recorded genome, read by the spec loader's own parser
    (:func:`archir.spec.source.parse_source`: YAML 1.2 scalars, safe, bounded).

    Raises:
        SearchError: the text is not a spec mapping.
    """
    from archir.spec.source import parse_source

    try:
        data, _ = parse_source(text, "<recorded genome>")
    except ArchirError as exc:
        raise SearchError(f"a trial's recorded spec cannot be read: {exc.message}") from None
    if not isinstance(data, dict):
        raise SearchError("a trial's recorded spec is not a mapping")
    return data


def check_child(
    data: dict[str, Any],
    constraints: Sequence[Constraint],
    latency_of: Callable[[Spec], float] | None = None,
) -> tuple[Spec | None, str]:
    """Whether ``data`` is a model that may be trained: it validates (schema, graph, shapes),
    every block's output is used, its cost analysis runs and it meets the constraints known
    before training — ``latency_ms`` too when ``latency_of`` (the calibrated predictor, ms)
    is given. Returns the concrete spec, or None and the reason."""
    from archir.cost import analyze
    from searchers.objectives import COST_METRICS

    try:
        spec = Spec(data)
        cost = analyze(spec)
        dead = unused_blocks(spec)
    except ArchirError as exc:
        return None, f"invalid: {exc.message}"
    if dead:
        return None, f"invalid: {dead[0]}'s output reaches nothing"
    values = {k: float(getattr(cost, k)) for k in COST_METRICS}
    if latency_of is not None and any(c.metric == "latency_ms" for c in constraints):
        try:
            values["latency_ms"] = float(latency_of(spec))
        except ArchirError as exc:
            return None, f"invalid: latency not predictable: {exc.message}"
    reasons = check_constraints(list(constraints), values, pre_training=True)
    if reasons:
        return None, "infeasible: " + "; ".join(reasons)
    return spec, ""


def unused_blocks(spec: Spec) -> list[str]:
    """The blocks whose output never reaches the head (a layer a skip bypasses entirely)."""
    import networkx as nx

    from archir.ir import build_graph

    graph = build_graph(spec)
    order = [n.name for n in graph]
    feeding = nx.ancestors(graph.g, order[-1])
    return [n for n in order[:-1] if n not in feeding]


class Evolution:
    """Proposes children for a study (one instance per worker; everything it reads comes
    from the study's trials, so several workers and a resumed search share one population).

    Args:
        sec: the spec's ``search.evolution`` section.
        spec: the spec the search started from (its data seeds the space's defaults).
        objectives, constraints: the search's.
        population: ``search.population`` (used when the section sets none).
        seed: random seed of this worker's proposals.
    """

    def __init__(
        self,
        sec: EvolutionSection,
        spec: Spec,
        objectives: Sequence[Objective],
        constraints: Sequence[Constraint],
        population: int | None,
        seed: int,
    ) -> None:
        self.open = not spec.is_concrete
        self.space = make_space(sec, seed_data(spec), population)
        self.objectives = list(objectives)
        self.constraints = [c for c in constraints if c.pre_training and c.metric in PRE_TRAINING]
        self.rng = random.Random(seed)
        #: the calibrated latency predictor (spec -> ms), when a constraint needs it
        self.latency_of: Callable[[Spec], float] | None = None

    def seed_lineage(self) -> dict[str, Any]:
        """The lineage of a model the evolution did not make (the seed spec, or a sample of
        the spec's own choices while the first population is drawn)."""
        return {
            "origin": "sampled" if self.open else "seed",
            "parents": [],
            "mutations": [],
            "inherited_from": None,
            "rejected": 0,
        }

    def system_attrs(self, p: Proposal) -> dict[str, Any]:
        """What a trial evaluating proposal ``p`` records before it trains (its genome, the
        genome's hash, lineage and, with ``inherit``, its blocks' origins): a retry of the
        trial and a promotion of its model read them back."""
        out: dict[str, Any] = {
            ATTR_GENOME: Spec(p.data).to_yaml(),
            ATTR_GENOME_HASH: p.spec_hash,
            ATTR_LINEAGE: p.lineage,
        }
        if self.space.inherit:
            out[ATTR_ORIGINS] = p.origins
        return out

    def propose(
        self,
        trials: Sequence[FrozenTrial],
        hash_of: Callable[[Spec], str],
        name_of: Callable[[int], str],
    ) -> Proposal | None:
        """The next child, or None while the first population is still drawn from the spec
        itself (the seed spec once, or samples of its choices).

        Raises:
            SearchError: ``max_proposals`` children in a row were invalid, infeasible or
                already seen.
        """
        ms = members(trials, self.objectives)
        known = {trial_attrs(t).get("spec_hash") for t in trials}
        known |= {t.system_attrs.get(ATTR_GENOME_HASH) for t in trials}
        started = [
            t for t in trials if t.state != TrialState.WAITING or ATTR_GENOME in t.system_attrs
        ]
        if self.open and len(ms) < self.space.population:
            return None
        if not self.open and not started:
            return None  # the seed spec itself comes first
        if ms and (len(ms) >= self.space.population or self.open):
            pool = elite(ms, self.space.population)
            parents_of: Callable[[], list[tuple[int, str]]] = lambda: [  # noqa: E731
                (m.trial.number, m.spec_yaml)
                for m in (tournament(pool, self.rng), tournament(pool, self.rng))
            ]
        else:  # a concrete seed: the first population is mutants of the models known so far
            seen = [
                (t.number, str(y))
                for t in trials
                if t.state in (TrialState.COMPLETE, TrialState.RUNNING)
                and trial_attrs(t).get("duplicate_of") is None
                and continues(t) is None
                and (y := trial_attrs(t).get("spec_yaml") or t.system_attrs.get(ATTR_GENOME))
            ]
            if not seen:
                if not any(t.state in (TrialState.RUNNING, TrialState.WAITING) for t in trials):
                    why = next((trial_attrs(t).get("reason") for t in trials), None)
                    raise SearchError(
                        "the seed spec could not be evaluated, so there is nothing to mutate"
                        + (f": {why}" if why else ""),
                        hint="fix the spec (archir train SPEC shows the problem) and run again",
                    )
                return None
            parents_of = lambda: [self.rng.choice(seen), self.rng.choice(seen)]  # noqa: E731
        reasons: dict[str, int] = {}
        for _ in range(self.space.max_proposals):
            (na, ya), (nb, yb) = parents_of()
            try:
                ga = genome_of(genome_data(ya), 0)
                child = None
                if nb != na and self.rng.random() < self.space.crossover:
                    try:
                        child = crossover(ga, genome_of(genome_data(yb), 1), self.space, self.rng)
                    except NotApplicable:  # no cut fits the depth bounds: a mutation instead
                        child = None
                if child is not None:
                    parents = [na, nb]
                    child.mutations[0] = (
                        child.mutations[0]
                        .replace("of parent 1", f"of #{na}")
                        .replace("of parent 2", f"of #{nb}")
                    )
                    if self.rng.random() < 0.5:
                        child = mutate(child, self.space, self.rng, 1)
                else:
                    child = mutate(
                        ga, self.space, self.rng, self.rng.randint(1, self.space.mutations)
                    )
                    parents = [na]
            except NotApplicable:
                reasons["no operator applies"] = reasons.get("no operator applies", 0) + 1
                continue
            except SearchError:  # a parent evolution cannot unroll
                reasons["parent not evolvable"] = reasons.get("parent not evolvable", 0) + 1
                continue
            data, origins = to_data(child)
            data["name"] = name_of(len(trials))
            spec, why = check_child(data, self.constraints, self.latency_of)
            if spec is None:
                key = why.split(":")[0]
                reasons[key] = reasons.get(key, 0) + 1
                continue
            h = hash_of(spec)
            if h in known:
                reasons["already seen"] = reasons.get("already seen", 0) + 1
                continue
            lineage = {
                "origin": "crossover" if len(parents) == 2 else "mutation",
                "parents": parents,
                "mutations": child.mutations,
                "inherited_from": None,
                "rejected": sum(reasons.values()),
                "rejected_why": reasons,
            }
            return Proposal(
                data=data,
                spec_hash=h,
                lineage=lineage,
                origins=[[parents[o[0]], o[1]] if o is not None else None for o in origins],
            )
        raise SearchError(
            f"evolution drew {self.space.max_proposals} children in a row that could not be "
            f"trained ({', '.join(f'{k}: {v}' for k, v in reasons.items())})",
            hint="widen search.evolution (kinds, depth, d_model) or loosen the cost constraints",
        )


def _first_options(node: Any) -> Any:
    """A decision for every open node: its first option, or its low end."""
    if node.type == "choice":
        return 0 if isinstance(node.options[0], dict | list) else node.options[0]
    return node.low


def seed_data(spec: Spec) -> dict[str, Any]:
    """The model evolution completes its space from (:func:`make_space`): the spec itself,
    or for an open spec the model of every node's first option."""
    return copy.deepcopy(spec.data if spec.is_concrete else spec.fix(_first_options).data)


# -- weight inheritance -------------------------------------------------------------------------
def inherited_source(
    run_dir: Path,
    origins: Sequence[Sequence[int] | None],
    weights_of: Callable[[int], Path | None],
    parents: Sequence[int] = (),
) -> tuple[dict[str, Any], list[int]]:
    """The parents' trained tensors renamed onto the child's weight blocks: for child block
    ``i`` with origin ``[trial, j]``, ``blocks.{j}.*`` of that trial's weights becomes
    ``blocks.{i}.*``; tensors outside the blocks (embedding, final norm, head) come from the
    first of ``parents`` whose weights are here (the lineage's order; default: the order of
    first appearance in ``origins``). DenseFormer merge weights (``merges.*``) are not
    inherited: a child's merges need not be its parent's. Returns the renamed tensors and
    the parent trials read (a parent whose weights are not on this machine is skipped: its
    blocks stay fresh).

    Raises:
        TrainingError: a weights file that is not a readable safetensors file.
    """
    from archir.inherit import read_init

    order: list[int] = [int(p) for p in parents]
    for o in origins:
        if o is not None and int(o[0]) not in order:
            order.append(int(o[0]))
    loaded: dict[int, dict[str, Any]] = {}
    for p in order:
        path = weights_of(p)
        if path is not None and path.is_file():
            loaded[p] = read_init(path)
    out: dict[str, Any] = {}
    first = next((p for p in order if p in loaded), None)
    if first is not None:
        out.update(
            {
                k: v
                for k, v in loaded[first].items()
                if not k.startswith("blocks.") and not k.startswith("merges.")
            }
        )
    for i, o in enumerate(origins):
        if o is None or int(o[0]) not in loaded:
            continue
        pre = f"blocks.{int(o[1])}."
        for k, v in loaded[int(o[0])].items():
            if k.startswith(pre):
                out[f"blocks.{i}." + k[len(pre) :]] = v
    return out, [p for p in order if p in loaded]


def lineage_text(lineage: dict[str, Any]) -> str:
    """One line: ``mutation of #3: swap ...; bits ...`` (for trial logs)."""
    parents = " + ".join(f"#{p}" for p in lineage.get("parents", []))
    what = lineage.get("origin", "?")
    muts = "; ".join(lineage.get("mutations", []))
    return f"{what}" + (f" of {parents}" if parents else "") + (f": {muts}" if muts else "")


__all__ = [
    "ATTR_GENOME",
    "ATTR_LINEAGE",
    "ATTR_ORIGINS",
    "Evolution",
    "Genome",
    "Layer",
    "Member",
    "NotApplicable",
    "OPERATORS",
    "Proposal",
    "Space",
    "check_child",
    "crossover",
    "elite",
    "genome_data",
    "genome_of",
    "seed_data",
    "inherited_source",
    "lineage_text",
    "make_space",
    "members",
    "mutate",
    "to_data",
    "tournament",
]
