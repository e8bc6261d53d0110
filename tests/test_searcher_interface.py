"""One searcher interface (DESIGN.md §7): the registry, the shared run set-up, refusals."""

from __future__ import annotations

import json
from pathlib import Path

import optuna
import pytest
import yaml

from archir.errors import SearchError
from searchers import base
from searchers.base import get_searcher, refuse_options, searcher_names
from searchers.run import OptunaSearcher, run_search
from searchers.storage import open_storage

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "specs" / "search" / "tiny.yaml"
COST = {
    "objectives": {"params": "minimize"},
    "constraints": {"params": "<= 40000"},
    "fidelity": "cost",
    "budget": {"trials": 2},
}


def make_spec(where: Path, train: dict | None = None, **search) -> Path:
    data = yaml.safe_load(TINY.read_text())
    data["search"].update(search)
    data["train"].update(train or {})
    p = where / "tiny.yaml"
    p.write_text(yaml.safe_dump(data, sort_keys=False))
    return p


def snapshot(d: Path) -> dict[str, bytes]:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def quiet(s: str) -> None:
    pass


class Probe(OptunaSearcher):
    """A searcher added the way evolution is: the worker loop, another name."""

    name = "probe"
    options = frozenset({"workers"})
    seen: list[str] = []

    def search(self, run, study, *, export, say):
        Probe.seen.append(run.cfg.searcher)
        return super().search(run, study, export=export, say=say)


@pytest.fixture
def probe(monkeypatch):
    monkeypatch.setitem(base._REGISTRY, "probe", Probe)
    monkeypatch.setitem(base._SUMMARIES, "probe", "a test searcher")
    Probe.seen.clear()
    return Probe


def test_the_registry_names_every_searcher_and_refuses_an_unknown_one():
    assert searcher_names()[:3] == ["optuna", "darts", "spos"]
    assert {n: get_searcher(n).name for n in searcher_names()} == {n: n for n in searcher_names()}
    with pytest.raises(SearchError, match="unknown searcher 'tpe'") as e:
        get_searcher("tpe")
    assert "optuna, darts, spos" in str(e.value.hint)
    with pytest.raises(ValueError, match="registered already"):
        base.register_searcher("optuna", OptunaSearcher)


def test_options_a_searcher_does_not_take_name_who_takes_them():
    with pytest.raises(SearchError) as e:
        refuse_options(get_searcher("darts"), {"sampler": "--sampler", "workers": "--workers"})
    assert e.value.message == (
        "--sampler does not apply to --searcher darts (nor --workers): --sampler applies to "
        "the trial-based searchers only"
    )
    with pytest.raises(SearchError, match="supernet_steps applies to the one-shot searchers"):
        get_searcher("optuna")(supernet_steps=3)
    with pytest.raises(SearchError, match="unknown trial-based option 'relaxation'"):
        get_searcher("optuna")(relaxation="gumbel")
    refuse_options(get_searcher("darts"), {"relax": "--relax"})  # taken: no error


def test_a_registered_searcher_runs_through_the_shared_set_up(tmp_path, probe):
    """A new searcher is one registration: run.json, the study and the workers' config
    carry its name; a run that resumes it with another searcher is refused before any
    write."""
    spec = make_spec(tmp_path, **COST)
    run = tmp_path / "run"
    res = run_search(spec, searcher="probe", out=run, export=False, say=quiet)
    assert Probe.seen == ["probe"] and res.n_trials == 2
    assert json.loads((run / "run.json").read_text())["searcher"] == "probe"
    st = open_storage(None, run / "study.journal")
    assert optuna.load_study(study_name="tiny", storage=st).user_attrs["archir:searcher"] == (
        "probe"
    )
    before = snapshot(run)
    with pytest.raises(SearchError, match="searched by --searcher probe, not optuna") as e:
        run_search(spec, out=run, export=False, say=quiet)
    assert "--searcher probe" in str(e.value.hint)
    with pytest.raises(SearchError, match="searched by --searcher probe, not spos"):
        run_search(spec, searcher="spos", out=run, export=False, say=quiet)
    assert snapshot(run) == before
    # the same searcher resumes
    res = run_search(spec, searcher="probe", out=run, trials=3, export=False, say=quiet)
    assert res.n_trials == 3


def test_a_shared_storage_refuses_another_searcher_too(tmp_path, probe):
    spec = make_spec(tmp_path, **COST)
    url = f"sqlite:///{tmp_path / 'shared.db'}"
    run_search(spec, searcher="probe", out=tmp_path / "a", storage=url, export=False, say=quiet)
    with pytest.raises(SearchError, match="study 'tiny' exists, searched by --searcher probe"):
        run_search(spec, out=tmp_path / "b", storage=url, export=False, say=quiet)
    assert not (tmp_path / "b").exists()


def test_a_run_folder_of_an_earlier_one_shot_run_keeps_its_searcher(tmp_path):
    """run.json of earlier versions: no ``searcher`` (an Optuna search) or
    ``darts-softmax`` / ``darts-gumbel`` / ``spos``."""
    from searchers.setup import check_run_folder

    run = tmp_path / "run"
    run.mkdir()
    for recorded, ok, refused in (
        (None, "optuna", "darts"),
        ("darts-gumbel", "darts", "spos"),
        ("spos", "spos", "optuna"),
    ):
        doc = {"study": "s", "space_hash": "h", **({"searcher": recorded} if recorded else {})}
        (run / "run.json").write_text(json.dumps(doc))
        check_run_folder(run, "s", "h", None, ok)
        with pytest.raises(SearchError, match=f"searched by --searcher {ok}, not {refused}"):
            check_run_folder(run, "s", "h", None, refused)


def test_bad_input_is_refused_before_the_run_folder_exists(tmp_path):
    """One set-up for every searcher: the same refusals, before anything is written."""
    spec = make_spec(tmp_path, **COST)
    out = tmp_path / "run"
    cases = [
        ({"searcher": "darts", "workers": 2}, "workers does not apply to --searcher darts"),
        ({"searcher": "spos", "trials": 0}, "--trials (search.budget.trials)"),
        ({"searcher": "darts", "fidelity": "ladder", "steps": 3}, "does not apply to a fidelity"),
        ({"searcher": "darts", "supernet_steps": 0}, "--supernet-steps"),
        ({"searcher": "darts", "held": {"model.vocab": 1}}, "held decision 'model.vocab'"),
        ({"searcher": "optuna", "sampler": "cmaes"}, "--sampler (search.sampler)"),
    ]
    for kw, want in cases:
        with pytest.raises(SearchError) as e:
            run_search(spec, out=out, export=False, say=quiet, **kw)
        assert want in str(e.value), (kw, str(e.value))
        assert not out.exists(), kw
    # constraints no candidate meets: the preflight serves the one-shot searchers too
    tight = make_spec(tmp_path, **{**COST, "constraints": {"params": "<= 10"}})
    for searcher in ("optuna", "darts"):
        with pytest.raises(SearchError, match="no candidate meets the constraints"):
            run_search(tight, searcher=searcher, out=out, export=False, say=quiet)
        assert not out.exists()


def test_train_search_nodes_are_held_by_one_shot_and_refused_trial_by_trial(tmp_path):
    spec = make_spec(
        tmp_path,
        train={"lr": {"choice": [0.003, 0.01]}},
        **{
            **COST,
            "objectives": {"params": "minimize", "val_bpb": "minimize"},
            "fidelity": {"kind": "proxy", "steps": 1},
        },
    )
    with pytest.raises(SearchError, match="train.lr is a search node") as e:
        run_search(spec, out=tmp_path / "a", export=False, say=quiet)
    assert "darts or spos" in str(e.value.hint)
    assert not (tmp_path / "a").exists()
    res = run_search(
        spec, searcher="spos", out=tmp_path / "b", supernet_steps=2, export=False, say=quiet
    )
    assert res.extra["held"]["train.lr"]["value"] == 0.003
    assert json.loads((tmp_path / "b" / "run.json").read_text())["searcher"] == "spos"
