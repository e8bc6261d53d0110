"""``archir search --searcher evolution`` end to end: children of a concrete seed, lineage,
two workers, kill -9 and resume, weight inheritance on a ladder, errors."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
import yaml

from archir.spec import load_spec
from searchers.evolution import ATTR_GENOME
from searchers.objectives import trial_attrs
from searchers.run import open_storage
from searchers.space import spec_hash

ROOT = Path(__file__).resolve().parents[1]

EVOLUTION = {
    "token_mixers": {
        "attention": {"n_heads": [2, 4]},
        "mamba": {"d_state": [4, 8]},
        "gla": {"n_heads": [2]},
    },
    "channel_mixers": {"swiglu": {"expansion": 2}, "mlp": {"expansion": [2, 4]}},
    "depth": [1, 4],
    "d_model": [16, 32],
    "bits": [4, 8, 16],
    "population": 4,
}


def seed_spec(tmp_path: Path, name: str = "evo", **search) -> Path:
    data = {
        "archir": 1,
        "name": name,
        "model": {
            "task": "causal_lm",
            "vocab_size": 256,
            "d_model": 32,
            "max_seq_len": 64,
            "embed": {"kind": "token_embedding"},
            "layers": [
                {
                    "repeat": 2,
                    "blocks": [
                        {"kind": "attention", "n_heads": 2},
                        {"kind": "swiglu", "expansion": 2},
                    ],
                }
            ],
            "head": {"kind": "lm_head", "tie_embeddings": True},
        },
        "train": {
            "task": "text:pydoc",
            "steps": 4,
            "batch_size": 4,
            "seq_len": 32,
            "lr": 3e-3,
            "eval_batches": 2,
            "warmup_steps": 0,
        },
        "search": {
            "objectives": {"params": "minimize", "flops_per_token": "minimize"},
            "constraints": {"params": "<= 60000"},
            "budget": {"trials": 12},
            "fidelity": "cost",
            "evolution": EVOLUTION,
            **search,
        },
    }
    p = tmp_path / f"{name}.yaml"
    p.write_text(yaml.safe_dump(data, sort_keys=False))
    return p


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "archir.cli", *args]


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


def study_of(run: Path, name: str = "evo") -> optuna.Study:
    return optuna.load_study(study_name=name, storage=open_storage(None, run / "study.journal"))


def _check_children(run: Path, name: str = "evo") -> list[optuna.trial.FrozenTrial]:
    trials = study_of(run, name).trials
    done = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
    for t in done:
        a = trial_attrs(t)
        lin = a["lineage"]
        # every trial's concrete spec validates on its own, and is the model it records
        spec = load_spec(run / a["spec"])
        assert spec.is_concrete
        assert spec_hash(spec) == a["spec_hash"]
        if a.get("duplicate_of") is None and a.get("continue_of") is None:
            # a model is trained once, unless two workers drew it while neither had finished
            for u in done:
                same = trial_attrs(u)["spec_hash"] == a["spec_hash"]
                if u.number < t.number and same and trial_attrs(u).get("continue_of") is None:
                    assert u.datetime_complete > t.datetime_start, (u.number, t.number)
        if lin["origin"] in ("mutation", "crossover"):
            assert lin["parents"] and all(p < t.number for p in lin["parents"])
            assert lin["mutations"]
            assert ATTR_GENOME in t.system_attrs
        else:
            assert lin["origin"] == "seed" and lin["parents"] == []
        # the cost constraint was met before anything ran
        assert a["values"]["params"] <= 60000
    return done


@pytest.mark.heavy
def test_evolution_grows_a_family_from_a_concrete_seed(tmp_path):
    spec = seed_spec(tmp_path)
    run = tmp_path / "run"
    out = subprocess.run(
        _cli("search", str(spec), "--searcher", "evolution", "--out", str(run), "--no-export"),
        env=_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    done = _check_children(run)
    lins = [trial_attrs(t)["lineage"] for t in done if trial_attrs(t).get("duplicate_of") is None]
    assert sum(lin["origin"] == "seed" for lin in lins) == 1
    assert sum(lin["origin"] in ("mutation", "crossover") for lin in lins) >= 10
    # the graph itself changed: depths, kinds and widths beyond the seed's
    shapes = set()
    for t in done:
        m = yaml.safe_load(trial_attrs(t)["spec_yaml"])["model"]
        kinds = tuple(
            b["kind"] for g in m["layers"] for _ in range(g["repeat"]) for b in g["blocks"]
        )
        shapes.add((m["d_model"], kinds))
    assert len({len(k) for _, k in shapes}) >= 2 or len({k for _, k in shapes}) >= 3
    assert "<- mutation of #" in out.stdout
    assert (run / "pareto.json").is_file()


@pytest.mark.heavy
def test_evolution_with_two_workers_shares_one_population(tmp_path):
    spec = seed_spec(tmp_path, budget={"trials": 10})
    run = tmp_path / "run"
    out = subprocess.run(
        _cli(
            "search",
            str(spec),
            "--searcher",
            "evolution",
            "--workers",
            "2",
            "--out",
            str(run),
            "--no-export",
        ),
        env=_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "[w0]" in out.stdout and "[w1]" in out.stdout
    done = _check_children(run)
    counted = [t for t in done if trial_attrs(t).get("duplicate_of") is None]
    assert 10 <= len(counted) <= 12


@pytest.mark.heavy
def test_evolution_resumes_after_kill9(tmp_path):
    spec = seed_spec(
        tmp_path,
        objectives={"val_bpb": "minimize", "params": "minimize"},
        fidelity={"kind": "proxy", "steps": 20},
        budget={"trials": 6},
        pruner="none",
    )
    run = tmp_path / "run"
    cmd = _cli("search", str(spec), "--searcher", "evolution", "--out", str(run), "--no-export")
    proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    # the fourth model is a child: kill it while it trains
    target = run / "trials" / "4"
    deadline = time.time() + 180
    while time.time() < deadline and not (target / "spec.yaml").exists():
        if proc.poll() is not None:
            pytest.fail(f"search ended early: {proc.stderr.read().decode()[-2000:]}")
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed = study_of(run).trials
    running = [t for t in killed if t.state == optuna.trial.TrialState.RUNNING]
    assert [t.number for t in running] == [4]
    genome = running[0].system_attrs[ATTR_GENOME]
    out = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    trials = study_of(run).trials
    retry = [t for t in trials if t.system_attrs.get("failed_trial") == 4]
    assert len(retry) == 1 and retry[0].state == optuna.trial.TrialState.COMPLETE
    assert retry[0].system_attrs[ATTR_GENOME] == genome  # the same child, not a new draw
    assert trial_attrs(retry[0])["lineage"] == trial_attrs(running[0])["lineage"]
    _check_children(run)


@pytest.mark.slow  # ~33 s; inheritance itself is covered by tests/test_evolution.py
def test_inherited_children_on_a_ladder(tmp_path):
    spec = seed_spec(
        tmp_path,
        objectives={"val_bpb": "minimize", "params": "minimize"},
        fidelity={"kind": "ladder", "rungs": [6, 12], "eta": 2},
        budget={"trials": 6},
        evolution={**EVOLUTION, "inherit": True, "population": 2},
    )
    run = tmp_path / "run"
    out = subprocess.run(
        _cli("search", str(spec), "--searcher", "evolution", "--out", str(run)),
        env=_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    trials = study_of(run).trials
    inherited = 0
    for t in trials:
        a = trial_attrs(t)
        lin = a.get("lineage") or {}
        if lin.get("inherited_from") is not None and a.get("continue_of") is None:
            inherited += 1
            assert lin["inherited_from"] in lin["parents"] or lin["inherited_from"] in [
                u.number for u in trials
            ]
            log = (run / "trials" / str(t.number) / "log").read_text()
            assert "inherits from trial(s)" in log and "tensors copied" in log
    assert inherited >= 1
    # promotions continue their own model: the same genome, no second inheritance
    for t in trials:
        a = trial_attrs(t)
        if a.get("continue_of") is not None:
            src = next(u for u in trials if u.number == a["continue_of"])
            assert a["spec_hash"] == trial_attrs(src)["spec_hash"]
    assert (run / "best" / "model.onnx").is_file()  # exported, parity-checked


def test_evolution_without_its_section_is_refused(tmp_path):
    spec = seed_spec(tmp_path)
    data = yaml.safe_load(spec.read_text())
    del data["search"]["evolution"]
    spec.write_text(yaml.safe_dump(data))
    run = tmp_path / "run"
    out = subprocess.run(
        _cli("search", str(spec), "--searcher", "evolution", "--out", str(run)),
        env=_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 2
    assert "search.evolution" in out.stderr and "Traceback" not in out.stderr
    assert not run.exists()


def test_a_bad_evolution_section_names_the_field(tmp_path):
    spec = seed_spec(tmp_path, evolution={**EVOLUTION, "token_mixers": {"mamba": {"n_heads": 2}}})
    run = tmp_path / "run"
    out = subprocess.run(
        _cli("search", str(spec), "--searcher", "evolution", "--out", str(run)),
        env=_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 2
    assert "search.evolution.token_mixers.mamba.n_heads" in out.stderr
    assert "Traceback" not in out.stderr
    assert not run.exists()
