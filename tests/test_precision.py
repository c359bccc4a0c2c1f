"""FP16 / INT8 ONNX with accuracy gates and INT8 calibration (no TensorRT needed; engine builds: test_engine_build)."""
from __future__ import annotations

import os

import numpy as np
import onnx
import pytest

from clipad.calibration.samples import write_samples
from clipad.export import convert as precision
from clipad.export import onnx_graph
from clipad.runtime import precisions
from clipad.runtime.compare import GateLimits
from tiny_fixtures import export_one_class as export
from tiny_fixtures import fp16_round_trips
from tiny_fixtures import manifest_json as manifest


def value_types(model):
    """Element types as declared in the converted model (the converter writes value_info for every tensor)."""
    types = {v.name: v.type.tensor_type.elem_type for v in model.graph.value_info}
    types.update({v.name: v.type.tensor_type.elem_type for v in list(model.graph.input) + list(model.graph.output)})
    types.update({i.name: i.data_type for i in model.graph.initializer})
    return types


@pytest.mark.parametrize("kind", ["aaclip", "crane"])
def test_fp16_export_keeps_sensitive_parts_fp32(tiny_files, tmp_path, kind):
    out = tmp_path / "m"
    assert export(tiny_files, out, kind, ["--precision", "fp16", "--no-engine"]) == 0
    m = manifest(out)
    assert set(m["files"]) == {"model.onnx", "model.fp16.onnx"} and m["files"]["model.fp16.onnx"]["precision"] == "fp16"
    gate = m["precisions"]["fp16"]["gate"]
    assert gate["passed"] and gate["comparison"]["map_pearson_min"] >= 0.999 and gate["failures"] == []
    model = onnx.load(str(out / "model.fp16.onnx"))
    types = value_types(model)
    fp16 = onnx.TensorProto.FLOAT16
    assert sum(t == fp16 for t in types.values()) > 10                      # really mixed precision
    assert [i.type.tensor_type.elem_type for i in model.graph.output] == [onnx.TensorProto.FLOAT] * 2
    for node in model.graph.node:
        if node.op_type in ("LayerNormalization", "ReduceL2", "Softmax", "Resize"):
            assert all(types.get(o) == onnx.TensorProto.FLOAT for o in node.output), node.name
        if precision.HEAD_SCOPE in precision._scopes(node) and node.op_type != "Cast":
            assert all(types.get(o) != fp16 for o in node.output), node.name
    assert fp16_round_trips(model) == []
    onnx.checker.check_model(model)                                          # topologically sorted, valid


def test_fp32_nodes_pass_values_above_the_fp16_range_to_each_other():
    """x → MatMul (converted to FP16) → ReduceSum (kept FP32) → ×1000 → ÷1000 (a kept head scope) → y. The sum of
    squares-sized values exceeds 65504 between the kept nodes; the onnxruntime converter alone sent it through FP16
    there (inf). After our pass the value stays FP32 and y equals the FP32 result."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    def scoped(node, scope):
        entry = node.metadata_props.add()
        entry.key, entry.value = onnx_graph.SCOPE_KEY, f"['', '{scope}', '{scope}.x']"
        return node

    w = numpy_helper.from_array(np.full((8, 8), 30.0, np.float32), "w")
    k = numpy_helper.from_array(np.array(1000.0, np.float32), "k")
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"], name="mm"),
             helper.make_node("ReduceSum", ["h"], ["s"], name="sum", keepdims=1),
             scoped(helper.make_node("Mul", ["s", "k"], ["big"], name="mul"), precision.HEAD_SCOPE),
             scoped(helper.make_node("Div", ["big", "k"], ["y"], name="div"), precision.HEAD_SCOPE)]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 1])], [w, k])
    model = onnx.shape_inference.infer_shapes(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]))
    half, _ = precision._half(model)
    x = np.ones((2, 8), np.float32)
    (y,) = ort.InferenceSession(half.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})
    assert np.isfinite(y).all() and abs(float(y.ravel()[0]) - 2 * 8 * 8 * 30.0) < 1e-3
    assert fp16_round_trips(half) == []


@pytest.mark.parametrize("kind", ["aaclip", "crane"])
def test_int8_export_symmetric_qdq_linear_only(tiny_files, tmp_path, calib_dir, kind, caplog):
    out = tmp_path / "m"
    # Tiny random-weight models have nearly tied image scores, so the score-rank part of the gate is noise here;
    # the gate's numbers are recorded and checked, the pass/fail logic is tested separately.
    assert export(tiny_files, out, kind, ["--precision", "int8", "--calib-data", str(calib_dir), "--no-engine",
                                          "--accept-accuracy-loss"]) == 0
    assert "at least 100" in caplog.text and "Please consider" not in caplog.text  # ORT's CPU advice dropped
    m = manifest(out)
    info, gate = m["precisions"]["int8"]["conversion"], m["precisions"]["int8"]["gate"]
    assert info["calibration_images"] == 9 and gate["comparison"]["images"] == 3  # 3 of 12 held back
    assert gate["comparison"]["map_pearson_min"] >= 0.99 and gate["comparison"]["score_spearman"] is not None
    # The verdict follows from the recorded numbers (whichever way it went on these near-tied tiny scores).
    rho = gate["comparison"]["score_spearman"]
    assert gate["passed"] == (rho >= 0.98) and gate["accepted_despite_failure"] == (not gate["passed"])
    model = onnx.load(str(out / "model.int8.onnx"))
    assert info["high_precision"] == "fp16" and [o.version for o in model.opset_import if o.domain == ""] == [19]
    assert fp16_round_trips(model) == []
    types = value_types(model)
    for node in model.graph.node:   # FP16 remainder, FP32 keep-list as for --precision fp16
        if node.op_type in ("LayerNormalization", "Softmax", "Resize"):
            assert all(types.get(o) == onnx.TensorProto.FLOAT for o in node.output), node.name
        if node.op_type == "Gelu" or (node.op_type == "MatMul" and not precision.HEAD_SCOPE in precision._scopes(node)):
            assert all(types.get(o) == onnx.TensorProto.FLOAT16 for o in node.output), node.name
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in model.graph.initializer}
    q = [n for n in model.graph.node if n.op_type == "QuantizeLinear"]
    dq = [n for n in model.graph.node if n.op_type == "DequantizeLinear"]
    assert q and dq
    for node in q + dq:  # symmetric: every zero point is 0 (TensorRT accepts only symmetric INT8)
        if len(node.input) > 2:
            assert not inits[node.input[2]].any() and inits[node.input[2]].dtype == np.int8
    producers = {o: n for n in model.graph.node for o in n.output}
    quantized_inputs = [n for n in model.graph.node if n.op_type in ("MatMul", "Conv")
                        and any(producers.get(i) is not None and producers[i].op_type == "DequantizeLinear"
                                for i in n.input)]
    assert quantized_inputs
    for n in quantized_inputs:   # only linear layers, never the head or the attention products
        assert precision.HEAD_SCOPE not in precision._scopes(n)
        assert any(i in inits or (producers.get(i) is not None and producers[i].input[0] in inits) for i in n.input)
    assert not any(n.op_type == "Add" and producers.get(n.input[0]) is not None
                   and producers[n.input[0]].op_type == "DequantizeLinear" for n in model.graph.node)
    # The projections straight into the head stay float (Crane: 0.986 -> 0.998 map Pearson on magnetic_tile).
    # Known from the models, not from the code under test: the tiny AA-CLIP has 4 seg_proj adapters (one per tap)
    # into the anchor space, Crane's final projection runs on 2 token streams; none is a transformer block layer.
    expected = {"aaclip": 4, "crane": 2}[kind]
    kept = set(info["kept_float_nodes"])
    assert len(kept) == expected
    fp32_graph = onnx.load(str(out / "model.onnx"))
    scopes = {n.name: precision._scopes(n) for n in fp32_graph.graph.node}
    assert all("resblocks" not in scopes[n] for n in kept)
    quantized_names = {n.name for n in quantized_inputs}
    assert not kept & quantized_names
    linear = set(precision.linear_nodes(fp32_graph))
    assert linear - kept == quantized_names         # every other linear layer is quantized


def test_int8_bad_inputs(tiny_files, tmp_path, capsys):
    assert export(tiny_files, tmp_path / "a", "clip", ["--precision", "int8"]) == 2
    assert "--calib-data" in capsys.readouterr().err
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "x.png").write_bytes(b"\x89PNG broken")
    (bad / "y.png").write_bytes(b"")
    assert export(tiny_files, tmp_path / "b", "clip", ["--precision", "int8", "--calib-data", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "x.png" in err and "Traceback" not in err
    empty = tmp_path / "empty"
    empty.mkdir()
    assert export(tiny_files, tmp_path / "c", "clip", ["--precision", "int8", "--calib-data", str(empty)]) == 2
    assert "no image files" in capsys.readouterr().err
    assert sorted(os.listdir(tmp_path)) == ["bad", "empty"]


def test_failing_gate_fails_export_unless_accepted(tiny_files, tmp_path, monkeypatch, capsys):
    import dataclasses

    monkeypatch.setitem(precisions.PRECISIONS, "fp16",
                        dataclasses.replace(precisions.PRECISIONS["fp16"], gate=GateLimits(map_pearson_min=1.5)))
    assert export(tiny_files, tmp_path / "m", "clip", ["--precision", "fp16", "--no-engine"]) == 2
    assert "FP16 accuracy gate failed: map Pearson min" in capsys.readouterr().err
    assert not (tmp_path / "m").exists()
    assert export(tiny_files, tmp_path / "m", "clip", ["--precision", "fp16", "--no-engine",
                                                       "--accept-accuracy-loss"]) == 0
    gate = manifest(tmp_path / "m")["precisions"]["fp16"]["gate"]
    assert gate["passed"] is False and gate["accepted_despite_failure"] is True


def test_calibration_set_cache_and_holdout(tmp_path, monkeypatch):
    from clipad.calibration import images as calib_images
    from clipad.runtime.errors import ClipadError

    folder = tmp_path / "imgs"
    write_samples(str(folder), count=10, seed=1)
    data, names = calib_images.load_set(str(folder), 56, str(tmp_path / "cache"))
    assert data.shape == (10, 56, 56, 3) and data.dtype == np.uint8 and len(os.listdir(tmp_path / "cache")) == 1

    def no_decoding(*a, **k):
        raise AssertionError("images decoded again despite the cache")

    monkeypatch.setattr(calib_images, "prepare", no_decoding)
    again, _ = calib_images.load_set(str(folder), 56, str(tmp_path / "cache"))
    assert np.array_equal(again, data)
    calib, calib_names, held, held_names = calib_images.split_holdout(data, names)
    assert len(held) == 3 and len(calib) == 7 and not set(calib_names) & set(held_names)
    single = tmp_path / "one"
    single.mkdir()
    os.rename(folder / names[0], single / "a.png")
    with pytest.raises(ClipadError, match="at least 2 needed"):
        calib_images.load_set(str(single), 56)
