"""Graph-mutation evolution (searchers.evolution): the genome round trip, every operator,
crossover, validity of proposals, selection and weight inheritance onto a child's blocks."""

from __future__ import annotations

import random
from collections import Counter
from pathlib import Path

import pytest
import torch
import yaml
from optuna.trial import TrialState, create_trial

from archir.compiler import compile as compile_spec
from archir.errors import SearchError
from archir.hashing import canonical_hash
from archir.inherit import inherit
from archir.spec import Spec, load_spec
from archir.spec.sections import EvolutionSection
from searchers.evolution import (
    OPERATORS,
    Evolution,
    NotApplicable,
    check_child,
    crossover,
    elite,
    genome_of,
    inherited_source,
    make_space,
    members,
    mutate,
    to_data,
)
from searchers.objectives import TRIAL_ATTR, Objective, parse_constraint
from searchers.space import spec_hash

ROOT = Path(__file__).resolve().parents[1]
ZOO = sorted((ROOT / "specs" / "zoo").glob("*.yaml"))

WIDE = {
    "token_mixers": {
        "attention": {"n_heads": [2, 4], "pos": "rope"},
        "mamba": {"d_state": [8, 16], "expansion": 2},
        "gla": {"n_heads": [2, 4]},
    },
    "channel_mixers": {"swiglu": {"expansion": [2, 2.667]}, "mlp": {"expansion": [2, 4]}},
    "depth": [1, 6],
    "d_model": [32, 48, 64],
    "bits": [4, 8, 16],
}


def small(layers: int = 3, d_model: int = 32) -> dict:
    return {
        "archir": 1,
        "name": "seed",
        "model": {
            "task": "causal_lm",
            "vocab_size": 256,
            "d_model": d_model,
            "max_seq_len": 32,
            "embed": {"kind": "token_embedding"},
            "layers": [
                {
                    "repeat": layers,
                    "blocks": [
                        {"kind": "attention", "n_heads": 2, "pos": "rope"},
                        {"kind": "swiglu", "expansion": 2},
                    ],
                }
            ],
            "head": {"kind": "lm_head", "tie_embeddings": True},
        },
    }


def mixed() -> dict:
    """Three layers with three token mixers (every knob operator has something to change)."""
    data = small(layers=1)
    grp = data["model"]["layers"][0]
    data["model"]["layers"] = [
        grp,
        {"blocks": [{"kind": "mamba", "d_state": 8, "expansion": 2}, {"kind": "mlp"}]},
        {"blocks": [{"kind": "gla", "n_heads": 2}, {"kind": "swiglu", "expansion": 2}]},
    ]
    return data


def space(**over):
    return make_space(EvolutionSection.model_validate({**WIDE, **over}), small(), None)


@pytest.mark.parametrize("path", ZOO, ids=[p.stem for p in ZOO])
def test_genome_round_trip_builds_the_same_graph(path):
    spec = load_spec(path)
    stages = [
        gi
        for gi, g in enumerate(spec.data["model"]["layers"])
        if "downsample" in g or "d_model" in g
    ]
    if stages:  # a vision hierarchy: refused by name, not mutated into a wrong model
        with pytest.raises(SearchError, match=f"model.layers.{stages[0]}: .*vision hierarchy"):
            genome_of(spec.data)
        return
    data, origins = to_data(genome_of(spec.data))
    again = Spec(data)
    assert canonical_hash(again) == canonical_hash(spec)
    # one origin per weight block, each its own index: the state_dict keeps its names
    model = compile_spec(spec, seed=0)
    n_blocks = len({k.split(".")[1] for k in model.state_dict() if k.startswith("blocks.")})
    assert origins == [(0, i) for i in range(n_blocks)]


def test_shared_run_is_one_set_of_weights():
    data = small()
    data["model"]["layers"][0]["share_weights"] = True
    g = genome_of(data)
    assert [lay.run for lay in g.layers] == [1, 1, 1]
    assert g.layers[0].origins == g.layers[2].origins == [(0, 0), (0, 1)]
    out, origins = to_data(g)
    assert out["model"]["layers"][0]["share_weights"] is True
    assert origins == [(0, 0), (0, 1)]


@pytest.mark.parametrize("name", sorted(OPERATORS))
def test_every_operator_gives_valid_children(name):
    sp = space(operators={k: (1.0 if k == name else 0.0) for k in OPERATORS})
    rng = random.Random(1)
    base = genome_of(small() if name == "share_weights" else mixed())
    seen_change = 0
    invalid = Counter()
    g = base
    for _ in range(40):
        try:
            child = mutate(g, sp, rng, 1)
        except NotApplicable:
            g = base
            continue
        data, _ = to_data(child)
        assert len(child.mutations) == len(g.mutations) + 1
        try:
            spec = Spec(data)
        except Exception as exc:  # noqa: BLE001 - counted, asserted rare below
            invalid[str(exc)[:60]] += 1
            continue
        if canonical_hash(spec) != canonical_hash(Spec(to_data(g)[0])):
            seen_change += 1
        g = child
    assert seen_change >= 10, name
    assert sum(invalid.values()) <= 2, invalid


def test_operators_do_what_they_say():
    sp = space()
    rng = random.Random(0)
    g = genome_of(small())
    ins = OPERATORS["insert_layer"](g.copy(), sp, rng)
    assert "insert layer" in ins
    c = g.copy()
    OPERATORS["insert_layer"](c, sp, rng)
    assert len(c.layers) == 4
    c = g.copy()
    OPERATORS["drop_layer"](c, sp, rng)
    assert len(c.layers) == 2
    c = g.copy()
    msg = OPERATORS["d_model"](c, sp, rng)
    assert c.d_model in (48, 64) and "d_model 32 ->" in msg
    if c.d_model == 48:  # heads kept dividing the width
        assert all(48 % b["n_heads"] == 0 for lay in c.layers for b in lay.blocks if "n_heads" in b)
    c = g.copy()
    msg = OPERATORS["swap_token_mixer"](c, sp, rng)
    kinds = [lay.blocks[0]["kind"] for lay in c.layers]
    assert sum(k != "attention" for k in kinds) == 1
    li = next(i for i, k in enumerate(kinds) if k != "attention")
    assert c.layers[li].origins[0] is None  # a new kind starts fresh
    assert c.layers[li].origins[1] == (0, 2 * li + 1)  # its channel mixer is kept
    c = g.copy()
    OPERATORS["share_weights"](c, sp, rng)
    runs = [lay.run for lay in c.layers]
    assert sum(r is not None for r in runs) == 2
    data, origins = to_data(c)
    assert any(grp.get("share_weights") for grp in data["model"]["layers"])
    assert len(origins) == 4  # two layers tied: one set of weights fewer
    c = g.copy()
    msg = OPERATORS["skip"](c, sp, rng)
    assert msg.startswith("skip added")
    reader = next(b for lay in c.layers for b in lay.blocks if "inputs" in b)
    assert reader["merge"] == "weighted" and len(reader["inputs"]) == 2
    Spec(to_data(c)[0])  # validates: the names it reads exist and come earlier
    c2 = c.copy()
    msg = OPERATORS["skip"](c2, space(operators={}), random.Random(5))
    # with a skip present the operator may also remove one
    msgs = {OPERATORS["skip"](c.copy(), sp, random.Random(s)).split(":")[0] for s in range(12)}
    assert msgs == {"skip added", "skip removed"}


def test_depth_bounds_hold():
    sp = space(depth=[3, 3])
    g = genome_of(small())
    with pytest.raises(NotApplicable):
        OPERATORS["insert_layer"](g.copy(), sp, random.Random(0))
    with pytest.raises(NotApplicable):
        OPERATORS["drop_layer"](g.copy(), sp, random.Random(0))


def test_crossover_joins_parents_at_layer_boundaries():
    sp = space()
    a = genome_of(small(layers=3), 0)
    bdata = small(layers=4)
    bdata["model"]["layers"][0]["blocks"][0] = {"kind": "mamba", "d_state": 8, "expansion": 2}
    b = genome_of(bdata, 1)
    for seed in range(10):
        child = crossover(a, b, sp, random.Random(seed))
        kinds = [lay.blocks[0]["kind"] for lay in child.layers]
        i = kinds.index("mamba")
        assert kinds[:i] == ["attention"] * i and set(kinds[i:]) == {"mamba"}
        assert 1 <= len(kinds) <= 6
        # head layers come from parent slot 0, tail layers from slot 1
        assert all(o[0] == 0 for lay in child.layers[:i] for o in lay.origins)
        assert all(o[0] == 1 for lay in child.layers[i:] for o in lay.origins)
        Spec(to_data(child)[0])
        assert child.mutations[0].startswith("crossover: layers 0-")


def test_space_errors_name_the_field():
    with pytest.raises(SearchError, match=r"token_mixers\.atention: no block kind"):
        make_space(
            EvolutionSection.model_validate({"token_mixers": {"atention": {}}}), small(), None
        )
    with pytest.raises(SearchError, match="is a channel_mixer, not a token_mixer"):
        make_space(EvolutionSection.model_validate({"token_mixers": {"swiglu": {}}}), small(), None)
    with pytest.raises(SearchError, match=r"mamba\.n_heads: mamba has no parameter"):
        make_space(
            EvolutionSection.model_validate({"token_mixers": {"mamba": {"n_heads": 2}}}),
            small(),
            None,
        )
    with pytest.raises(SearchError, match=r"attention\.n_heads: 0 is refused"):
        make_space(
            EvolutionSection.model_validate({"token_mixers": {"attention": {"n_heads": [0, 2]}}}),
            small(),
            None,
        )
    # no kinds listed: the seed's own kinds with their written knobs
    sp = make_space(EvolutionSection.model_validate({}), small(), None)
    assert sp.token_mixers == {"attention": {"n_heads": 2, "pos": "rope"}}
    assert sp.depth == (2, 5) and sp.d_model == [32]


def _done(n, data, values, rung=0, violations=(0.0,), continue_of=None):
    attrs = {
        "spec": f"trials/{n}/spec.yaml",
        "spec_hash": f"h{n}",
        "spec_yaml": yaml.safe_dump(data),
        "status": "ok",
        "values": values,
        "violations": list(violations),
        "rung": rung,
    }
    system = {}
    if continue_of is not None:
        attrs["continue_of"] = continue_of
        system["archir:continue_of"] = continue_of
    t = create_trial(
        state=TrialState.COMPLETE,
        values=list(values.values()),
        user_attrs={TRIAL_ATTR: attrs},
        system_attrs=system,
    )
    t.number = n
    return t


def test_selection_prefers_higher_rungs_then_feasible_then_front():
    objs = [Objective("val_bpb", "minimize"), Objective("params", "minimize")]
    d = small()
    trials = [
        _done(0, d, {"val_bpb": 3.0, "params": 10.0}),
        _done(1, d, {"val_bpb": 2.0, "params": 20.0}),
        _done(2, d, {"val_bpb": 1.0, "params": 5.0}, violations=(0.5,)),
        _done(3, d, {"val_bpb": 2.5, "params": 30.0}),
        _done(4, d, {"val_bpb": 2.4, "params": 20.0}, rung=1, continue_of=3),
    ]
    from searchers import ladder

    if ladder.continues(trials[4]) is None:
        pytest.skip("the ladder records continue_of elsewhere")
    ms = members(trials, objs)
    assert sorted(m.root for m in ms) == [0, 1, 2, 3]
    best = elite(ms, 4)
    assert [m.root for m in best] == [3, 0, 1, 2]  # promoted first, infeasible last
    assert best[0].trial.number == 4  # the model at its most-trained trial


def test_proposals_are_valid_new_and_feasible():
    spec = Spec(small())
    objs = [Objective("params", "minimize")]
    cons = [parse_constraint("params", "<= 60000")]
    evo = Evolution(EvolutionSection.model_validate(WIDE), spec, objs, cons, 4, seed=0)
    seen = []
    trials = [_done(0, small(), {"params": 40000.0})]
    trials[0].user_attrs[TRIAL_ATTR]["spec_hash"] = spec_hash(spec)
    for n in range(1, 25):
        p = evo.propose(trials, spec_hash, lambda k: f"seed-t{k}")
        assert p is not None
        child = Spec(p.data)  # validates on its own
        from archir.cost import analyze

        assert analyze(child).params <= 60000
        assert p.spec_hash not in seen and p.spec_hash != spec_hash(spec)
        assert p.lineage["origin"] in ("mutation", "crossover") and p.lineage["mutations"]
        seen.append(p.spec_hash)
        t = _done(n, p.data, {"params": float(analyze(child).params)})
        t.user_attrs[TRIAL_ATTR]["spec_hash"] = p.spec_hash
        trials.append(t)


def test_inheritance_maps_trained_blocks_onto_the_child(tmp_path):
    from safetensors.torch import save_model

    from archir.spec.sections import TrainSection
    from archir.tasks.base import get_task
    from archir.train import train

    parent_spec = Spec(small(layers=2))
    cfg = TrainSection.model_validate(
        {"task": "text:pydoc", "steps": 15, "batch_size": 4, "seq_len": 32, "lr": 3e-3}
    )
    task = get_task("text:pydoc", {})
    res = train(parent_spec, task, None, cfg)
    parent = res.model
    (tmp_path / "trials" / "7").mkdir(parents=True)
    save_model(parent, str(tmp_path / "trials" / "7" / "model.safetensors"))
    g = genome_of(parent_spec.data)
    # insert a copy of layer 0 in front, and swap the (now) last layer's token mixer
    child = g.copy()
    child.layers.insert(0, genome_of(parent_spec.data).layers[0])
    child.layers[2].blocks[0] = {"kind": "mamba", "d_state": 8, "expansion": 2}
    child.layers[2].origins[0] = None
    data, origins = to_data(child)
    mapped = [[7, o[1]] if o is not None else None for o in origins]
    source, read = inherited_source(
        tmp_path, mapped, lambda n: tmp_path / "trials" / str(n) / "model.safetensors"
    )
    assert read == [7]
    model = compile_spec(Spec(data), seed=1)
    rep = inherit(model, source)
    own = model.state_dict()
    par = parent.state_dict()
    # child blocks 0,1 and 2,3 are copies of the parent's layer 0 (blocks 0,1)
    for i, j in ((0, 0), (1, 1), (2, 0), (3, 1), (5, 3)):
        for k, v in par.items():
            if k.startswith(f"blocks.{j}."):
                assert torch.equal(own[f"blocks.{i}." + k[len(f"blocks.{j}.") :]], v), (i, k)
    assert any(k.startswith("blocks.4.") for k in rep.fresh_names)  # the new mamba
    assert torch.equal(own["embed.weight"], par["embed.weight"])
    # a trained start: the child's held-out loss is far below a fresh model's
    fresh = compile_spec(Spec(data), seed=1)
    got = task.evaluate(model, 8, 32, 4)["val_loss"]
    base = task.evaluate(fresh, 8, 32, 4)["val_loss"]
    assert got < base - 0.3, (got, base)


def test_children_never_bypass_a_layer():
    """Skips, inserts next to them, drops and crossovers leave every block feeding the head."""
    sp = space(operators={"skip": 3.0, "insert_layer": 1.0, "drop_layer": 1.0}, crossover=0.5)
    rng = random.Random(3)
    pool = [genome_of(mixed()), genome_of(small(layers=4))]
    reasons = Counter()
    for _ in range(250):
        a, b = rng.choice(pool), rng.choice(pool)
        try:
            child = (
                crossover(a, genome_of(to_data(b)[0], 1), sp, rng)
                if rng.random() < 0.3
                else mutate(a, sp, rng, 2)
            )
        except NotApplicable:
            continue
        data, _ = to_data(child)
        spec, why = check_child(data, [])
        if spec is None:
            reasons[why.split(":")[0] + ("/dead" if "reaches nothing" in why else "")] += 1
            continue
        pool.append(genome_of(data))
    assert reasons["invalid/dead"] == 0, reasons
    assert sum(reasons.values()) <= 5, reasons
    assert sum("inputs" in b for g in pool for lay in g.layers for b in lay.blocks) >= 10


def test_seeds_and_sections_evolution_refuses():
    data = small(layers=1)
    data["model"]["layers"] = [
        {
            "repeat": 2,
            "blocks": [
                {"kind": "attention", "n_heads": 2, "name": "att"},
                {"kind": "swiglu", "inputs": ["embed", "att"], "merge": "weighted"},
            ],
        }
    ]
    with pytest.raises(SearchError, match=r"model\.layers\.0: evolution cannot unroll"):
        genome_of(data)
    with pytest.raises(Exception, match="at least 1 item"):
        EvolutionSection.model_validate({"token_mixers": {"mamba": {"d_state": []}}})
    with pytest.raises(SearchError, match="search.evolution.bits: 5"):
        make_space(EvolutionSection.model_validate({"bits": [4, 5]}), small(), None)
    with pytest.raises(SearchError, match=r"attention\.name: not a knob"):
        make_space(
            EvolutionSection.model_validate({"token_mixers": {"attention": {"name": "x"}}}),
            small(),
            None,
        )


def test_a_failed_seed_stops_evolution():
    spec = Spec(small())
    evo = Evolution(EvolutionSection.model_validate(WIDE), spec, [], [], 4, seed=0)
    failed = create_trial(
        state=TrialState.FAIL,
        user_attrs={TRIAL_ATTR: {"status": "failed", "reason": "loss diverged"}},
    )
    failed.number = 0
    with pytest.raises(SearchError, match="seed spec could not be evaluated.*loss diverged"):
        evo.propose([failed], spec_hash, lambda k: f"seed-t{k}")


def test_inherited_source_takes_the_first_parents_frame_and_no_merges(tmp_path):
    from safetensors.torch import save_file

    for n, fill in ((3, 1.0), (5, 2.0)):
        save_file(
            {
                "embed.weight": torch.full((4, 2), fill),
                "merges.0": torch.full((2,), fill),
                "blocks.0.fn.w": torch.full((2, 2), fill),
            },
            str(tmp_path / f"{n}.safetensors"),
        )

    def weights(n):
        return tmp_path / f"{n}.safetensors"

    src, read = inherited_source(tmp_path, [[3, 0], [5, 0]], weights, parents=[5, 3])
    assert read == [5, 3]
    assert float(src["embed.weight"][0, 0]) == 2.0  # the lineage's first parent
    assert "merges.0" not in src
    assert float(src["blocks.0.fn.w"][0, 0]) == 1.0 and float(src["blocks.1.fn.w"][0, 0]) == 2.0
    # the first parent's weights missing: the frame comes from the other one
    src, read = inherited_source(tmp_path, [[3, 0], [9, 0]], weights, parents=[9, 3])
    assert read == [3] and float(src["embed.weight"][0, 0]) == 1.0
