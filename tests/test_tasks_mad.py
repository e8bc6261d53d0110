"""MAD generators: layouts, token ranges, ignore positions, determinism, settings, errors;
the metric, selective-copy placement, fuzzy motifs and the compression decoder as the
reference (athms/mad-lab) defines them."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from archir.errors import TaskError
from archir.spec import spec_from_dict
from archir.tasks import get_task
from archir.tasks.mad import (
    DATA_VERSION,
    IGNORE,
    LITE_SETTINGS,
    TASKS,
    CompressionDecoder,
    MADReport,
    MADSetting,
    MADTask,
    adapt_spec,
    decoder_positions,
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
    # train targets: the next token everywhere, pads too (as the reference)
    assert (d.train_y[:, :-1] == d.train_x[:, 1:]).all() and (d.train_y != IGNORE).all()
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


# ------------------------------------------------ the reference's metric and generators


def test_macro_accuracy_counts_predicted_classes_that_are_never_targets():
    # vocab 16 recall: targets are the 8 value tokens [8, 16), 10 positions each; 7 of every
    # 10 answered right, the 3 wrong answers name key tokens [0, 8) (every key named)
    target = torch.arange(8, 16).repeat_interleave(10)
    pred = target.clone()
    wrong = torch.tensor([i % 10 >= 7 for i in range(80)])
    pred[wrong] = torch.arange(int(wrong.sum())) % 8
    macro, micro = macro_accuracy(pred, target)
    assert micro == pytest.approx(0.70)
    # the reference averages over the 16 classes targeted or predicted: 8 x 0.7 / 16
    assert macro == pytest.approx(0.35)  # a target-classes-only average would give 0.70
    # the same mistakes among the value tokens themselves: no extra class, 0.70
    pred2 = target.clone()
    pred2[wrong] = 8 + (target[wrong] - 8 + 1) % 8
    assert macro_accuracy(pred2, target)[0] == pytest.approx(0.70)
    # predictions at ignored positions count for nothing
    ignored_t = torch.cat([target, torch.full((5,), IGNORE)])
    ignored_p = torch.cat([pred2, torch.full((5,), 3)])
    assert macro_accuracy(ignored_p, ignored_t)[0] == pytest.approx(0.70)


def test_macro_accuracy_equals_torchmetrics_multiclass_accuracy():
    # torchmetrics 1.9.0 MulticlassAccuracy(num_classes=16, ignore_index=-100) (the MAD
    # reference's metric, default average="macro") gives 0.3538235 on these [6, 50] arrays
    rng = np.random.Generator(np.random.PCG64(7))
    t = rng.integers(4, 12, size=(6, 50))
    t[rng.random((6, 50)) < 0.3] = IGNORE
    p = rng.integers(0, 14, size=(6, 50))
    keep = rng.random((6, 50)) < 0.5
    p[keep] = np.where(t[keep] >= 0, t[keep], p[keep])
    macro, micro = macro_accuracy(torch.from_numpy(p), torch.from_numpy(t))
    assert macro == pytest.approx(0.3538235, abs=1e-6)
    assert micro == pytest.approx(float((p == t)[t != IGNORE].mean()))
    assert macro_accuracy(torch.tensor([1, 2]), torch.tensor([IGNORE, IGNORE])) == (0.0, 0.0)
    with pytest.raises(ValueError, match="differ"):
        macro_accuracy(torch.tensor([1, 2]), torch.tensor([1]))


def test_selective_copying_blanks_go_before_content_tokens():
    # the reference inserts every blank before a uniformly chosen content token: the last
    # content token always sits right before the marker; the blanks before each content
    # token are multinomial(L - 2n - 1, 1/n): std sqrt(223 * 15/16 / 16) = 3.6 at the
    # baseline (uniform placement, archir's DATA_VERSION 1, gave 12.8 and a blank tail)
    s = MADSetting("selective-copying", 16, 256, 1, num_test=200, n_tokens_to_copy=16)
    d = generate(s, 0)
    V, L, n = s.vocab_size, s.seq_len, s.n_tokens_to_copy
    blank, marker = V - 2, V - 1
    gaps = []
    for x, y in zip(d.test_x, d.test_y):
        m = L - n - 1
        assert x[m] == marker
        pos = np.flatnonzero(x[:m] != blank)
        assert len(pos) == n and pos[-1] == m - 1
        assert (x[pos] == y[m + 1 :]).all()
        gaps.append(np.diff(np.r_[-1, pos]) - 1)
    g = np.concatenate(gaps)
    assert g.mean() == pytest.approx((L - 2 * n - 1) / n)
    assert 3.1 < g.std() < 4.1


@pytest.mark.parametrize("train", [True, False])
def test_fuzzy_recall_motifs_never_repeat_a_token_and_probe_shown_before(train):
    # keys and values are ordered tuples without a repeated token (the reference draws
    # them from permutations); DATA_VERSION 1 repeated a value token in 15% of values
    s = MADSetting("fuzzy-in-context-recall", 16, 128, 150, num_test=150)
    d = generate(s, 0)
    V = s.vocab_size
    nk, pad = (V - 1) // 2, V - 1
    xs, ys = (d.train_x, d.train_y) if train else (d.test_x, d.test_y)
    n_values = 0
    for x, y in zip(xs, ys):
        full = np.append(x, y[-1])  # the last target (train or test) is the last token
        body = full[full != pad].tolist()
        # split into (key, value) runs: key tokens < nk, value tokens >= nk
        pairs, i = [], 0
        while i < len(body):
            j = i
            while j < len(body) and body[j] < nk:
                j += 1
            k = j
            while k < len(body) and body[k] >= nk:
                k += 1
            pairs.append((tuple(body[i:j]), tuple(body[j:k])))
            i = k
        kv: dict[tuple[int, ...], tuple[int, ...]] = {}
        for key, val in pairs:
            assert 1 <= len(key) <= 3 and 1 <= len(val) <= 3
            assert len(set(key)) == len(key) and len(set(val)) == len(val)
            assert kv.setdefault(key, val) == val  # one value per key within a sequence
            assert train or len(key) == 3
            n_values += 1
        probe = pairs[-1][0]
        assert probe in [k for k, _ in pairs[:-1]]  # the final query was shown before
    assert n_values > 1000


def test_compression_decoder_is_non_expanding_like_the_reference():
    d = 12
    dec = CompressionDecoder(d)
    linears = [m for m in dec.modules() if isinstance(m, torch.nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(d, d), (d, d)]
    # two d x d layers with biases and three RMSNorm gains (DATA_VERSION 1: 2d hidden)
    assert sum(p.numel() for p in dec.parameters()) == 2 * (d * d + d) + 3 * d
    assert dec(torch.randn(3, d), 5).shape == (3, 5, d)
    # the reference's sinusoid: frequencies 10000^(-i / (d/2 - 1)), sin then cos
    pos = decoder_positions(7, d)
    half = d // 2
    t = torch.arange(7, dtype=torch.float32)
    assert torch.allclose(pos[:, half - 1], torch.sin(t * 1e-4))
    assert torch.allclose(pos[:, half], torch.cos(t))
    assert decoder_positions(3, 5)[:, -1].abs().sum() == 0  # odd width: a zero column


def test_data_version_is_recorded():
    assert DATA_VERSION >= 2
    assert MADReport("x", "lite").to_dict()["data_version"] == DATA_VERSION
    assert MADTask(small("compression")).describe()["data_version"] == DATA_VERSION
