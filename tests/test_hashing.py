import copy

import archir
from archir.hashing import canonical_hash
from tests.conftest import ZOO


def _data():
    return copy.deepcopy(archir.load_spec(ZOO / "transformer.yaml").data)


def test_same_graph_written_differently_hashes_the_same():
    base = archir.spec_from_dict(_data())
    d = _data()
    group = d["model"]["layers"][0]
    group["repeat"] = 2
    d["model"]["layers"] = [group, copy.deepcopy(group)]  # 2 x 2 repeats == 4 repeats
    d["name"] = "renamed"
    d["model"]["layers"][0]["blocks"][1]["multiple_of"] = 1  # an explicit default
    assert canonical_hash(base) == canonical_hash(archir.spec_from_dict(d))


def test_different_graphs_hash_differently():
    base = canonical_hash(archir.spec_from_dict(_data()))
    for change in (
        lambda d: d["model"]["layers"][0]["blocks"][0].update(n_heads=8),
        lambda d: d["model"]["layers"][0].update(repeat=3),
        lambda d: d["model"]["layers"][0]["blocks"][1].update(bits=8),
        lambda d: d["model"]["layers"][0].update(share_weights=True),
        lambda d: d["model"].update(d_model=64),
    ):
        d = _data()
        change(d)
        assert canonical_hash(archir.spec_from_dict(d)) != base
