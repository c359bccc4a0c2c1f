"""BF16 with the FP32 keep-list: the converter's graph (BF16 operands for the linear layers, the attention as one BF16
chain, FP32 for the residual stream, LayerNorm, L2 norms, the head and its input projections), its rounding, the
export gate run on OpenVINO (the backend that runs the file), and the runtime's refusals."""
from __future__ import annotations

import collections
import json

import numpy as np
import pytest

from clipad.runtime.errors import ClipadError
from tiny_fixtures import export_tiny

openvino = pytest.importorskip("openvino")


def test_bf16_bits_round_to_nearest_even_like_ml_dtypes():
    import ml_dtypes

    from clipad.export.convert_bf16 import bf16_bits_to_float, float_to_bf16_bits

    rng = np.random.default_rng(0)
    values = np.concatenate([rng.normal(0, 1, 5000), rng.normal(0, 1e4, 500), [0.0, -0.0, 1e-40, 3.4e38, np.inf,
                                                                                -np.inf, 1.00390625, 1.01171875]])
    values = values.astype(np.float32)
    expected = values.astype(ml_dtypes.bfloat16).view(np.uint16)
    assert np.array_equal(float_to_bf16_bits(values), expected)
    back = bf16_bits_to_float(float_to_bf16_bits(values))
    finite = np.isfinite(values) & (np.abs(values) > 1e-30) & (np.abs(values) < 3e38)   # bf16 max ≈ 3.39e38
    assert np.all(np.abs(back[finite] - values[finite]) <= np.abs(values[finite]) * 2 ** -8)
    assert np.isnan(bf16_bits_to_float(float_to_bf16_bits(np.array([np.nan], np.float32))))[0]


@pytest.fixture(scope="module")
def exported(tiny_files, tmp_path_factory):
    out = tmp_path_factory.mktemp("bf16") / "aa"
    assert export_tiny(tiny_files, out, "aaclip", ["--precision", "bf16"]) == 0
    return out


def test_the_bf16_file_keeps_the_fp32_list(exported):
    import onnx
    from onnx import TensorProto

    from clipad.export.convert import head_feeding_linears, head_nodes

    fp32 = onnx.load(str(exported / "model.onnx"))
    bf16 = onnx.load(str(exported / "model.bf16.onnx"))
    types = {t.name: t.data_type for t in bf16.graph.initializer}
    bf16_tensors = set()
    for node in bf16.graph.node:   # topological: BF16 where written (Cast, weight) or computed from BF16 only
        ins = [x in bf16_tensors or types.get(x) == TensorProto.BFLOAT16 for x in node.input]
        if (node.op_type == "Cast" and node.attribute[0].i == TensorProto.BFLOAT16) or \
                (node.op_type in ("MatMul", "Softmax") and all(ins)):
            bf16_tensors.update(node.output)

    def is_bf16(name):
        return name in bf16_tensors or types.get(name) == TensorProto.BFLOAT16

    def consumer_of(node):
        (consumer,) = [n for n in bf16.graph.node if node.output[0] in n.input]
        return consumer

    head, feeding = set(head_nodes(fp32)), head_feeding_linears(fp32)
    assert feeding, "the projections into the anchor space exist and are kept FP32"
    kinds = collections.Counter()
    for node in bf16.graph.node:
        operands = [is_bf16(x) for x in node.input]
        if node.op_type == "MatMul" and node.name not in head and node.name not in feeding:
            assert all(operands), node.name
            kinds["bf16 product"] += 1
            after = consumer_of(node)
            if after.op_type == "Softmax":   # attention: q·kᵀ → softmax → ·v, one BF16 chain, then FP32
                kinds["attention chain"] += 1
                after = consumer_of(consumer_of(after))
            assert after.op_type == "Cast" and after.attribute[0].i == TensorProto.FLOAT   # back to FP32 at once
        elif node.op_type == "Softmax" and all(operands):
            assert consumer_of(node).op_type == "MatMul"
        elif node.op_type != "Cast":
            assert not any(operands), (node.op_type, node.name)   # LayerNorm, Add, head: FP32 inputs
            kinds[node.op_type] += 1
    assert kinds["bf16 product"] == sum(n.op_type == "MatMul" for n in fp32.graph.node) - len(feeding) - \
        sum(n.op_type == "MatMul" and n.name in head for n in fp32.graph.node)
    assert kinds["attention chain"] == sum(n.op_type == "Softmax" and n.name not in head for n in fp32.graph.node)
    assert kinds["LayerNormalization"] and kinds["Add"]
    io = [*bf16.graph.input, *bf16.graph.output]
    assert not any(t.type.tensor_type.elem_type == TensorProto.BFLOAT16 for t in io)
    weights = {t.name for t in fp32.graph.initializer}
    assert weights - {t.name for t in bf16.graph.initializer}, "FP32 copies of converted weights are dropped"


def test_export_records_the_gate_run_on_openvino(exported):
    manifest = json.loads((exported / "manifest.json").read_text())
    entry = manifest["precisions"]["bf16"]
    assert entry["gate"]["passed"] and entry["gate"]["candidate"].startswith("openvino ")
    assert entry["gate"]["comparison"]["map_pearson_min"] >= 0.999
    assert entry["conversion"]["attention_bf16"] and entry["conversion"]["bf16_linear_layers"] > 0
    assert manifest["files"]["model.bf16.onnx"]["precision"] == "bf16"


def test_openvino_runs_it_and_onnxruntime_refuses_it(exported):
    from clipad.runtime.detector import Detector

    image = np.random.default_rng(1).integers(0, 255, (56, 56, 3), dtype=np.uint8)
    with Detector.open(str(exported), backend="openvino", precision="bf16") as bf16, \
            Detector.open(str(exported), backend="openvino", precision="fp32") as fp32:
        a, b = bf16.predict(image), fp32.predict(image)
        assert "openvino" in bf16.backend.description and "bf16" in bf16.backend.description
        assert np.corrcoef(a.anomaly_map.ravel(), b.anomaly_map.ravel())[0, 1] > 0.999
        assert not np.array_equal(a.anomaly_map, b.anomaly_map)   # it did run in BF16
        kinds = collections.defaultdict(set)
        for op in bf16.backend.compiled.get_runtime_model().get_ordered_ops():
            info = op.get_rt_info()
            kinds[info["layerType"].astype(str)].add(info["runtimePrecision"].astype(str))
        assert "bf16" in kinds["FullyConnected"] and kinds["MVN"] == {"f32"}, dict(kinds)   # as written, not hinted
    with pytest.raises(ClipadError, match="no BF16 path"):
        Detector.open(str(exported), backend="onnxruntime", precision="bf16")


def test_an_export_without_the_file_says_how_to_add_it(tiny_files, tmp_path):
    from clipad.runtime.detector import Detector

    out = tmp_path / "aa"
    assert export_tiny(tiny_files, out, "aaclip") == 0
    with pytest.raises(ClipadError, match=f"no model.bf16.onnx in this export; add it with: export-engine "
                                          f"--from-onnx {out} --precision bf16"):
        Detector.open(str(out), backend="openvino", precision="bf16")


def test_a_cpu_without_bf16_is_refused(exported, openvino_without_bf16):
    from clipad.runtime.detector import Detector

    with pytest.raises(ClipadError, match="--precision bf16: this CPU has no BF16 support"):
        Detector.open(str(exported), backend="openvino", precision="bf16")


def test_backend_auto_runs_bf16_on_openvino(exported):
    from clipad.runtime.backends import registry
    from clipad.runtime.manifest import Manifest

    manifest = Manifest.read(str(exported))
    backend = registry.open_backend(registry.AUTO, str(exported), manifest, precision="bf16")
    try:
        assert backend.name == "openvino" and backend.precision == "bf16"
    finally:
        backend.close()
    backend = registry.open_backend(registry.AUTO, str(exported), manifest, precision="fp32")
    try:
        assert backend.name == "onnxruntime"   # the documented policy for every other precision
    finally:
        backend.close()


def test_chained_products_keep_distinct_tensors(tmp_path):
    """A product whose output feeds another product (Crane+'s D-Attn: weights · v, then the out-projection): the
    second one's BF16 input is a Cast of the first one's FP32 output, never a name clash (which made a cycle)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from clipad.export.convert_bf16 import bf16_products
    from clipad.runtime.backends.openvino import OpenVINOBackend  # noqa: F401  (the runtime that runs it)

    rng = np.random.default_rng(0)
    w1 = numpy_helper.from_array(rng.standard_normal((8, 8)).astype(np.float32), "w1")
    w2 = numpy_helper.from_array(rng.standard_normal((8, 4)).astype(np.float32), "w2")
    nodes = [helper.make_node("MatMul", ["x", "x_t"], ["att"], name="att"),        # activation × activation
             helper.make_node("MatMul", ["att", "w1"], ["h"], name="lin1"),        # feeds straight into lin2
             helper.make_node("MatMul", ["h", "w2"], ["y"], name="lin2")]
    graph = helper.make_graph(nodes, "chain", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [6, 6]),
                                               helper.make_tensor_value_info("x_t", TensorProto.FLOAT, [6, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [6, 4])], [w1, w2])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    info = bf16_products(model, attention=True)
    assert info["bf16_linear_layers"] + info["bf16_attention_products"] == 3 - len(info["fp32_head_projections"])
    onnx.checker.check_model(model)
    outputs = [o for n in model.graph.node for o in n.output]
    assert len(outputs) == len(set(outputs))                     # every tensor has one producer
    path = tmp_path / "chain.onnx"
    onnx.save(model, str(path))
    core = openvino.Core()
    x, xt = rng.standard_normal((6, 6)).astype(np.float32), rng.standard_normal((6, 8)).astype(np.float32)
    (y,) = core.compile_model(str(path), "CPU").create_infer_request().infer({"x": x, "x_t": xt}).values()
    expected = x @ xt @ numpy_helper.to_array(w1) @ numpy_helper.to_array(w2)
    assert np.allclose(y, expected, rtol=0.05, atol=0.05 * np.abs(expected).max())


def test_attention_becomes_one_bf16_chain_and_int8_products_stay_int8(tmp_path):
    """The pass on a Q/DQ file (int8-bf16's): the Casts between q·kᵀ, softmax and ·v go (one chain OpenVINO can
    fuse), a weight read through a Transpose (Crane's second out-projection) counts as a linear layer, and a product
    whose operands come from DequantizeLinear (an INT8 linear layer) is left as it is."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from clipad.export.convert_bf16 import bf16_products

    rng = np.random.default_rng(3)
    w_t = numpy_helper.from_array(rng.standard_normal((8, 8)).astype(np.float32), "w_t")     # stored transposed
    w_q = numpy_helper.from_array(rng.integers(-127, 128, (8, 8)).astype(np.int8), "w_q")
    scale = numpy_helper.from_array(np.float32(0.01), "scale")
    f32 = TensorProto.FLOAT
    nodes = [helper.make_node("Transpose", ["x"], ["k_t"], perm=[1, 0]),
             helper.make_node("MatMul", ["x", "k_t"], ["logits"], name="qk"),
             helper.make_node("Cast", ["logits"], ["logits32"], to=f32),               # an FP16 file's round trip
             helper.make_node("Softmax", ["logits32"], ["weights"], axis=-1, name="softmax"),
             helper.make_node("Cast", ["weights"], ["weights16"], to=f32),
             helper.make_node("MatMul", ["weights16", "x"], ["mixed"], name="pv"),
             helper.make_node("Transpose", ["w_t"], ["w"], perm=[1, 0]),
             helper.make_node("MatMul", ["mixed", "w"], ["h"], name="linear"),
             helper.make_node("DequantizeLinear", ["w_q", "scale"], ["w_dq"]),
             helper.make_node("MatMul", ["h", "w_dq"], ["y"], name="int8_linear")]
    graph = helper.make_graph(nodes, "attention", [helper.make_tensor_value_info("x", f32, [6, 8])],
                              [helper.make_tensor_value_info("y", f32, [6, 8])], [w_t, w_q, scale])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19)])
    info = bf16_products(model, attention=True)
    assert info["bf16_attention_chains"] == 1 and info["bf16_linear_layers"] == 1
    onnx.checker.check_model(model)
    by_name = {n.name: n for n in model.graph.node}
    producer = {o: n for n in model.graph.node for o in n.output}
    assert producer[by_name["softmax"].input[0]] is by_name["qk"]        # no Cast inside the chain
    assert producer[by_name["pv"].input[0]] is by_name["softmax"]
    assert producer[by_name["int8_linear"].input[1]].op_type == "DequantizeLinear"
    assert producer[by_name["int8_linear"].input[0]].op_type == "Cast"   # the FP32 output of the BF16 linear layer
    path = tmp_path / "attention.onnx"
    onnx.save(model, str(path))
    x = rng.standard_normal((6, 8)).astype(np.float32)
    (y,) = openvino.Core().compile_model(str(path), "CPU").create_infer_request().infer({"x": x}).values()
    logits = x @ x.T
    weights = np.exp(logits - logits.max(-1, keepdims=True))
    weights /= weights.sum(-1, keepdims=True)
    expected = weights @ x @ numpy_helper.to_array(w_t).T @ (numpy_helper.to_array(w_q).astype(np.float32) * 0.01)
    assert np.allclose(y, expected, rtol=0.05, atol=0.05 * np.abs(expected).max())


def test_an_attention_quantized_by_the_quantizer_stays_int8():
    """A quantizer that put Q/DQ on the attention products (NNCF may): the chain is not rewritten."""
    from onnx import TensorProto, helper, numpy_helper

    from clipad.export.convert_bf16 import bf16_products

    scale = numpy_helper.from_array(np.float32(0.1), "scale")
    f32 = TensorProto.FLOAT
    nodes = [helper.make_node("QuantizeLinear", ["x", "scale"], ["x_q"]),
             helper.make_node("DequantizeLinear", ["x_q", "scale"], ["x_dq"]),
             helper.make_node("Transpose", ["x_dq"], ["k_t"], perm=[1, 0]),
             helper.make_node("MatMul", ["x_dq", "k_t"], ["logits"], name="qk"),
             helper.make_node("Softmax", ["logits"], ["weights"], axis=-1),
             helper.make_node("MatMul", ["weights", "x"], ["y"], name="pv")]
    graph = helper.make_graph(nodes, "quantized", [helper.make_tensor_value_info("x", f32, [6, 8])],
                              [helper.make_tensor_value_info("y", f32, [6, 8])], [scale])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19)])
    info = bf16_products(model, attention=True)
    assert info["bf16_attention_chains"] == 0
    assert {n.name: list(n.input) for n in model.graph.node}["qk"] == ["x_dq", "k_t"]
