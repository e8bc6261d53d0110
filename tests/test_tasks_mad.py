"""MAD generators: layouts, token ranges, ignore positions, determinism, settings, errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from archir.errors import TaskError
from archir.spec import spec_from_dict
from archir.tasks import get_task
from archir.tasks.mad import (
    IGNORE,
    LITE_SETTINGS,
    TASKS,
    MADSetting,
    MADTask,
    adapt_spec,
    full_settings,
    generate,
    macro_accuracy,
)


def small(task: str, **kw) -> MADSetting:
    base = {
        "in-context-recall": MADSetting(task, 16, 32, 64, num_test=32),
        "fuzzy-in-context-recall": MADSetting(task, 16, 48, 64, num_test=32),
        "noisy-in-context-recall": MADSetting(
            task, 32, 32, 64, num_test=32, frac_noise=0.4, noise_vocab=16
        ),
        "selective-copying": MADSetting(task, 16, 40, 64, num_test=32, n_tokens_to_copy=6),
        "compression": MADSetting(task, 16, 12, 64, num_test=32),
        "memorization": MADSetting(task, 64, 16, 32, num_test=16),
    }[task]
    return MADSetting(**{**base.__dict__, **kw})


def lm_spec(vocab: int = 16, L: int = 64, d: int = 32) -> dict:
    return {
        "archir": 1,
        "name": "tiny",
        "model": {
            "task": "causal_lm",
            "vocab_size": vocab,
            "d_model": d,
            "max_seq_len": L,
            "embed": {"kind": "token_embedding"},
            "layers": [
                {
                    "repeat": 1,
                    "blocks": [
                        {"kind": "attention", "n_heads": 2, "pos": "rope"},
                        {"kind": "swiglu", "expansion": 2},
                    ],
                }
            ],
            "head": {"kind": "lm_head", "tie_embeddings": True},
        },
    }


@pytest.mark.parametrize("task", TASKS)
def test_same_seed_byte_identical_and_different_seed_differs(task):
    s = small(task)
    a, b, c = generate(s, 3), generate(s, 3), generate(s, 4)
    for name in ("train_x", "train_y", "test_x", "test_y"):
        assert getattr(a, name).tobytes() == getattr(b, name).tobytes()
        assert getattr(a, name).dtype == np.int64
        assert getattr(a, name).shape == (
            s.num_train if name.startswith("train") else s.num_test,
            s.input_len,
        )
    assert a.train_x.tobytes() != c.train_x.tobytes()


def test_in_context_recall_layout():
    s = small("in-context-recall")
    d = generate(s, 0)
    V, L = s.vocab_size, s.seq_len
    assert d.train_x.shape[1] == L - 1
    keys, vals = d.train_x[:, 0::2], d.train_x[:, 1::2]
    assert keys.min() >= 0 and keys.max() < V // 2
    assert vals.min() >= V // 2 and vals.max() < V
    # training target = next token everywhere
    assert (d.train_x[:, 1:] == d.train_y[:, :-1]).all()
    for x, y in zip(d.test_x, d.test_y):
        full = np.append(x, y[-1])  # the last target is the probe's value
        kv: dict[int, int] = {}
        for i in range(0, L, 2):
            k, v = int(full[i]), int(full[i + 1])
            assert kv.setdefault(k, v) == v  # one mapping per sequence
            # target at the key's position: value if the key was seen before, else ignored
            want = v if i > 0 and k in dict(zip(full[0:i:2], full[1:i:2])) else IGNORE
            assert y[i] == want
            assert y[i - 1] == IGNORE if i > 0 else True
        assert y[-1] != IGNORE  # the probe's key was always shown before


def test_noisy_recall_noise_ignored_and_one_real_pair():
    s = small("noisy-in-context-recall")
    d = generate(s, 0)
    real = s.vocab_size - s.noise_vocab
    noise_frac = []
    for x, y in zip(d.test_x, d.test_y):
        full = np.append(x, y[-1])
        slots = full.reshape(-1, 2)
        is_noise = (slots >= real).all(axis=1)
        assert ((slots >= real).any(axis=1) == is_noise).all()  # noise comes in whole slots
        assert not is_noise.all() and not is_noise[-1]
        noise_frac.append(is_noise[:-1].mean())
        # targets at noise positions are ignored
        noise_pos = np.repeat(is_noise, 2)[1:]
        assert (y[noise_pos] == IGNORE).all()
    assert 0.25 < float(np.mean(noise_frac)) < 0.55  # frac_noise 0.4


def test_fuzzy_recall_layout():
    s = small("fuzzy-in-context-recall")
    d = generate(s, 0)
    V = s.vocab_size
    pad = V - 1
    assert d.test_x.shape[1] == s.seq_len
    assert d.train_x.min() >= 0 and d.train_x.max() <= pad
    # padding only on the left
    for x in d.train_x:
        nonpad = np.flatnonzero(x != pad)
        assert (x[nonpad[0] :] != pad).all()
    # train targets: next token, pads ignored
    nxt = d.train_x[:, 1:]
    tgt = d.train_y[:, :-1]
    assert ((tgt == nxt) | ((nxt == pad) & (tgt == IGNORE))).all()
    # test targets are value tokens only, and the last one is the probe's value
    vt = d.test_y[d.test_y != IGNORE]
    assert vt.min() >= (V - 1) // 2 and vt.max() < V - 1
    assert (d.test_y[:, -1] != IGNORE).all()
    # test keys have length 3: key tokens come in runs of exactly 3
    kmask = (d.test_x < (V - 1) // 2).astype(int)
    for row in kmask:
        runs = np.diff(np.flatnonzero(np.diff(np.r_[0, row, 0])))[::2]
        assert set(runs.tolist()) == {3}


def test_selective_copying_layout():
    s = small("selective-copying")
    d = generate(s, 0)
    V, L, n = s.vocab_size, s.seq_len, s.n_tokens_to_copy
    blank, marker = V - 2, V - 1
    for x, y in zip(d.train_x, d.train_y):
        assert len(x) == L
        assert x[L - n - 1] == marker and (x[L - n :] == blank).all()
        content = x[: L - n - 1][x[: L - n - 1] != blank]
        assert len(content) == n and content.max() < V - 2
        assert (y[: L - n] == IGNORE).all()
        assert (y[L - n :] == content).all()  # no shift: trailing blanks output the content


def test_compression_layout():
    s = small("compression")
    d = generate(s, 0)
    assert (d.train_x[:, -1] == s.vocab_size - 1).all()
    assert d.train_x[:, :-1].max() < s.vocab_size - 1
    assert (d.train_y == d.train_x).all() and (d.test_y == d.test_x).all()


def test_memorization_layout_and_global_map():
    s = small("memorization")
    d = generate(s, 0)
    V = s.vocab_size
    nk = (V - 1) // 2
    assert d.kv_map is not None and len(set(d.kv_map.tolist())) == nk  # one-to-one
    assert d.kv_map.min() >= nk and d.kv_map.max() < V - 1
    for x, y in ((d.train_x, d.train_y), (d.test_x, d.test_y)):
        assert (x[:, 1::2] == V - 1).all() and x[:, 0::2].max() < nk
        assert (y[:, 0::2] == IGNORE).all()
        assert (y[:, 1::2] == d.kv_map[x[:, 0::2]]).all()  # same map in train and test


def test_full_protocol_has_66_settings_and_lite_is_small():
    assert sum(len(full_settings(t)) for t in TASKS) == 66
    assert len(full_settings("noisy-in-context-recall")) == 14
    assert full_settings("memorization")[-1].vocab_size == 8192
    for t in TASKS:
        for s in LITE_SETTINGS[t]:
            s.check()
            assert s.seq_len <= 64 and s.num_train <= 2000


def test_overlap_check_warns():
    from archir.tasks.mad import MADOverlapWarning

    s = MADSetting("compression", 3, 3, 200, num_test=50)  # only 4 possible sequences
    with pytest.warns(MADOverlapWarning):
        d = generate(s, 0)
    assert d.overlap > 0.5


def test_macro_accuracy():
    t = torch.tensor([0, 0, 0, 1, IGNORE])
    p = torch.tensor([0, 0, 0, 0, 1])
    macro, micro = macro_accuracy(p, t)
    assert macro == pytest.approx(0.5) and micro == pytest.approx(0.75)


def test_get_task_and_errors():
    t = get_task("mad:in-context-recall", {"preset": "lite", "vocab_size": "32"})
    assert isinstance(t, MADTask) and t.setting.vocab_size == 32 and t.metric == "accuracy"
    assert t.direction == "maximize" and t.recommended_train["steps"] == 300
    with pytest.raises(TaskError, match="did you mean 'memorization'"):
        get_task("mad:memorisation")
    with pytest.raises(TaskError, match="unknown option 'vocab'"):
        get_task("mad:compression", {"vocab": 3})
    with pytest.raises(TaskError, match="unknown MAD preset"):
        get_task("mad:compression", {"preset": "huge"})
    with pytest.raises(TaskError, match="seq_len"):
        get_task("mad:selective-copying", {"seq_len": 10})


def test_check_model_vocab_and_length():
    t = MADTask(small("in-context-recall", vocab_size=32))
    with pytest.raises(TaskError, match="uses 32 tokens.*vocab_size is 16"):
        t.check_model(spec_from_dict(lm_spec(vocab=16)).model.model)
    with pytest.raises(TaskError, match="max_seq_len is 8"):
        t.check_model(spec_from_dict(lm_spec(vocab=32, L=8)).model.model)
    t.check_model(spec_from_dict(lm_spec(vocab=64)).model.model)


def test_adapt_spec_overrides_vocab_and_length():
    spec = spec_from_dict(lm_spec(vocab=256, L=8))
    s = small("selective-copying")
    a = adapt_spec(spec, s)
    assert a.model.model.vocab_size == 16 and a.model.model.max_seq_len == s.seq_len
    assert spec.model.model.vocab_size == 256  # original untouched


def test_compression_decoder_is_trained_and_shapes():
    from archir.compiler import compile as compile_spec
    from archir.spec.sections import TrainSection
    from archir.train import train

    s = small("compression")
    task = MADTask(s)
    spec = spec_from_dict(lm_spec(vocab=16, L=16))
    model = compile_spec(spec, seed=0)
    dec = task.extra_modules(model)
    assert dec is not None and task.extra_modules(model) is dec
    x, y = task.train_batch(4, 0, torch.Generator().manual_seed(0))
    assert task.logits(model, x).shape == (4, s.seq_len, 16)
    before = [p.detach().clone() for p in dec.parameters()]
    cfg = TrainSection(task=task.name, steps=3, batch_size=8, warmup_steps=0, eval_every=100)
    res = train(spec, task, cfg=cfg, model=model)
    assert res.status == "ok" and 0.0 <= res.metrics["accuracy"] <= 1.0
    assert any(not torch.equal(a, b) for a, b in zip(before, dec.parameters()))


def test_cli_lists_match_the_task_module():
    """``archir mad`` lists the presets and tasks itself (parsing imports no torch): they
    must be the task module's."""
    import archir.cli.mad as cli
    from archir.tasks import mad

    assert cli.TASKS == mad.TASKS
    assert set(cli.PRESETS) == set(mad.PRESETS)
