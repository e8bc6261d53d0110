"""Hybridizing an imported model: ``train.init`` inherits the weights that still fit
(copied, sliced or padded), replaced mixers start fresh, and a search starts every
candidate from the imported checkpoint (issue 15, part 4)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from archir.errors import SearchError, TrainingError
from archir.inherit import inherit, read_init, resolve_init
from archir.spec import load_spec, spec_from_dict
from archir.tasks.base import get_task
from archir.train import Trainer, train


def _imported(tmp_path: Path) -> tuple[Path, dict]:
    """A byte-level Llama-shaped archir model with 'trained' (perturbed) weights, as
    ``archir import hf`` leaves it: spec.yaml + model.safetensors."""
    from archir.compiler import compile

    data = {
        "archir": 1,
        "name": "llama-tiny",
        "model": {
            "vocab_size": 256,
            "d_model": 32,
            "max_seq_len": 256,
            "norm_eps": 1e-6,
            "embed": {"kind": "token_embedding"},
            "layers": [
                {
                    "repeat": 2,
                    "blocks": [
                        {"kind": "attention", "n_heads": 4, "n_kv_heads": 2},
                        {"kind": "swiglu", "d_ff": 48},
                    ],
                }
            ],
            "head": {"kind": "lm_head"},
        },
    }
    model = compile(spec_from_dict(data), seed=3)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    out = tmp_path / "imported"
    out.mkdir()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, out / "model.safetensors")
    (out / "spec.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
    return out, data


def _hybrid(data: dict, mixer0: dict, d_ff1: int, init: str, steps: int = 2) -> dict:
    m = dict(data["model"])
    attn = {"kind": "attention", "n_heads": 4, "n_kv_heads": 2}
    m["layers"] = [
        {"blocks": [mixer0, {"kind": "swiglu", "d_ff": 48}]},
        {"blocks": [attn, {"kind": "swiglu", "d_ff": d_ff1}]},
    ]
    return {
        "archir": 1,
        "name": "hybrid",
        "model": m,
        "train": {
            "task": "text:pydoc",
            "steps": steps,
            "batch_size": 2,
            "seq_len": 32,
            "eval_batches": 1,
            "init": init,
        },
    }


def test_kept_layers_keep_weights_replaced_start_fresh_narrower_are_sliced(tmp_path):
    imp, data = _imported(tmp_path)
    src = load_file(str(imp / "model.safetensors"))
    spec_p = tmp_path / "hybrid.yaml"
    hy = _hybrid(data, {"kind": "mamba", "d_state": 8}, 32, "imported/model.safetensors")
    spec_p.write_text(yaml.safe_dump(hy, sort_keys=False))
    spec = load_spec(spec_p)
    tr = Trainer(spec, get_task("text:pydoc"), spec.model.train)
    own = tr.model.state_dict()
    # embedding, head, final norm, the kept attention layer and the kept MLP: copied
    for k in ("embed.weight", "head.weight", "final_norm.weight", "blocks.2.fn.q.weight"):
        assert torch.equal(own[k], src[k]), k
    assert torch.equal(own["blocks.1.fn.w_up.weight"], src["blocks.1.fn.w_up.weight"])
    # the narrower MLP (d_ff 48 -> 32): the leading rows / columns
    assert torch.equal(own["blocks.3.fn.w_up.weight"], src["blocks.3.fn.w_up.weight"][:32])
    assert torch.equal(own["blocks.3.fn.w_down.weight"], src["blocks.3.fn.w_down.weight"][:, :32])
    # the mamba that replaced attention is fresh; attention's old q/k/v/o are unused
    rep = tr.init_report
    assert rep is not None
    assert "blocks.0.fn.in_proj.weight" in rep.fresh_names
    assert rep.resized == 3 and rep.ignored == 4
    assert 0 < rep.params_inherited < rep.params_total
    # the norm in front of the replaced mixer is kept (same name, same shape)
    assert torch.equal(own["blocks.0.norm.weight"], src["blocks.0.norm.weight"])


def test_wider_tensors_are_padded_with_fresh_values():
    src = {"w": torch.ones(2, 3)}
    m = torch.nn.Module()
    m.w = torch.nn.Parameter(torch.zeros(4, 3))
    rep = inherit(m, src)
    assert torch.equal(m.w[:2], torch.ones(2, 3)) and torch.equal(m.w[2:], torch.zeros(2, 3))
    assert rep.resized == 1 and rep.params_inherited == 6 and rep.params_total == 12


def test_init_is_read_relative_to_the_spec_file_from_any_folder(tmp_path, monkeypatch):
    imp, data = _imported(tmp_path)
    spec_p = tmp_path / "hybrid.yaml"
    hy = _hybrid(
        data, {"kind": "attention", "n_heads": 4, "n_kv_heads": 2}, 48, "imported/model.safetensors"
    )
    spec_p.write_text(yaml.safe_dump(hy, sort_keys=False))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    res = train(load_spec(spec_p))
    init = res.metrics["init"]
    assert init["file"] == str((imp / "model.safetensors").resolve())
    assert (
        init["fresh"] == 0
        and init["resized"] == 0
        and init["params_inherited"] == init["params_total"]
    )
    assert resolve_init("/abs/x.safetensors", str(spec_p)) == Path("/abs/x.safetensors")


def test_bad_init_files_are_refused(tmp_path):
    with pytest.raises(TrainingError, match="No such file"):
        read_init(tmp_path / "missing.safetensors")
    with pytest.raises(TrainingError, match="not a regular file"):
        read_init(tmp_path)
    pkl = tmp_path / "model.bin"
    torch.save({"w": torch.ones(2)}, pkl)  # a pickle: never read as init
    with pytest.raises(TrainingError, match="not a readable safetensors"):
        read_init(pkl)


def test_a_search_starts_every_candidate_from_the_imported_weights(tmp_path):
    from searchers.run import run_search

    imp, data = _imported(tmp_path)
    hy = _hybrid(
        data,
        {
            "choice": [
                {"kind": "attention", "n_heads": 4, "n_kv_heads": 2},
                {"kind": "gla", "n_heads": 2},
            ]
        },
        48,
        "imported/model.safetensors",
    )
    hy["search"] = {
        "objectives": {"val_bpb": "minimize", "params": "minimize"},
        "budget": {"trials": 2},
        "sampler": "random",
        "fidelity": "full",
    }
    spec_p = tmp_path / "hybrid.yaml"
    spec_p.write_text(yaml.safe_dump(hy, sort_keys=False))
    res = run_search(spec_p, out=tmp_path / "run", export=False, say=lambda s: None)
    assert res.front
    inits = []
    for mfile in sorted((tmp_path / "run" / "trials").glob("*/metrics.json")):
        m = json.loads(mfile.read_text())
        assert m["status"] == "ok", m.get("reason")
        inits.append(m["train"].get("init"))
    assert inits and all(i is not None and i["copied"] > 0 for i in inits)
    # the run records the absolute path: a worker or a resumed run reads the same file
    assert all(Path(i["file"]).is_absolute() for i in inits)


def test_a_search_with_a_missing_init_is_refused_before_anything_is_written(tmp_path):
    from searchers.run import run_search

    _, data = _imported(tmp_path)
    hy = _hybrid(
        data,
        {"choice": [{"kind": "attention", "n_heads": 4}, {"kind": "gla", "n_heads": 2}]},
        48,
        "nowhere/model.safetensors",
    )
    hy["search"] = {"objectives": {"val_bpb": "minimize"}, "budget": {"trials": 1}}
    spec_p = tmp_path / "hybrid.yaml"
    spec_p.write_text(yaml.safe_dump(hy, sort_keys=False))
    with pytest.raises(SearchError, match="train.init 'nowhere/model.safetensors' is not a file"):
        run_search(spec_p, out=tmp_path / "run", say=lambda s: None)
    assert not (tmp_path / "run").exists()


def test_an_imported_model_with_its_own_tokenizer_trains_on_text_through_it(tmp_path):
    transformers = pytest.importorskip("transformers")
    tokenizers = pytest.importorskip("tokenizers")
    from pydoc_data.topics import topics

    from archir.interop import import_hf

    tok = tokenizers.Tokenizer(tokenizers.models.BPE(unk_token="[UNK]"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = tokenizers.trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["[UNK]"],
        initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator([topics[k] for k in sorted(topics)[:40]], trainer)
    n = tok.get_vocab_size()
    cfg = transformers.LlamaConfig(
        vocab_size=n,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=1,
        num_attention_heads=4,
        max_position_embeddings=128,
    )
    src = tmp_path / "src"
    transformers.LlamaForCausalLM(cfg).save_pretrained(src)
    tok.save(str(src / "tokenizer.json"))
    import_hf(src, tmp_path / "out")
    spec = load_spec(tmp_path / "out" / "spec.yaml")
    opt = spec.model.train.task_options["tokenizer"]
    assert Path(str(opt)) == (tmp_path / "out" / "tokenizer.json").resolve()
    cfg_t = spec.model.train.model_copy(
        update={"steps": 2, "batch_size": 2, "seq_len": 32, "eval_batches": 1}
    )
    res = train(spec, cfg=cfg_t)
    assert res.metrics["status"] == "ok" and 0 < res.metrics["val_bpb"] < 20
    # the imported spec trains on from the imported weights (train.init: model.safetensors)
    init = res.metrics["init"]
    assert init["fresh"] == 0 and init["params_inherited"] == init["params_total"]
    assert init["file"] == str((tmp_path / "out" / "model.safetensors").resolve())
