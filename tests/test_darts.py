"""One-shot search: the supernet built from a spec, DARTS/GDAS/SPOS, hardware loss, guard."""

from __future__ import annotations

import json

import optuna
import pytest
import torch
from optuna.storages import JournalStorage
from optuna.storages.journal import JournalFileBackend

from archir import compile as compile_spec
from archir.errors import SearchError
from archir.spec import spec_from_dict
from archir.spec.loader import load_spec
from searchers.darts import CollapseGuard, HardwareLoss, OneShotConfig, run_oneshot
from searchers.objectives import Objective, parse_constraint
from searchers.supernet import MixedBlock, build_supernet


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


def _study(run_dir):
    storage = JournalStorage(JournalFileBackend(str(run_dir / "study.journal")))
    return optuna.load_study(study_name="small", storage=storage)


def test_run_oneshot_darts_end_to_end(tmp_path):
    out = run_oneshot(spec_from_dict(small_space()), tmp_path / "run", steps=6, log_every=2)
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
    assert out["best"]["constraints"]["params"]["ok"]
    assert out["cpu_s"]["supernet"] > 0


def test_run_oneshot_spos_and_gumbel(tmp_path):
    out = run_oneshot(
        spec_from_dict(small_space()),
        tmp_path / "spos",
        method="spos",
        steps=4,
        population=4,
        generations=1,
        n_final=2,
    )
    assert len(out["trials"]) == 2 and all(t["how"] == "evolution" for t in out["trials"])
    assert len(_study(tmp_path / "spos").trials) == 2
    g = run_oneshot(spec_from_dict(small_space()), tmp_path / "gdas", relax="gumbel", steps=4)
    assert g["relax"] == "gumbel" and g["trials"][0]["status"] in ("ok", "infeasible")
    hist = json.loads((tmp_path / "gdas" / "arch_weights.json").read_text())["training"]
    assert hist["history"][-1]["tau"] < OneShotConfig().tau_max


def test_bad_arguments_are_search_errors(tmp_path):
    with pytest.raises(SearchError, match="unknown one-shot method"):
        run_oneshot(spec_from_dict(small_space()), tmp_path, method="enas")
    with pytest.raises(SearchError, match="unknown one-shot option 'temperature'"):
        run_oneshot(spec_from_dict(small_space()), tmp_path, temperature=3)
    held_only = small_space()
    held_only["model"]["layers"][0] = {"repeat": 1, "blocks": [{"kind": "mlp"}]}
    held_only["model"]["d_model"] = {"choice": [16, 32]}
    with pytest.raises(SearchError, match="no decision a supernet can search"):
        build_supernet(spec_from_dict(held_only))
