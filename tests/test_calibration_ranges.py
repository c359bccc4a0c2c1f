"""Our batch-at-a-time INT8 range collection gives onnxruntime's own calibrator results, without keeping tensors."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnxruntime.quantization.calibrate import CalibrationMethod, create_calibrator

from clipad.calibration import ranges
from clipad.export import convert as precision
from tiny_fixtures import export_tiny, images


@pytest.fixture(scope="module")
def tiny_onnx(tiny_files, tmp_path_factory):
    out = tmp_path_factory.mktemp("ranges") / "m"
    assert export_tiny(tiny_files, out, "aaclip", ["--no-engine"], classes=("bottle",)) == 0
    path = str(out / "model.onnx")
    model = onnx.load(path)
    tensors = ranges.activation_tensors(model, precision.linear_nodes(model))
    return path, tensors


def feeds(data):
    return [{"images": data[i:i + 1]} for i in range(len(data))]


class Reader:
    def __init__(self, data):
        self.items = iter(feeds(data))

    def get_next(self):
        return next(self.items, None)


def onnxruntime_ranges(path, data, method, tmp_path):
    calibrator = create_calibrator(path, ["MatMul", "Gemm", "Conv"], str(tmp_path / "aug.onnx"), method,
                                   extra_options={"symmetric": True})
    calibrator.collect_data(Reader(data))
    return calibrator.compute_data()


def test_activation_tensors_are_linear_layer_activations(tiny_onnx):
    path, tensors = tiny_onnx
    model = onnx.load(path)
    consts = {i.name for i in model.graph.initializer}
    assert tensors and not set(tensors) & consts and "images" not in tensors
    linear = set(precision.linear_nodes(model))
    for t in tensors:
        assert any(n.name in linear and (t in n.input or t in n.output) for n in model.graph.node)


def test_minmax_equals_onnxruntime_over_many_batches(tiny_onnx, tmp_path):
    path, tensors = tiny_onnx
    data = images(5, 56, seed=4)
    ours = ranges.collect_ranges(path, tensors, feeds(data), "minmax", optimize=False)
    theirs = onnxruntime_ranges(path, data, CalibrationMethod.MinMax, tmp_path)
    assert ours.calibration_method == CalibrationMethod.MinMax and set(ours.keys()) == set(tensors)
    for t in tensors:
        lo, hi = ours[t].range_value
        assert hi > 0 and lo == -hi
        np.testing.assert_array_equal(np.ravel(ours[t].range_value), np.ravel(theirs[t].range_value), err_msg=t)
    fused = ranges.collect_ranges(path, tensors, feeds(data), "minmax")  # the default: optimized graph
    for t in tensors:  # fused kernels differ from the unfused graph in float32 rounding only
        np.testing.assert_allclose(fused[t].range_value, ours[t].range_value, rtol=1e-6, atol=0, err_msg=t)


@pytest.mark.parametrize("method", ["entropy", "percentile"])
def test_histogram_methods_equal_onnxruntime_on_one_batch(tiny_onnx, tmp_path, method, capsys):
    """onnxruntime builds one histogram over all batches at the end; we fold batches in as they come (that is the
    memory fix), so the two agree exactly when there is one batch, and stay within the min-max range otherwise."""
    path, tensors = tiny_onnx
    data = images(1, 56, seed=5)
    ours = ranges.collect_ranges(path, tensors, feeds(data), method, optimize=False)
    cm = {"entropy": CalibrationMethod.Entropy, "percentile": CalibrationMethod.Percentile}[method]
    theirs = onnxruntime_ranges(path, data, cm, tmp_path)
    for t in tensors:
        np.testing.assert_array_equal(np.ravel(ours[t].range_value), np.ravel(theirs[t].range_value), err_msg=t)
    many = images(4, 56, seed=6)
    streamed = ranges.collect_ranges(path, tensors, feeds(many), method)
    minmax = ranges.collect_ranges(path, tensors, feeds(many), "minmax")
    for t in tensors:
        lo, hi = streamed[t].range_value  # entropy's threshold pair need not be symmetric; the quantizer takes max|·|
        assert 0 < max(abs(lo), abs(hi)) <= minmax[t].range_value[1] * (1 + 1e-6), t
    capsys.readouterr()
    ranges.collect_ranges(path, tensors, feeds(many[:1]), method)
    assert capsys.readouterr().out == ""  # onnxruntime's collector prints per call; silenced


def test_collector_keeps_no_tensors():
    big = {"a": np.full((2, 100, 64), 3.0, np.float32), "b": -np.arange(6400, dtype=np.float32).reshape(100, 64)}
    collector = ranges.RangeCollector("minmax")
    collector.add(big)
    collector.add({"a": np.ones(5, np.float32), "b": np.zeros(5, np.float32)})
    assert all(np.ndim(v) == 0 for v in collector.absmax.values())
    result = collector.result()
    assert result["a"].range_value[1] == 3.0 and result["b"].range_value[0] == -6399.0


def test_ranges_cache_and_fp32_remainder(tiny_onnx, tmp_path, monkeypatch):
    path, tensors = tiny_onnx
    data = images(3, 56, seed=8)
    _, _, first = precision.calibrate(path, data, "minmax", 1, str(tmp_path / "cache"))
    assert len(list((tmp_path / "cache").glob("ranges-*.json"))) == 1

    def no_calibration(*a, **k):
        raise AssertionError("calibrated again despite the cache")

    monkeypatch.setattr(ranges, "collect_ranges", no_calibration)
    _, _, cached = precision.calibrate(path, data, "minmax", 1, str(tmp_path / "cache"))
    for t in tensors:
        np.testing.assert_array_equal(np.ravel(cached[t].range_value), np.ravel(first[t].range_value))
    with pytest.raises(AssertionError, match="calibrated again"):  # other images: a different cache entry
        precision.calibrate(path, images(3, 56, seed=9), "minmax", 1, str(tmp_path / "cache"))
    dst = tmp_path / "int8_fp32.onnx"
    info = precision.to_int8(path, str(dst), data, "minmax", 1, high_precision="fp32",
                             cache_dir=str(tmp_path / "cache"))
    model = onnx.load(str(dst))
    assert info["high_precision"] == "fp32" and [o.version for o in model.opset_import if o.domain == ""] == [18]
    assert not any(i.data_type == onnx.TensorProto.FLOAT16 for i in model.graph.initializer)
    assert any(n.op_type == "QuantizeLinear" for n in model.graph.node)


def test_keep_float_leaves_named_layers_unquantized(tiny_onnx, tmp_path):
    path, _ = tiny_onnx
    data = images(3, 56, seed=8)
    dst = tmp_path / "int8.onnx"
    info = precision.to_int8(path, str(dst), data, "minmax", 1, cache_dir=str(tmp_path / "c"),
                             keep_float=("mlp.c_proj",))
    model = onnx.load(str(dst))
    producers = {o: n for n in model.graph.node for o in n.output}
    fed_by_dq = lambda n: any(producers.get(i) is not None and producers[i].op_type == "DequantizeLinear"  # noqa
                              for i in n.input)
    proj = [n for n in model.graph.node if "mlp.c_proj" in precision._scopes(n) and n.op_type == "MatMul"]
    fc = [n for n in model.graph.node if "mlp.c_fc" in precision._scopes(n) and n.op_type == "MatMul"]
    assert proj and fc and not any(fed_by_dq(n) for n in proj) and all(fed_by_dq(n) for n in fc)
    graph = onnx.load(path)
    float_nodes = {n.name for n in proj} | (precision.head_feeding_linears(graph) & set(precision.linear_nodes(graph)))
    assert info["kept_float"] == ["mlp.c_proj"] and set(info["kept_float_nodes"]) == float_nodes
    assert info["quantized_nodes"] == len(precision.linear_nodes(graph)) - len(float_nodes)
    with pytest.raises(precision.ClipadError, match="matches no linear layer"):
        precision.to_int8(path, str(tmp_path / "x.onnx"), data, "minmax", 1, keep_float=("no.such.module",))
