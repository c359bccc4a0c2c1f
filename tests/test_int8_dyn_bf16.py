"""int8-dyn-bf16: INT8 weights whose activations OpenVINO quantizes at run time (no calibration), with the BF16
keep-list for the rest: the file's graph, OpenVINO's kernels for it (INT8 products only with the dynamic quantization
the backend asks for), its gate on OpenVINO judged by OK/NG, and the runtime's refusals."""
from __future__ import annotations

import json

import numpy as np
import pytest

from clipad.runtime.errors import ClipadError
from tiny_fixtures import export_tiny

openvino = pytest.importorskip("openvino")
if "BF16" not in openvino.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES"):
    pytest.skip("this CPU has no BF16 path in OpenVINO (int8-dyn-bf16 is refused there)", allow_module_level=True)


def test_int8_per_channel_rounds_within_half_a_step():
    from clipad.export.convert_weight_int8 import int8_per_channel

    rng = np.random.default_rng(0)
    weight = rng.normal(size=(64, 5)).astype(np.float32) * np.array([1, 10, 1e-3, 1, 0], np.float32)
    values, scale = int8_per_channel(weight)
    assert values.dtype == np.int8 and values.min() >= -127 and scale.shape == (5,)
    assert np.all(np.abs(values * scale - weight) <= scale / 2 + 1e-7)
    assert scale[4] == 1 and not values[:, 4].any()           # an all-zero column stays zero
    assert np.abs(values[:, :4]).max(axis=0).tolist() == [127] * 4   # each column's peak uses the full range


def _product(path, k=256, n=512):
    """One linear layer [1, k] × [k, n] with its weight put behind an INT8 DequantizeLinear by the converter."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from clipad.export.convert_weight_int8 import dequantized_weights

    weight = np.random.default_rng(2).normal(size=(k, n)).astype(np.float32) / np.sqrt(k)
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"], name="linear")], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, n])],
                              [numpy_helper.from_array(weight, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    assert dequantized_weights(model, ["linear"]) == 1
    assert [t.data_type for t in model.graph.initializer if t.name == "w_int8"] == [TensorProto.INT8]
    assert "w" not in {t.name for t in model.graph.initializer}   # the FP32 weight is gone from the file
    onnx.save(model, str(path))
    return weight


def test_openvino_quantizes_the_activations_only_with_the_backends_dynamic_quantization(tmp_path):
    """OpenVINO reports the same kernel name either way, so the numbers tell: without dynamic quantization the layer
    computes with the dequantized INT8 weight in FP32 (float rounding from numpy's product); with the backend's
    group size its input is rounded to INT8 per group too (a larger, still small, error)."""
    from clipad.export.convert_weight_int8 import int8_per_channel
    from clipad.runtime.backends.openvino import OpenVINOBackend

    weight = _product(tmp_path / "w.onnx")
    x = np.random.default_rng(3).normal(size=(1, 256)).astype(np.float32)
    values, scale = int8_per_channel(weight)
    exact = x @ (values.astype(np.float32) * scale)
    backend = OpenVINOBackend.for_file(str(tmp_path / "w.onnx"), "int8-dyn-bf16", 56, (1, 1), "x", ["y"])
    try:
        assert backend.compiled.get_property("DYNAMIC_QUANTIZATION_GROUP_SIZE") == 256   # the record's, not the default
        got = np.array(backend.request.infer({"x": x})[backend.outputs[0]])
    finally:
        backend.close()
    plain = openvino.Core().compile_model(str(tmp_path / "w.onnx"), "CPU", {"INFERENCE_PRECISION_HINT": "f32",
                                                                        "DYNAMIC_QUANTIZATION_GROUP_SIZE": 0})
    unquantized = np.array(plain.create_infer_request().infer({"x": x})[0])
    # medians: OpenVINO's unquantized path is off by ~1e-3 on one output column of 512 (its tail handling)
    assert np.median(np.abs(unquantized - exact)) < 1e-5
    error = np.median(np.abs(got - exact))
    assert 1e-3 < error < 0.02 * np.abs(exact).max(), error
    assert np.corrcoef(got.ravel(), exact.ravel())[0, 1] > 0.999


@pytest.fixture(scope="module")
def exported(tiny_files, tmp_path_factory, normals):
    out = tmp_path_factory.mktemp("int8dyn") / "aa"
    assert export_tiny(tiny_files, out, "aaclip", ["--precision", "int8-dyn-bf16", "--calib-data", str(normals),
                                                   "--accept-accuracy-loss", "--no-int8-sensitivity"]) == 0
    return out


def test_the_file_has_int8_weights_and_the_bf16_keep_list(exported):
    import onnx
    from onnx import TensorProto

    from clipad.export.convert import head_nodes, linear_nodes
    from clipad.export.onnx_graph import head_feeding_linears

    manifest = json.loads((exported / "manifest.json").read_text())
    entry = manifest["precisions"]["int8-dyn-bf16"]
    assert entry["gate"]["candidate"].startswith("openvino ") and "int8-dyn-bf16" in entry["gate"]["candidate"]
    assert entry["gate"]["decision"]["normal_images"] > 0   # judged by OK/NG from the normal images
    conversion = entry["conversion"]
    fp32 = onnx.load(str(exported / "model.onnx"))
    head_inputs = head_feeding_linears(fp32)
    matmuls = {n.name for n in fp32.graph.node if n.op_type == "MatMul"}
    expected = [n for n in linear_nodes(fp32) if n in matmuls and n not in head_inputs]
    assert conversion["quantized_nodes"] == len(expected) > 0 and conversion["high_precision"] == "bf16"
    assert conversion["dynamic_quantization_group_size"] == 256
    softmaxes = [n for n in fp32.graph.node if n.op_type == "Softmax" and n.name not in head_nodes(fp32)]
    assert conversion["bf16_attention_chains"] == len(softmaxes) > 0
    model = onnx.load(str(exported / "model.int8-dyn-bf16.onnx"))
    ops = [n.op_type for n in model.graph.node]
    assert "QuantizeLinear" not in ops and ops.count("DequantizeLinear") > 0   # no activation is quantized in the file
    inits = {t.name: t.data_type for t in model.graph.initializer}
    producers = {o: n for n in model.graph.node for o in n.output}
    for node in model.graph.node:
        if node.name in expected:
            dq = producers[node.input[1]]
            assert dq.op_type == "DequantizeLinear" and inits[dq.input[0]] == TensorProto.INT8
        if node.name in head_inputs:
            assert inits.get(node.input[1]) == TensorProto.FLOAT, node.name   # the head's inputs stay FP32


def test_the_runtime_runs_it_on_openvino_only(exported):
    from clipad.runtime.detector import Detector

    image = np.random.default_rng(1).integers(0, 255, (56, 56, 3), dtype=np.uint8)
    with Detector.open(str(exported), backend="openvino", precision="int8-dyn-bf16") as fast, \
            Detector.open(str(exported), backend="openvino", precision="fp32") as ref:
        a, b = fast.predict(image), ref.predict(image)
        assert "int8-dyn-bf16" in fast.backend.description
        assert np.isfinite(a.anomaly_map).all()
        assert np.corrcoef(a.anomaly_map.ravel(), b.anomaly_map.ravel())[0, 1] > 0.98
    with pytest.raises(ClipadError, match="onnxruntime does not run int8-dyn-bf16 .* it runs on openvino"):
        Detector.open(str(exported), backend="onnxruntime", precision="int8-dyn-bf16")
    with Detector.open(str(exported), backend="auto", precision="int8-dyn-bf16") as auto:
        assert auto.backend.name == "openvino"


def test_a_cpu_without_bf16_is_refused(exported, openvino_without_bf16):
    from clipad.runtime.detector import Detector

    with pytest.raises(ClipadError, match="--precision int8-dyn-bf16: this CPU has no BF16 support .* use fp32"):
        Detector.open(str(exported), backend="openvino", precision="int8-dyn-bf16")
