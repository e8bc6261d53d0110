"""Text tasks with a Hugging Face tokenizer (task option ``tokenizer``): token-id batches,
bits per byte counted over the bytes the predicted tokens cover, clear refusals.

Every tokenizer is trained here, in memory, on CPython's own reference text (nothing is
downloaded)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from archir.errors import TaskError
from archir.tasks import get_task
from archir.tasks.text import TextTask, pydoc_bytes

tokenizers = pytest.importorskip("tokenizers")

VOCAB = 400


def _train(kind: str, vocab: int, text: str):
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    if kind == "bytelevel":  # GPT-2 style
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
    elif kind == "whitespace":  # drops the spaces: they are covered by no token
        tok = Tokenizer(models.BPE(unk_token="[UNK]"))
        tok.pre_tokenizer = pre_tokenizers.Whitespace()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab, special_tokens=["[UNK]"], show_progress=False
        )
    else:  # "metaspace": Llama/SentencePiece style, with a normalizer that changes lengths
        tok = Tokenizer(models.BPE(unk_token="<unk>"))
        tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
        tok.pre_tokenizer = pre_tokenizers.Metaspace()
        tok.decoder = decoders.Metaspace()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab, special_tokens=["<unk>", "<s>"], show_progress=False
        )
    tok.train_from_iterator([text], trainer=trainer)
    return tok


@pytest.fixture(scope="module")
def pydoc_text() -> str:
    return pydoc_bytes().decode("utf-8")


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory, pydoc_text) -> Path:
    """A folder holding a byte-level BPE ``tokenizer.json`` of :data:`VOCAB` tokens."""
    d = tmp_path_factory.mktemp("tok")
    _train("bytelevel", VOCAB, pydoc_text[:150_000]).save(str(d / "tokenizer.json"))
    return d


@pytest.fixture(scope="module")
def ascii_file(tmp_path_factory, pydoc_text) -> Path:
    """120 kB of ASCII text (every token's bytes are then its own decoded text)."""
    p = tmp_path_factory.mktemp("txt") / "ascii.txt"
    p.write_bytes(pydoc_text.encode("ascii", "ignore")[:120_000])
    return p


def _spec_dict(vocab: int, L: int = 64, train: dict | None = None) -> dict:
    d: dict = {
        "archir": 1,
        "name": "tiny",
        "model": {
            "task": "causal_lm",
            "vocab_size": vocab,
            "d_model": 32,
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
    if train is not None:
        d["train"] = train
    return d


def _spec(vocab: int, L: int = 64, train: dict | None = None):
    from archir.spec import spec_from_dict

    return spec_from_dict(_spec_dict(vocab, L, train))


class _Uniform(torch.nn.Module):
    def forward(self, x):
        return torch.zeros(*x.shape, VOCAB)


class _Table(torch.nn.Module):
    """Logits fixed per input token: per-token losses known exactly."""

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.table = torch.nn.Parameter(torch.randn(VOCAB, VOCAB, generator=g))

    def forward(self, x):
        return self.table[x]


# -- batches ------------------------------------------------------------------------------------
def test_batches_are_token_ids_and_the_split_is_the_byte_split(tok_dir):
    from tokenizers import Tokenizer

    # the folder and the file itself name the same tokenizer
    task = get_task("text:pydoc", {"tokenizer": str(tok_dir)})
    same = get_task("text:pydoc", {"tokenizer": str(tok_dir / "tokenizer.json")})
    assert torch.equal(task.train_data, same.train_data)
    assert task.train_data.dtype == task.val_data.dtype == torch.int32
    x, y = task.train_batch(4, 32, torch.Generator().manual_seed(0))
    assert x.shape == y.shape == (4, 32) and x.dtype == y.dtype == torch.int64
    assert int(x.max()) < VOCAB and int(x.min()) >= 0 and torch.equal(x[:, 1:], y[:, :-1])
    (vx, vy), *_ = task.val_batches(3, 16, 2)
    assert vx.shape == vy.shape == (3, 16) and int(vy.max()) < VOCAB

    # each split is the byte-level task's split, encoded: decoding gives its bytes back,
    # and the bytes counted per token add up to them
    plain = get_task("text:pydoc")
    tok = Tokenizer.from_file(str(tok_dir / "tokenizer.json"))
    val_bytes = bytes(plain.val_data.numpy())
    assert tok.decode(task.val_data.tolist()).encode("utf-8") == val_bytes
    assert int(task.val_token_bytes.sum()) == len(val_bytes) == task.val_bytes
    assert task.train_bytes == len(plain.train_data)
    assert int(task.val_token_bytes.min()) >= 0

    d = task.describe()["tokenizer"]
    assert d["path"] == str(tok_dir / "tokenizer.json") and d["vocab_size"] == VOCAB
    assert d["val_tokens"] == len(task.val_data) and len(d["sha256"]) == 64
    assert 1.2 < d["bytes_per_token"] < 4  # a 400-token BPE on the text it was trained on
    assert "tokenizer" not in plain.describe()


@pytest.mark.parametrize("kind", ["bytelevel", "whitespace", "metaspace"])
def test_every_byte_is_counted_once(tmp_path, monkeypatch, pydoc_text, kind):
    """Non-ASCII text, dropped spaces, a normalizer that changes lengths, pieces without a
    token: the per-token bytes always add up to the split's bytes."""
    tok = _train(kind, 300, pydoc_text[:60_000] + " héllo wörld 你好 ﬁne ⅓ €")
    tok.save(str(tmp_path / "tokenizer.json"))
    lines = ["naïve café, 你好世界 — ﬁx ½ 🙂 résumé", "   ", "plain ascii line", "\t\t"]
    text = "\n".join(lines[i % 4] + f" {i}" for i in range(3000)) + "\n\n   \n"
    (tmp_path / "t.txt").write_text(text, encoding="utf-8")
    task = get_task(f"text:{tmp_path / 't.txt'}", {"tokenizer": str(tmp_path)})
    raw = text.encode()
    n_val = max(1, int(len(raw) * 0.1))
    assert raw[len(raw) - n_val] & 0xC0 == 0x80  # the byte split falls inside a character:
    assert 0 < n_val - task.val_bytes <= 3  # the cut moves to the next one
    assert int(task.val_token_bytes.sum()) == task.val_bytes
    assert task.train_bytes + task.val_bytes == len(raw)
    assert len(task.val_token_bytes) == len(task.val_data) and int(task.val_token_bytes.min()) >= 0
    # the same sum over a text cut into several pieces (tiny pieces, to cover the cuts)
    import archir.tasks.text as text_mod

    tk = text_mod.load_tokenizer(str(tmp_path))
    data = torch.frombuffer(bytearray(raw), dtype=torch.uint8)
    whole, _ = tk.encode(data, count_bytes=False)
    monkeypatch.setattr(text_mod, "_CHUNK", 97)  # many pieces, several encode_batch groups
    ids, nbytes = tk.encode(data)
    assert int(nbytes.sum()) == len(data) and len(ids) == len(nbytes)
    # the cuts change a few tokens near them (e.g. one more word start), not the text
    assert abs(len(ids) - len(whole)) <= 3 * (len(raw) // 97 + 1)


def test_long_lines_are_cut_at_character_boundaries():
    import numpy as np

    from archir.tasks.text import _text_pieces

    raw = ("é你🙂a" * 50).encode() + b"\n" + ("x" * 30).encode()
    pieces = list(_text_pieces(np.frombuffer(raw, dtype=np.uint8), size=16))
    assert b"".join(pieces) == raw and all(len(p) <= 16 for p in pieces)
    for p in pieces:
        p.decode("utf-8")  # no piece splits a character


# -- the metric ---------------------------------------------------------------------------------
def test_uniform_logits_give_log2_vocab_times_tokens_over_bytes(tok_dir, ascii_file):
    from tokenizers import Tokenizer

    task = get_task(f"text:{ascii_file}", {"tokenizer": str(tok_dir)})
    tok = Tokenizer.from_file(str(tok_dir / "tokenizer.json"))
    # bytes of each token, independently of the task: what it decodes to (ASCII text)
    tb = [len(tok.decode([i]).encode("utf-8")) for i in range(VOCAB)]
    seq = 24
    tokens = nbytes = 0
    for _, y in task.val_batches(8, seq, 3):
        tokens += y.numel()
        nbytes += sum(tb[i] for i in y.reshape(-1).tolist())  # the predicted tokens only
    got = task.evaluate(_Uniform(), 8, seq, 3)
    want = math.log(VOCAB) / math.log(2) * tokens / nbytes
    # exact but for the float32 cross-entropy (ln 400 to 1e-7)
    assert got["val_bpb"] == pytest.approx(want, rel=1e-6)
    assert got["val_loss"] == pytest.approx(math.log(VOCAB), rel=1e-6)  # nats per token
    assert got["val_tokens"] == tokens == 8 * 3 * seq and got["val_bytes"] == nbytes
    assert got["val_windows"] == 24


def test_bpb_is_nats_over_ln2_over_bytes(tok_dir, ascii_file):
    from tokenizers import Tokenizer

    task = get_task(f"text:{ascii_file}", {"tokenizer": str(tok_dir)})
    tok = Tokenizer.from_file(str(tok_dir / "tokenizer.json"))
    tb = [len(tok.decode([i]).encode("utf-8")) for i in range(VOCAB)]
    model = _Table()
    with torch.no_grad():
        got = task.evaluate(model, 5, 20, 4)
        nats, nbytes = [], []
        for x, y in task.val_batches(5, 20, 4):
            nll = torch.nn.functional.cross_entropy(
                model(x).reshape(-1, VOCAB), y.reshape(-1), reduction="none"
            ).reshape(y.shape)
            nats += nll.double().sum(1).tolist()
            nbytes += [sum(tb[i] for i in row) for row in y.tolist()]
    n = len(nats)
    total_nats, total_bytes = sum(nats), sum(nbytes)
    assert got["val_bpb"] == pytest.approx(total_nats / math.log(2) / total_bytes, rel=1e-12)
    assert got["val_loss"] == pytest.approx(total_nats / (n * 20), rel=1e-12)
    r = total_nats / total_bytes
    var = sum((a - r * b) ** 2 for a, b in zip(nats, nbytes)) / (n * (n - 1))
    want_se = math.sqrt(var) / (total_bytes / n) / math.log(2)
    assert got["val_bpb_se"] == pytest.approx(want_se, rel=1e-9)
    # all of the split when asked for more than it holds
    whole = task.evaluate(model, 64, 20, 10**6)
    assert whole["val_windows"] == (len(task.val_data) - 1) // 20


def test_byte_level_numbers_are_unchanged_without_a_tokenizer():
    t = get_task("text:pydoc")
    assert t.tokenizer is None and t.val_token_bytes is None and t.train_data.dtype == torch.uint8
    assert isinstance(t, TextTask) and set(t.describe()) == {
        "name",
        "metric",
        "direction",
        "model_task",
    }


# -- refusals -----------------------------------------------------------------------------------
def test_a_vocabulary_larger_than_the_model_is_refused(tok_dir, tmp_path, pydoc_text):
    task = get_task("text:pydoc", {"tokenizer": str(tok_dir)})
    with pytest.raises(TaskError, match=rf"{VOCAB} tokens.*model.vocab_size 256") as err:
        task.check_model(_spec(256).model.model)
    assert err.value.hint and str(VOCAB) in err.value.hint
    task.check_model(_spec(VOCAB).model.model)
    # a tokenizer smaller than 256 needs no byte-level vocabulary
    small = _train("whitespace", 120, pydoc_text[:30_000])
    small.save(str(tmp_path / "tokenizer.json"))
    st = get_task("text:pydoc", {"tokenizer": str(tmp_path)})
    assert st.tokenizer is not None and st.tokenizer.vocab_size <= 128
    st.check_model(_spec(128).model.model)


def test_bad_paths_and_files_are_task_errors(tmp_path, monkeypatch):
    import os
    import signal

    def load(path):
        return get_task("text:pydoc", {"tokenizer": str(path)})

    with pytest.raises(TaskError, match="does not exist"):
        load(tmp_path / "nope.json")
    with pytest.raises(TaskError, match="holds no tokenizer.json"):
        load(tmp_path)
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "tokenizer.json").mkdir()
    with pytest.raises(TaskError, match="is a folder"):
        load(tmp_path / "sub")
    bad = tmp_path / "corrupt.json"
    bad.write_text('{"version": "1.0", "model": {"type": "BPE", "vocab"')
    with pytest.raises(TaskError, match="not a valid tokenizer.json") as err:
        load(bad)
    assert err.value.hint
    bad.write_text('{"hello": "world"}')
    with pytest.raises(TaskError, match="not a valid tokenizer.json"):
        load(bad)
    bad.write_bytes(b"\xff\xfe{}")
    with pytest.raises(TaskError, match="not UTF-8"):
        load(bad)
    os.mkfifo(tmp_path / "pipe")
    signal.alarm(20)  # opening a fifo to read would block: fail instead of hanging
    try:
        with pytest.raises(TaskError, match="not a regular file"):
            load(tmp_path / "pipe")
    finally:
        signal.alarm(0)
    import archir.tasks.text as text_mod

    big = tmp_path / "big.json"
    big.write_text("{}" * 600)
    monkeypatch.setattr(text_mod, "MAX_TOKENIZER_BYTES", 1000)
    with pytest.raises(TaskError, match="1,200 bytes, over the limit of 1,000"):
        load(big)
    for wrong in (3, "", True):
        with pytest.raises(TaskError, match="tokenizer must be a path"):
            get_task("text:pydoc", {"tokenizer": wrong})


def test_missing_tokenizers_package_is_a_clear_error(monkeypatch, tok_dir):
    import sys

    monkeypatch.setitem(sys.modules, "tokenizers", None)  # import tokenizers -> ImportError
    with pytest.raises(TaskError, match="needs the 'tokenizers' package") as err:
        get_task("text:pydoc", {"tokenizer": str(tok_dir)})
    assert "archir[hf]" in (err.value.hint or "")
    get_task("text:pydoc")  # byte-level needs no tokenizers


def test_cli_refuses_a_bad_tokenizer_with_exit_code_2(tmp_path, capsys):
    import yaml

    from archir.cli import main

    options = {"tokenizer": str(tmp_path / "missing")}
    spec = _spec_dict(VOCAB, train={"task": "text:pydoc", "steps": 1, "task_options": options})
    p = tmp_path / "tiny.yaml"
    p.write_text(yaml.safe_dump(spec))
    rc = main(["train", str(p), "--no-progress"])
    assert rc == 2
    assert "does not exist" in capsys.readouterr().err


# -- end to end ---------------------------------------------------------------------------------
def test_training_with_a_tokenizer_reports_bits_per_byte(tok_dir, ascii_file):
    from archir.train import train

    cfg = {
        "task": f"text:{ascii_file}",
        "task_options": {"tokenizer": str(tok_dir)},
        "steps": 6,
        "batch_size": 4,
        "seq_len": 32,
        "warmup_steps": 2,
        "eval_every": 3,
        "eval_batches": 2,
        "lr": 3e-3,
    }
    spec = _spec(512, L=32, train=cfg)  # a model vocabulary above the tokenizer's is fine
    res = train(spec)
    m = res.metrics
    assert m["status"] == "ok" and m["metric"] == "val_bpb" and m["steps"] == 6
    assert math.isfinite(m["val_bpb"]) and 0 < m["val_bpb"] < 20
    assert m["val_tokens"] == 4 * 2 * 32 and m["val_bytes"] > m["val_tokens"]
    # bits per byte = nats per token / ln 2 / bytes per token
    want = m["val_loss"] / math.log(2) * m["val_tokens"] / m["val_bytes"]
    assert m["val_bpb"] == pytest.approx(want, rel=1e-9)
