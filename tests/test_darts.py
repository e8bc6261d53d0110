"""One-shot search: the supernet built from a spec, DARTS/GDAS/SPOS, hardware loss, guard."""

from __future__ import annotations

import json
from pathlib import Path

import optuna
import pytest
import torch
from optuna.storages import JournalStorage
from optuna.storages.journal import JournalFileBackend

from archir import compile as compile_spec
from archir.errors import SearchError
from archir.spec import spec_from_dict
from archir.spec.loader import load_spec
from searchers.archloss import CollapseGuard, HardwareLoss
from searchers.objectives import Objective, parse_constraint
from searchers.oneshot import OneShotConfig
from searchers.run import run_search
from searchers.supernet import MixedBlock, build_supernet

ROOT = Path(__file__).resolve().parents[1]


def small_space(**search: object) -> dict:
    return {
        "archir": 1,
        "name": "small",
        "model": {
            "task": "causal_lm",
            "vocab_size": 256,
            "d_model": 16,
            "max_seq_len": 32,
            "embed": {"kind": "token_embedding"},
            "layers": [
                {
                    "repeat": {"int": [1, 2]},
                    "blocks": [
                        {
                            "kind": {"choice": ["attention", "identity"]},
                            "n_heads": 2,
                        },
                        {
                            "kind": "mlp",
                            "expansion": {"choice": [2, 4]},
                            "bits": {"choice": [16, 8]},
                        },
                    ],
                }
            ],
            "head": {"kind": "lm_head", "tie_embeddings": True},
        },
        "train": {
            "task": "text:pydoc",
            "steps": 3,
            "batch_size": 2,
            "seq_len": 16,
            "eval_batches": 1,
            "warmup_steps": 0,
            "threads": 1,
        },
        "search": {
            "objectives": {"val_bpb": "minimize", "params": "minimize"},
            "constraints": {"params": "<= 40000"},
            "budget": {"trials": 2},
            "fidelity": {"kind": "proxy", "steps": 3},
            **search,
        },
    }


@pytest.fixture(scope="module")
def net():
    torch.manual_seed(0)
    return build_supernet(spec_from_dict(small_space()))


def _dec(net, name):
    return next(i for i, d in enumerate(net.decisions) if d.name == name)


def test_supernet_has_mixed_ops_with_the_right_candidates(net):
    cats = {d.name: (d.category, d.labels) for d in net.decisions}
    assert cats == {
        "model.layers.0.repeat": ("depth", ["1", "2"]),
        "model.layers.0.blocks.0.kind": ("block", ["attention", "identity"]),
        "model.layers.0.blocks.1.expansion": ("block", ["2", "4"]),
        "model.layers.0.blocks.1.bits": ("block", ["16", "8"]),
    }
    desc = net.describe()["blocks"]
    assert [b["node"] for b in desc] == [f"layers.{i}.blocks.{j}" for i in (0, 1) for j in (0, 1)]
    assert [b["candidates"] for b in desc] == [2, 4, 2, 4]
    # expansion 2/4 x bits 16/8 run on one set of weights (sliced, fake-quantized)
    assert [b["weight_owners"] for b in desc] == [2, 1, 2, 1]
    # the optional second layer is gated by the depth decision, the first is not
    assert [b["gated_by"] for b in desc] == [None, None] + ["model.layers.0.repeat"] * 2
    mlp = net.blocks[1]
    assert isinstance(mlp, MixedBlock)
    kinds = {(c.node.kind, c.node.params.expansion, c.bits) for c in mlp.cands}
    assert kinds == {("mlp", e, b) for e in (2.0, 4.0) for b in (16.0, 8.0)}
    # identity is the parameter-free value of the kind decision
    assert net.decisions[_dec(net, "model.layers.0.blocks.0.kind")].param_free == [False, True]
    # weights: the largest architecture's, plus the identity candidates' own pre-norm gains
    # (2 layers x d_model 16): sliced candidates add nothing
    owned = sum(p.numel() for p in net.weight_parameters())
    one = compile_spec(
        net.fix(
            {
                "model.layers.0.repeat": 1,
                "model.layers.0.blocks.0.kind": 0,
                "model.layers.0.blocks.1.expansion": 1,
                "model.layers.0.blocks.1.bits": 0,
            }
        )
    )
    assert owned == sum(p.numel() for p in one.parameters()) + 2 * 16


def test_sliced_candidate_uses_the_leading_rows_of_the_largest(net):
    mlp = net.blocks[1]
    x = torch.randn(2, 5, 16)
    small = next(
        i for i, c in enumerate(mlp.cands) if c.node.params.expansion == 2 and c.bits == 16
    )
    big = mlp.cands[small].anchor
    assert mlp.cands[big].node.params.expansion == 4
    fn = mlp.mods[big].fn
    h = mlp.mods[big].norm(x)
    want = x + torch.nn.functional.linear(
        torch.nn.functional.gelu(torch.nn.functional.linear(h, fn.fc1.weight[:32])),
        fn.fc2.weight[:, :32],
    )
    torch.testing.assert_close(mlp.run(small, x), want)
    # the 8-bit branch differs (fake quantization) but the gradient reaches the shared weight
    q8 = next(i for i, c in enumerate(mlp.cands) if c.node.params.expansion == 4 and c.bits == 8)
    assert not torch.allclose(mlp.run(q8, x), mlp.run(big, x))
    fn.fc1.weight.grad = None
    mlp.run(q8, x).sum().backward()
    assert fn.fc1.weight.grad is not None and fn.fc1.weight.grad.abs().sum() > 0


def test_architecture_weights_receive_gradients(net):
    for a in net.alphas:
        a.grad = None
    net.set_path("soft")
    x = torch.randint(0, 256, (2, 8))
    net(x).logsumexp(-1).mean().backward()
    for d, a in zip(net.decisions, net.alphas):
        assert a.grad is not None and a.grad.abs().sum() > 0, d.name
    # hard (Gumbel, straight-through) paths carry gradients too
    for a in net.alphas:
        a.grad = None
    net.set_path("gumbel", tau=1.0, gen=torch.Generator().manual_seed(0))
    net(x).logsumexp(-1).mean().backward()
    assert any(a.grad is not None and a.grad.abs().sum() > 0 for a in net.alphas)
    # a fixed path runs exactly one candidate per block
    arch = {d.name: 0 for d in net.decisions}
    idx = net.set_path("fixed", arch=arch)
    assert idx == [0] * len(net.decisions)
    assert net.blocks[1].active(net._state) == 0


def test_expected_costs_match_the_cost_pass_at_a_one_hot_distribution(net):
    from archir.cost import analyze

    arch = {d.name: len(d.values) - 1 for d in net.decisions}
    probs = [
        torch.nn.functional.one_hot(torch.tensor(arch[d.name]), len(d.values)).float()
        for d in net.decisions
    ]
    e = net.expected_costs(probs)
    rep = analyze(net.fix(arch))
    assert float(e["params"]) == pytest.approx(rep.params)
    assert float(e["flops_per_token"]) == pytest.approx(rep.flops_per_token)
    assert float(e["weight_bytes"]) == pytest.approx(rep.weight_bytes)
    assert float(e["weight_bits_avg"]) == pytest.approx(rep.weight_bits_avg)


def test_hardware_loss_pushes_toward_cheaper_candidates():
    torch.manual_seed(0)
    n = build_supernet(spec_from_dict(small_space()))
    tight = parse_constraint("weight_bytes", "<= 3000")
    hw = HardwareLoss(n, [tight], [Objective("val_bpb", "minimize")], OneShotConfig())
    opt = torch.optim.Adam(list(n.alphas), lr=0.1)
    before = [p.detach().clone() for p in n.probs()]
    for _ in range(5):
        opt.zero_grad()
        loss = hw()
        assert loss > 0
        loss.backward()
        opt.step()
    after = n.probs()
    for name, cheap in (
        ("model.layers.0.repeat", 0),  # one layer
        ("model.layers.0.blocks.0.kind", 1),  # identity
        ("model.layers.0.blocks.1.expansion", 0),  # expansion 2
        ("model.layers.0.blocks.1.bits", 1),  # 8 bits
    ):
        i = _dec(n, name)
        assert after[i][cheap] > before[i][cheap] + 0.05, name
    # a loose constraint adds nothing
    loose = HardwareLoss(n, [parse_constraint("weight_bytes", "<= 1e9")], [], OneShotConfig())
    assert float(loose()) == 0.0


def test_collapse_guard_triggers_rolls_back_and_freezes():
    torch.manual_seed(0)
    n = build_supernet(spec_from_dict(small_space()))
    guard = CollapseGuard(n, threshold=0.6, beta0=0.5, max_triggers=2)
    k = _dec(n, "model.layers.0.blocks.0.kind")
    assert guard.guarded() == [k]
    assert guard.check(0) is None  # uniform: healthy, snapshot taken
    with torch.no_grad():
        n.alphas[k].copy_(torch.tensor([0.0, 3.0]))  # rigged: identity dominates
    ev = guard.check(1)
    assert ev is not None and ev["dominated"] == {
        "model.layers.0.blocks.0.kind": pytest.approx(torch.sigmoid(torch.tensor(3.0)).item())
    }
    assert "rolled back" in ev["action"]
    assert torch.equal(n.alphas[k].detach(), torch.zeros(2))  # the healthy snapshot
    assert guard.beta == 0.5 and not guard.frozen
    # the penalty now pushes mass away from identity
    p = guard.penalty(n.probs())
    p.backward()
    assert n.alphas[k].grad[1] > 0 > n.alphas[k].grad[0]
    with torch.no_grad():
        n.alphas[k].copy_(torch.tensor([0.0, 3.0]))
    ev = guard.check(2)
    assert ev is not None and guard.frozen and guard.beta == 1.0
    assert "frozen" in ev["action"]


def oneshot(spec, out, searcher="darts", say=None, **options):
    """A one-shot search through the one entry point (no ONNX export, quiet)."""
    return run_search(
        spec, searcher=searcher, out=out, export=False, say=say or (lambda s: None), **options
    )


def _study(run_dir):
    storage = JournalStorage(JournalFileBackend(str(run_dir / "study.journal")))
    return optuna.load_study(study_name="small", storage=storage)


def test_oneshot_darts_end_to_end(tmp_path):
    out = oneshot(spec_from_dict(small_space()), tmp_path / "run", supernet_steps=6, log_every=2)
    run = tmp_path / "run"
    for f in (
        "spec.yaml",
        "run.json",
        "study.journal",
        "pareto.json",
        "arch_weights.json",
        "best/spec.yaml",
        "best/model.safetensors",
        "best/report.json",
        "trials/0/spec.yaml",
        "trials/0/metrics.json",
    ):
        assert (run / f).exists(), f
    best = load_spec(run / "best" / "spec.yaml")
    assert best.is_concrete
    model = compile_spec(best)
    assert model(torch.randint(0, 256, (1, 8))).shape == (1, 8, 256)
    study = _study(run)
    assert len(study.trials) >= 1
    t = study.trials[0]
    assert t.state == optuna.trial.TrialState.COMPLETE
    assert t.user_attrs["searcher"] == "darts-softmax"
    assert set(t.params) == set(
        json.loads((run / "trials/0/metrics.json").read_text())["params_chosen"]
    )
    aw = json.loads((run / "arch_weights.json").read_text())
    for d in aw["decisions"].values():
        assert sum(d["probs"]) == pytest.approx(1.0, abs=1e-4)
    assert aw["collapse"]["guard"] is True
    assert aw["training"]["warmup_steps"] == 1
    assert out.best is not None and out.best["constraints"]["params"]["ok"]
    assert out.extra["cpu_s"]["supernet"] > 0


def test_oneshot_spos_and_gumbel(tmp_path):
    out = oneshot(
        spec_from_dict(small_space()),
        tmp_path / "spos",
        searcher="spos",
        supernet_steps=4,
        population=4,
        generations=1,
        n_final=2,
    ).extra
    assert len(out["trials"]) == 2 and all(t["how"] == "evolution" for t in out["trials"])
    assert len(_study(tmp_path / "spos").trials) == 2
    g = oneshot(spec_from_dict(small_space()), tmp_path / "gdas", relax="gumbel", supernet_steps=4)
    assert g.extra["relax"] == "gumbel" and g.extra["trials"][0]["status"] in ("ok", "infeasible")
    hist = json.loads((tmp_path / "gdas" / "arch_weights.json").read_text())["training"]
    assert hist["history"][-1]["tau"] < OneShotConfig().tau_max


def test_bad_arguments_are_search_errors(tmp_path):
    with pytest.raises(SearchError, match="unknown searcher 'enas'"):
        oneshot(spec_from_dict(small_space()), tmp_path, searcher="enas")
    with pytest.raises(SearchError, match="unknown one-shot option 'temperature'"):
        oneshot(spec_from_dict(small_space()), tmp_path, temperature=3)
    with pytest.raises(SearchError, match="relax does not apply to --searcher spos"):
        oneshot(spec_from_dict(small_space()), tmp_path, searcher="spos", relax="gumbel")
    held_only = small_space()
    held_only["model"]["layers"][0] = {"repeat": 1, "blocks": [{"kind": "mlp"}]}
    held_only["model"]["d_model"] = {"choice": [16, 32]}
    with pytest.raises(SearchError, match="no decision a supernet can search"):
        build_supernet(spec_from_dict(held_only))


# -- latency: calibrated predictor per candidate, FLOPs fallback ------------------------------
def _lat_space() -> dict:
    return small_space(objectives={"val_bpb": "minimize", "latency_ms": "minimize"})


class FakePredictor:
    """Stands in for a calibrated :class:`exporters.latency.LatencyPredictor`: each part's
    milliseconds linear in its shape features, the whole model ``1.5 · Σ parts + 0.2``
    (an affine composition stage, like the real predictor's)."""

    coef = (3.0, 9.0, 0.5, 0.2, 0.01)

    def predict(self, g):
        from exporters.latency import Prediction

        per = {p.name: sum(c * x for c, x in zip(self.coef, p.x)) for p in g.nodes}
        sop = sum(per.values())
        return Prediction(1.5 * sop + 0.2, (sop, 2 * sop), sop, per, False)


@pytest.fixture
def fake_predictor(monkeypatch):
    import searchers.archloss as archloss

    def load(runtime, threads, calibration):
        assert runtime == "torch" and threads == 1
        return FakePredictor(), calibration or "fake.json"

    monkeypatch.setattr(archloss, "load_predictor", load)


def test_latency_predictor_gives_each_candidate_its_own_prediction(fake_predictor):
    from archir.spec.sections import SearchSection
    from exporters.latency import graph_features
    from searchers.archloss import make_latency_model

    spec = spec_from_dict(_lat_space())
    net = build_supernet(spec)
    sec = SearchSection.model_validate(spec.data["search"])
    lat = make_latency_model(net, sec, 16, OneShotConfig())
    assert lat.source == "predictor" and lat.info["calibration"] == "fake.json"
    assert lat.info["composition"] == pytest.approx([1.5, 0.2])
    # candidates of one block position get different predicted latencies
    assert len({round(v, 9) for v in lat.rows[0]}) > 1
    # at every one-hot distribution the expectation is the predictor's value of that spec
    for arch in net.arch_space():
        probs = [
            torch.nn.functional.one_hot(torch.tensor(arch[d.name]), len(d.values)).float()
            for d in net.decisions
        ]
        e = lat.expected(net, net.expected_costs(probs), probs)
        want = FakePredictor().predict(graph_features(net.fix(arch), 1, 16)).ms
        assert float(e) == pytest.approx(want, rel=1e-6)
        assert lat.of_spec(net.fix(arch), 0.0) == pytest.approx(want, rel=1e-9)
    # differentiable in alpha through the hardware loss
    hw = HardwareLoss(net, [], [Objective("latency_ms", "minimize")], OneShotConfig(), lat)
    hw().backward()
    assert net.alphas[0].grad is not None and net.alphas[0].grad.abs().sum() > 0


def test_latency_falls_back_to_flops_without_calibration(tmp_path, monkeypatch):
    import exporters.latency as xl
    from archir.cost import analyze
    from archir.spec.sections import SearchSection
    from searchers.archloss import make_latency_model

    monkeypatch.setenv("ARCHIR_CACHE", str(tmp_path / "empty"))
    monkeypatch.setattr(xl, "latency_ms", lambda *a, **k: {"ms": 2.0, "median_ms": 2.0})
    spec = spec_from_dict(_lat_space())
    net = build_supernet(spec)
    sec = SearchSection.model_validate(spec.data["search"])
    lat = make_latency_model(net, sec, 16, OneShotConfig())
    assert lat.source == "flops" and "no latency calibration" in lat.info["reason"]
    flops = analyze(net.ref_spec).flops_per_token
    assert lat.ms_per_flop == pytest.approx(2.0 / flops)
    e = net.expected_costs()
    assert float(lat.expected(net, e, None)) == pytest.approx(
        float(e["flops_per_token"]) * 2 / flops
    )
    with pytest.raises(SearchError, match="latency_model='predictor' but no latency calibration"):
        make_latency_model(net, sec, 16, OneShotConfig(latency_model="predictor"))


def test_oneshot_records_which_latency_estimate_it_used(tmp_path, monkeypatch):
    import searchers.archloss as archloss

    monkeypatch.setenv("ARCHIR_CACHE", str(tmp_path / "empty"))
    spec = spec_from_dict(_lat_space())
    said: list[str] = []
    out = oneshot(spec, tmp_path / "f", supernet_steps=3, say=said.append).extra
    assert out["latency"]["source"] == "flops"
    assert any("latency: FLOPs" in s and "no calibrated predictor" in s for s in said)
    monkeypatch.setattr(archloss, "load_predictor", lambda *a: (FakePredictor(), "fake.json"))
    said.clear()
    out = oneshot(spec, tmp_path / "p", supernet_steps=3, say=said.append).extra
    aw = json.loads((tmp_path / "p" / "arch_weights.json").read_text())
    assert aw["latency"]["source"] == "predictor" and out["latency"]["source"] == "predictor"
    assert any(s.startswith("latency: calibrated predictor (fake.json") for s in said)
    # the hardware loss saw the predictor: its expectation is in the training history
    hist = aw["training"]["history"][-1]["expected"]["latency_ms"]
    assert hist > 0


# -- held decisions ---------------------------------------------------------------------------
def _held_space() -> dict:
    d = small_space()
    d["model"]["d_model"] = {"choice": [16, 32]}
    d["model"]["layers"][0]["residual"] = {"choice": ["pre_norm", "post_norm"]}
    return d


def test_held_decisions_default_to_the_first_option_or_the_users_value():
    spec = spec_from_dict(_held_space())
    net = build_supernet(spec)
    doc = net.held_doc()
    assert doc["model.d_model"]["value"] == 16 and doc["model.d_model"]["source"] == "default"
    assert doc["model.d_model"]["allowed"] == "choice [16, 32]"
    net = build_supernet(spec, held={"model.d_model": 32, "model.layers.0.residual": "post_norm"})
    assert net.spec.model.d_model == 32 and net.spec.model.layers[0].residual == "post_norm"
    assert net.held_doc()["model.d_model"]["source"] == "user"
    fixed = net.fix(net.argmax())
    assert fixed.model.model.d_model == 32
    with pytest.raises(SearchError, match="held value 24 for 'model.d_model' is not one of"):
        build_supernet(spec, held={"model.d_model": 24})
    with pytest.raises(SearchError, match="'model.layers.0.repeat' is searched by the supernet"):
        build_supernet(spec, held={"model.layers.0.repeat": 1})
    with pytest.raises(SearchError, match="held decision 'model.vocab' is not a search node") as e:
        build_supernet(spec, held={"model.vocab": 1})
    assert "model.d_model" in str(e.value.hint)


# -- the common search options --------------------------------------------------------------
def test_oneshot_takes_the_search_options(tmp_path):
    said: list[str] = []
    url = f"sqlite:///{tmp_path / 'shared.db'}"
    res = oneshot(
        spec_from_dict(_held_space()),
        tmp_path / "run",
        trials=40,
        storage=url,
        study="mine",
        timeout_s=0.01,
        steps=2,
        held={"model.d_model": 32},
        n_final=2,
        say=said.append,
    )
    out = res.extra
    # trials sizes the supernet when supernet_steps is not given: max(10, trials * steps / 2)
    assert out["supernet"]["planned_steps"] == 40
    assert out["supernet"]["stopped"].startswith("timeout") and out["supernet"]["steps"] < 40
    assert res.study_name == "mine" and res.storage == url
    assert not (tmp_path / "run" / "study.journal").exists()
    study = optuna.load_study(study_name="mine", storage=url)
    assert len(study.trials) == 1 and study.trials[0].params["model.d_model"] == 32
    assert any(s.startswith("held decisions") and "model.d_model = 32 (user" in s for s in said)
    for f in ("arch_weights.json", "oneshot.json", "run.json"):
        doc = json.loads((tmp_path / "run" / f).read_text())
        assert doc["held"]["model.d_model"]["value"] == 32, f
    metrics = json.loads((tmp_path / "run" / "trials/0/metrics.json").read_text())
    assert metrics["train"]["steps"] == 2  # steps: the retraining budget
    with pytest.raises(SearchError, match="val_bpb"):
        oneshot(spec_from_dict(small_space()), tmp_path / "c", fidelity="cost")
    with pytest.raises(SearchError, match=r"bad search option --fidelity \(search.fidelity.kind\)"):
        oneshot(spec_from_dict(small_space()), tmp_path / "d", fidelity="fast")
    with pytest.raises(SearchError, match="unknown latency_model"):
        oneshot(spec_from_dict(small_space()), tmp_path / "e", latency_model="exact")
    for bad in "cde":
        assert not (tmp_path / bad).exists()  # refused before the run folder was made


def test_sampled_paths_do_not_keep_the_aux_loss_of_a_candidate_off_the_path():
    d = small_space()
    d["model"]["layers"][0] = {
        "repeat": 1,
        "blocks": [
            {"kind": "attention", "n_heads": 2},
            {"choice": [{"kind": "mlp"}, {"kind": "moe", "n_experts": 2, "top_k": 1}]},
        ],
    }
    net = build_supernet(spec_from_dict(d))
    name = net.decisions[0].name
    x = torch.randint(0, 256, (2, 8))
    net.set_path("fixed", arch={name: 1})  # moe: sets its load-balancing loss
    y = net(x)
    aux = net.aux_loss()
    assert aux is not None
    (y.sum() + aux).backward()
    net.set_path("fixed", arch={name: 0})  # mlp: moe does not run
    y = net(x)
    assert net.aux_loss() is None
    y.sum().backward()  # no second backward through the moe step's freed graph


def test_a_vision_hierarchy_is_refused_by_the_supernet():
    """The supernet's plan has no downsample step; it must refuse a hierarchy, not build a
    model that skips the stages' downsampling."""
    import copy

    data = copy.deepcopy(load_spec(ROOT / "specs" / "zoo" / "poolformer-s.yaml").data)
    data["model"]["layers"][2]["blocks"][0] = {
        "role": "token_mixer",
        "kind": {"choice": ["pooling", "sepconv"]},
    }
    with pytest.raises(SearchError, match="cannot hold a vision hierarchy") as e:
        build_supernet(spec_from_dict(data))
    assert "layers.1.downsample" in str(e.value) and "--searcher tpe" in e.value.hint
