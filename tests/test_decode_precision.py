"""The decode graph at the precision that ships (issue 14): ``export_decode(...,
precision="auto")`` quantizes the decode step per IR block by the full-sequence export's
quantizers (int8 MatMulInteger for 8-bit blocks, int4 MatMulNBits for 4-bit ones), after
the fp32 decode graph passed the token-by-token parity gate; the written graph's deviation
from PyTorch is reported; ``archir export --decode --precision`` takes the precisions a
decode graph supports and refuses the rest with exit 2; decode costs are timed on that
graph.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from typing import Any

import numpy as np
import onnx
import pytest
import torch

from archir.errors import ExportError
from archir.spec import spec_from_dict

VOCAB, D, MAX_LEN = 256, 32, 48
ATTN, MLP = "layers.0.blocks.0", "layers.0.blocks.1"


def spec_data(steps: int = 25) -> dict[str, Any]:
    """A 1-layer causal LM: 8-bit attention (its step's Linears are Gemms on ``[batch, d]``)
    and a 4-bit MLP; embedding and head at 16 bits."""
    return {
        "archir": 1,
        "name": "decode-bits",
        "model": {
            "task": "causal_lm",
            "vocab_size": VOCAB,
            "d_model": D,
            "max_seq_len": MAX_LEN,
            "embed": {"kind": "token_embedding"},
            "layers": [
                {
                    "blocks": [
                        {"kind": "attention", "n_heads": 4, "bits": 8},
                        {"kind": "mlp", "expansion": 2, "bits": 4},
                    ]
                }
            ],
            "head": {"kind": "lm_head"},
        },
        "train": {
            "task": "text:pydoc",
            "steps": steps,
            "batch_size": 8,
            "seq_len": MAX_LEN,
            "lr": 3e-3,
            "warmup_steps": 4,
            "eval_batches": 1,
        },
    }


def ops_by_block(proto: onnx.ModelProto) -> dict[str | None, Counter[str]]:
    from exporters.quantize import node_block

    out: dict[str | None, Counter[str]] = {}
    for n in proto.graph.node:
        out.setdefault(node_block(n), Counter())[n.op_type] += 1
    return out


def float_weight_products(proto: onnx.ModelProto, block: str) -> list[str]:
    """MatMul/Gemm nodes of ``block`` that still multiply by a float initializer."""
    from exporters.quantize import weight_nodes

    return [n.name for n, b in weight_nodes(proto, ("MatMul", "Gemm")) if b == block]


@pytest.fixture(scope="module")
def trained() -> tuple[Any, Any]:
    from archir.train import train

    spec = spec_from_dict(spec_data())
    return spec, train(spec).model.eval()


def test_decode_graph_ships_at_the_searched_bits(trained: Any, tmp_path: Any) -> None:
    """A trained model's decode graph at ``auto``: block precisions and op types follow the
    bits, the fp32 twin passed the gate, the deviation is reported (finite, small, not
    zero), and a plain onnxruntime loop driven by the metadata generates."""
    import onnxruntime as ort

    from exporters.decode import export_decode, ort_generate_loop, read_decode_metadata

    spec, model = trained
    path = tmp_path / "decode.onnx"
    rep = export_decode(spec, path, model=model, precision="auto")
    # the gate ran on the fp32 graph, on real text
    assert rep.parity is not None and rep.parity.gated and rep.parity.passed
    assert rep.parity.source == "task:text:pydoc"
    assert rep.block_precision == {
        "embed": "fp32",
        ATTN: "int8",
        MLP: "int4",
        "final_norm": "fp32",
        "head": "fp32",
    }
    proto = onnx.load(str(path))
    meta = {p.key: p.value for p in proto.metadata_props}
    assert meta["archir.precision"] == "auto"
    assert json.loads(meta["archir.block_precision"]) == rep.block_precision
    ops = ops_by_block(proto)
    assert ops[ATTN]["MatMulInteger"] == 4 and not float_weight_products(proto, ATTN)
    assert ops[MLP]["MatMulNBits"] == 2 and not float_weight_products(proto, MLP)
    assert "DynamicQuantizeLinear" in {n.op_type for n in proto.graph.node}
    assert float_weight_products(proto, "head")  # 16 bits: fp32
    assert rep.file_bytes < rep.fp32_bytes
    # reported, not gated: a real deviation, finite and small on a trained model
    q = rep.quantized_parity
    assert q is not None and not q.gated
    assert 0 < q.max_abs_err < 0.25 * q.scale and math.isfinite(q.max_abs_err)
    assert rep.top1_agreement is not None and rep.top1_agreement >= 0.8
    assert "int4 x1, int8 x1" in str(rep) and "not gated" in str(rep)
    # a plain onnxruntime loop with the file's metadata generates
    meta_dec = read_decode_metadata(path)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    prompt = list(b"def main(")
    got = list(ort_generate_loop(sess, meta_dec, prompt, 12, lambda v: int(np.argmax(v))))
    assert len(got) == 12 and all(0 <= t < VOCAB for t in got)


def test_cli_exports_a_decode_graph_at_a_precision(tmp_path: Any, capfd: Any) -> None:
    """``archir export --decode --precision int4`` (TorchScript exporter: its node names,
    not torch.export's scopes, carry the blocks here)."""
    import yaml

    from archir.cli import main

    f = tmp_path / "m.yaml"
    f.write_text(yaml.safe_dump(spec_data(), sort_keys=False))
    out = tmp_path / "step.onnx"
    argv = ["export", str(f), "--decode", "--precision", "int4", "--random-weights"]
    rc = main(argv + ["--task", "random", "--exporter", "legacy", "--out", str(out), "--json"])
    stdout, err = capfd.readouterr()
    assert rc == 0, err
    rep = json.loads(stdout)
    assert rep["precision"] == "int4" and rep["parity"]["passed"]
    proto = onnx.load(str(out))
    assert {p.key: p.value for p in proto.metadata_props}["archir.precision"] == "int4"
    for block in (ATTN, MLP, "head"):
        assert rep["block_precision"][block] == "int4"
        assert not float_weight_products(proto, block), block
    ops = ops_by_block(proto)
    assert ops[ATTN]["MatMulNBits"] == 4 and ops["head"]["MatMulNBits"] == 1
    assert "archir.decode" in {p.key for p in proto.metadata_props}


@pytest.mark.parametrize("precision", ["int8-static"])
def test_an_unsupported_decode_precision_is_refused(
    tmp_path: Any, capfd: Any, precision: str
) -> None:
    import yaml

    from archir.cli import main
    from exporters.decode import export_decode, measure_decode

    f = tmp_path / "m.yaml"
    f.write_text(yaml.safe_dump(spec_data(), sort_keys=False))
    out = tmp_path / "x.onnx"
    rc = main(["export", str(f), "--decode", "--precision", precision, "--out", str(out)])
    err = capfd.readouterr().err
    assert rc == 2 and f"--precision {precision} does not apply to --decode" in err
    assert "Traceback" not in err and not out.exists()
    spec = spec_from_dict(spec_data())
    for call in (
        lambda: export_decode(spec, out, precision=precision),
        lambda: measure_decode(spec, precision=precision),
    ):
        with pytest.raises(ExportError, match=f"not exported at precision '{precision}'"):
            call()
    assert not out.exists()


def test_gemm_with_a_weight_becomes_a_tagged_matmul() -> None:
    """One token's Linear exports as ``Gemm(x, W, b, transB=1)``: rewritten as
    ``MatMul(x, Wᵀ) + b`` with the same numbers, name and block tag."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from exporters.quantize import BLOCK_KEY, gemm_to_matmul, node_block

    rng = np.random.default_rng(0)
    w1, b1 = rng.standard_normal((6, 4)).astype(np.float32), rng.standard_normal(6)
    w2 = rng.standard_normal((6, 3)).astype(np.float32)
    g1 = helper.make_node("Gemm", ["x", "w1", "b1"], ["h"], name="lin1", transB=1)
    g2 = helper.make_node("Gemm", ["h", "w2"], ["y"], name="lin2")
    keep = helper.make_node("Gemm", ["x", "w1"], ["z"], name="scaled", transB=1, alpha=2.0)
    for n in (g1, g2, keep):
        n.metadata_props.add(key=BLOCK_KEY, value="blk")
    graph = helper.make_graph(
        [g1, g2, keep],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
        [
            helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 3]),
            helper.make_tensor_value_info("z", TensorProto.FLOAT, ["batch", 6]),
        ],
        [
            numpy_helper.from_array(w1, "w1"),
            numpy_helper.from_array(b1.astype(np.float32), "b1"),
            numpy_helper.from_array(w2, "w2"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)])
    x = rng.standard_normal((5, 4)).astype(np.float32)

    def run(m: onnx.ModelProto) -> list[np.ndarray]:
        s = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
        return list(s.run(None, {"x": x}))

    before = run(model)
    assert gemm_to_matmul(model) == 2
    ops = [(n.op_type, n.name, node_block(n)) for n in model.graph.node]
    assert ops == [
        ("MatMul", "lin1", "blk"),
        ("Add", "lin1_bias", "blk"),
        ("MatMul", "lin2", "blk"),
        ("Gemm", "scaled", "blk"),  # alpha 2: left alone
    ]
    assert {i.name for i in model.graph.initializer} == {"w1", "w1.T", "b1", "w2"}
    for a, b in zip(before, run(model)):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)


def test_run_log_line_names_the_decode_precisions() -> None:
    from searchers.pareto import describe_decode_export

    rep = {
        "block_precision": {"embed": "fp32", ATTN: "int8", MLP: "int4"},
        "quantized_parity": {"max_abs_err": 0.0123},
        "top1_agreement": 0.96,
    }
    line = describe_decode_export(rep)
    assert line == "fp32 x1, int4 x1, int8 x1; max |logit error| 0.0123, top-1 agreement 0.960"
    fp32 = {"block_precision": {"embed": "fp32"}, "quantized_parity": {"max_abs_err": 0.0}}
    assert describe_decode_export(fp32) == "fp32 x1"


@pytest.mark.heavy
def test_decode_cost_is_timed_on_the_graph_at_its_bits(trained: Any, tmp_path: Any) -> None:
    """``measure_decode`` (what a ``runtime: ort`` search records) times the decode graph
    at the model's bits by default; ``best/decode.onnx`` is written at them too."""
    from exporters.decode import measure_decode, read_decode_metadata
    from searchers.pareto import export_decode_best

    spec, model = trained
    rec = measure_decode(spec, model, context=8, budget_s=0.05, min_runs=3, prefill_runs=1)
    assert rec["precision"] == "auto"
    assert rec["block_precision"][ATTN] == "int8" and rec["block_precision"][MLP] == "int4"
    assert rec["decode_ms_per_token"] > 0
    fp32 = measure_decode(spec, model, context=8, budget_s=0.05, min_runs=3, precision="fp32")
    assert set(fp32["block_precision"].values()) == {"fp32"}
    torch_rec = measure_decode(spec, model, runtime="torch", context=8, budget_s=0.05)
    assert torch_rec["precision"] == "fp32" and torch_rec["block_precision"] == {}
    best = export_decode_best(tmp_path, spec, model)
    assert "error" not in best, best
    assert best["precision"] == "auto" and best["block_precision"][MLP] == "int4"
    assert best["top1_agreement"] is not None and best["quantized_parity"]["gated"] is False
    proto = onnx.load(str(tmp_path / "decode.onnx"))
    assert {p.key: p.value for p in proto.metadata_props}["archir.precision"] == "auto"
    assert read_decode_metadata(proto)["vocab_size"] == VOCAB
    with torch.no_grad():
        assert torch.isfinite(model(torch.zeros(1, 4, dtype=torch.long))).all()


@pytest.mark.heavy
def test_generate_runs_the_decode_graph_at_the_searched_bits(
    trained: Any, tmp_path: Any, capfd: Any, monkeypatch: Any
) -> None:
    """``archir generate --runtime ort --precision auto`` runs the decode graph a search ships
    (int8 / int4 blocks)."""
    import safetensors.torch
    import yaml

    from archir.cli import main

    spec, model = trained
    f = tmp_path / "m.yaml"
    f.write_text(yaml.safe_dump(spec_data(), sort_keys=False))
    w = tmp_path / "w.safetensors"
    safetensors.torch.save_model(model, str(w))
    import exporters.decode as dec

    shipped: list[dict[str, str]] = []
    ship = dec.ship_decode

    def spy(*a: Any, **k: Any) -> Any:
        final, plan = ship(*a, **k)
        shipped.append(plan)
        ops = {n.op_type for n in final.graph.node}
        assert {"MatMulInteger", "MatMulNBits"} <= ops  # the quantized graph is what runs
        return final, plan

    monkeypatch.setattr(dec, "ship_decode", spy)
    common = ["--prompt", "def f(", "--max-new-tokens", "8", "--weights", str(w), "--json"]
    rc = main(["generate", str(f), "--runtime", "ort", "--precision", "auto", *common])
    out, err = capfd.readouterr()
    assert rc == 0, err
    info = json.loads(out)
    assert info["precision"] == "auto" and info["new_tokens"] == 8
    assert len(shipped) == 1 and shipped[0][ATTN] == "int8" and shipped[0][MLP] == "int4"
    assert all(0 <= t < VOCAB for t in info["tokens"])


def test_generate_precision_where_it_does_not_apply_is_refused(tmp_path: Any, capfd: Any) -> None:
    import yaml

    from archir.cli import main

    f = tmp_path / "m.yaml"
    f.write_text(yaml.safe_dump(spec_data(), sort_keys=False))
    common = ["--prompt", "def f(", "--random-weights"]
    rc = main(["generate", str(f), "--precision", "int8", *common])
    err = capfd.readouterr().err
    assert rc == 2 and "--precision int8 applies to --runtime ort" in err
    assert "Traceback" not in err
    step = tmp_path / "step.onnx"
    step.write_bytes(b"")  # refused before it is read
    rc = main(["generate", str(step), "--precision", "auto", "--prompt", "x"])
    err = capfd.readouterr().err
    assert rc == 2 and "does not apply to a decode model file" in err
