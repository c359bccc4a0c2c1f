"""SmoothQuant and the centring shift as ONNX graph transforms (export/smoothquant.py): the FP32 model keeps its
values, only LayerNorms that feed nothing but linear layers are smoothed, only lopsided inputs of linear layers with a
bias are centred, a shared weight keeps its value for its other reader, the min-max ranges derived from one pass equal
a calibration of the transformed model, and the static INT8 file is more accurate with each transform where its
activations call for it (outlier channels; a ReLU/GELU-like input). Then both options through export-engine."""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from clipad.calibration.ranges import activation_tensors, collect_channel_extrema, collect_ranges
from clipad.export import convert, smoothquant
from tiny_fixtures import export_tiny, manifest_json

C, OUT = 16, 12


def graph(path, outliers=True) -> str:
    """images [N, 8, C] → LN_a → MatMul W_a, MatMul W_b (W_b also read by a MatMul on the raw input);
    images → LN_b → MatMul W_d and a residual Add (not smoothable); images → Relu → MatMul W_e + bias (lopsided)."""
    rng = np.random.default_rng(0)
    gamma_a = rng.uniform(0.5, 1.5, C).astype(np.float32)
    if outliers:
        gamma_a[[3, 7]] = [60.0, 40.0]   # CLIP-like outlier channels of a LayerNorm output
    inits = {"gamma_a": gamma_a, "beta_a": rng.normal(0, 0.1, C), "gamma_b": rng.uniform(0.5, 1.5, C),
             "beta_b": rng.normal(0, 0.1, C), "W_a": rng.normal(0, 0.2, (C, OUT)), "W_b": rng.normal(0, 0.2, (C, OUT)),
             "W_d": rng.normal(0, 0.2, (C, C)), "W_e": rng.normal(0, 0.2, (C, OUT)), "b_e": rng.normal(0, 0.1, OUT)}
    nodes = [helper.make_node("LayerNormalization", ["images", "gamma_a", "beta_a"], ["ya"], name="ln_a", axis=-1),
             helper.make_node("MatMul", ["ya", "W_a"], ["za"], name="mm_a"),
             helper.make_node("MatMul", ["ya", "W_b"], ["zb"], name="mm_b"),
             helper.make_node("MatMul", ["images", "W_b"], ["zc"], name="mm_c"),
             helper.make_node("LayerNormalization", ["images", "gamma_b", "beta_b"], ["yb"], name="ln_b", axis=-1),
             helper.make_node("MatMul", ["yb", "W_d"], ["zd"], name="mm_d"),
             helper.make_node("Add", ["yb", "zd"], ["residual"], name="add"),
             helper.make_node("Relu", ["images"], ["r"], name="relu"),
             helper.make_node("MatMul", ["r", "W_e"], ["re"], name="mm_e"),
             helper.make_node("Add", ["re", "b_e"], ["ze"], name="bias_e")]
    outs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["N", 8, d]) for n, d in
            (("za", OUT), ("zb", OUT), ("zc", OUT), ("residual", C), ("ze", OUT))]
    g = helper.make_graph(nodes, "sq", [helper.make_tensor_value_info("images", TensorProto.FLOAT, ["N", 8, C])],
                          outs, [numpy_helper.from_array(np.asarray(v, np.float32), k) for k, v in inits.items()])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return str(path)


def run(path, x):
    sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    return dict(zip([o.name for o in sess.get_outputs()], sess.run(None, {"images": x})))


def data(n, seed):
    return np.random.default_rng(seed).normal(0, 1, (n, 8, C)).astype(np.float32)


def test_smoothable_is_layernorms_feeding_only_linear_layers(tmp_path):
    found = smoothquant.smoothable(onnx.load(graph(tmp_path / "m.onnx")))
    assert list(found) == ["ya"]
    assert sorted(n.name for n in found["ya"][1]) == ["mm_a", "mm_b"]


def test_smoothing_keeps_the_fp32_model_and_the_shared_weight(tmp_path):
    src = graph(tmp_path / "m.onnx")
    lo, hi = collect_channel_extrema(src, ["ya"], [{"images": data(4, 1)}])["ya"]
    absmax = {"ya": np.maximum(-lo, hi)}
    smoothed = onnx.load(src)
    scales = smoothquant.smooth(smoothed, absmax, 0.5)
    assert list(scales) == ["ya"]
    path = str(tmp_path / "smoothed.onnx")
    onnx.save(smoothed, path)
    model = onnx.load(src)
    w = np.maximum(*(np.abs(numpy_helper.to_array(i)).max(axis=1) for i in model.graph.initializer
                     if i.name in ("W_a", "W_b")))
    np.testing.assert_allclose(scales["ya"], np.sqrt(absmax["ya"] / w), rtol=1e-5)
    assert scales["ya"].max() / scales["ya"].min() > 5   # the outlier channels are divided down
    x = data(3, 2)
    before, after = run(src, x), run(path, x)
    for name in before:
        np.testing.assert_allclose(after[name], before[name], rtol=1e-4, atol=1e-4, err_msg=name)
    mm_c = next(n for n in smoothed.graph.node if n.name == "mm_c")
    inits = {i.name: numpy_helper.to_array(i) for i in smoothed.graph.initializer}
    original = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    np.testing.assert_array_equal(inits[mm_c.input[1]], original["W_b"])   # the raw-input reader's weight
    np.testing.assert_array_equal(inits["gamma_b"], original["gamma_b"])   # LN_b feeds an Add: untouched


def test_centring_shift_keeps_the_fp32_model_and_only_touches_lopsided_biased_inputs(tmp_path):
    src = graph(tmp_path / "m.onnx")
    model = onnx.load(src)
    assert set(smoothquant.shiftable(model, set(convert.linear_nodes(model)))) == {"r"}   # the others have no bias
    extrema = collect_channel_extrema(src, ["r"], [{"images": data(4, 1)}])
    shifts = smoothquant.shift(model, extrema, smoothquant.shiftable(model, {"mm_e"}))
    assert list(shifts) == ["r"] and 0 < shifts["r"] == pytest.approx(extrema["r"][1].max() / 2, rel=1e-6)
    path = str(tmp_path / "shifted.onnx")
    onnx.save(model, path)
    onnx.checker.check_model(path)
    mm_e = next(n for n in model.graph.node if n.name == "mm_e")
    assert mm_e.input[0] == "r" + smoothquant.SHIFTED
    x = data(3, 2)
    before, after = run(src, x), run(path, x)
    for name in before:
        np.testing.assert_allclose(after[name], before[name], rtol=1e-4, atol=1e-4, err_msg=name)
    balanced = {"r": np.stack([-np.ones(C), np.ones(C)]).astype(np.float32)}   # symmetric: left alone
    assert smoothquant.shift(onnx.load(src), balanced, {"r": []}) == {}


@pytest.mark.parametrize("alpha, centre", [(0.5, False), (None, True), (0.5, True)])
def test_derived_ranges_equal_a_calibration_of_the_transformed_model(tmp_path, alpha, centre):
    src = graph(tmp_path / "m.onnx")
    feeds = data(4, 3)
    batches = [{"images": feeds[i:i + 2]} for i in (0, 2)]
    path, nodes, tensors, derived, entries, _ = smoothquant.transformed(
        src, str(tmp_path), convert.linear_nodes(onnx.load(src)), lambda: batches, 2, None, alpha, centre, True)
    assert set(entries) == {name for name, on in (("smoothquant", alpha is not None), ("shift", centre)) if on}
    model = onnx.load(path)
    assert tensors == activation_tensors(model, nodes)
    assert ("r" + smoothquant.SHIFTED in tensors) == centre
    measured = collect_ranges(path, tensors, batches, "minmax")
    assert set(derived.keys()) == set(tensors)
    for t in tensors:
        np.testing.assert_allclose(derived[t].range_value, measured[t].range_value, rtol=1e-5, err_msg=t)


def int8_error(src, dst, alpha, tmp_path, centre=False, output="za"):
    made = convert.to_int8(src, str(dst), data(24, 5), "minmax", 1, high_precision="fp32",
                           cache_dir=str(tmp_path / "cache"), smooth_alpha=alpha, centre=centre)
    x = data(8, 9)
    ref, got = run(src, x), run(str(dst), x)
    return np.abs(got[output] - ref[output]).mean() / np.abs(ref[output]).mean(), made


def test_smoothing_makes_static_int8_more_accurate_on_outlier_channels(tmp_path):
    src = graph(tmp_path / "m.onnx")
    plain, made_plain = int8_error(src, tmp_path / "plain.onnx", None, tmp_path)
    smooth, made = int8_error(src, tmp_path / "smooth.onnx", 0.5, tmp_path)
    assert "smoothquant" not in made_plain
    assert made["smoothquant"]["layer_norms"] == 1 and made["smoothquant"]["linear_layers"] == 2
    assert smooth < 0.75 * plain, (plain, smooth)   # measured 0.63× here (0.0151 vs 0.0241)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".int8-")]   # the smoothed copy is gone
    again, _ = int8_error(src, tmp_path / "again.onnx", 0.5, tmp_path)   # from the cached channel ranges
    assert again == smooth


def test_layers_kept_float_are_neither_smoothed_nor_centred(tmp_path):
    src = graph(tmp_path / "m.onnx")
    made = convert.to_int8(src, str(tmp_path / "kept.onnx"), data(8, 5), "minmax", 1, high_precision="fp32",
                           keep_float=("mm_e", "mm_b"), smooth_alpha=0.5, centre=True)
    assert made["smoothquant"]["layer_norms"] == 0 and made["smoothquant"]["scale_min"] is None   # LN_a feeds mm_b
    assert made["shift"]["tensors"] == 0 and made["shift"]["biases_from_quantized_weights"] == 0
    assert not [n for n in onnx.load(str(tmp_path / "kept.onnx")).graph.node if n.op_type == "Sub"]


def test_centring_makes_static_int8_more_accurate_on_a_lopsided_input(tmp_path):
    src = graph(tmp_path / "m.onnx")
    plain, _ = int8_error(src, tmp_path / "plain.onnx", None, tmp_path, output="ze")
    centred, made = int8_error(src, tmp_path / "centred.onnx", None, tmp_path, centre=True, output="ze")
    assert made["shift"]["tensors"] == 1 and made["shift"]["linear_layers"] == 1 and "smoothquant" not in made
    assert made["shift"]["biases_from_quantized_weights"] == 1
    assert centred < 0.75 * plain, (plain, centred)   # measured 0.66× here (0.0059 vs 0.0090)


def test_export_engine_smoothquant_on_the_tiny_model(tiny_files, tmp_path):
    from clipad.calibration.samples import write_samples

    normals = tmp_path / "normals"
    write_samples(str(normals), count=12, seed=5)
    out = tmp_path / "m"
    assert export_tiny(tiny_files, out, "clip", ["--precision", "int8", "--int8-smoothquant", "0.5", "--int8-shift",
                                                 "--calib-data",
                                                 str(normals), "--accept-accuracy-loss", "--no-engine",
                                                 "--no-int8-sensitivity"], classes=("tile",)) == 0
    conversion = manifest_json(out)["precisions"]["int8"]["conversion"]
    sq = conversion["smoothquant"]
    assert sq["alpha"] == 0.5 and sq["layer_norms"] >= 2 and sq["linear_layers"] >= sq["layer_norms"]
    assert 0 < sq["scale_min"] <= sq["scale_max"]
    shift = conversion["shift"]
    assert shift["tensors"] >= 2 and shift["shift_max"] > 0   # the tiny ViT's GELU outputs feed biased c_proj layers
    qdq = onnx.load(str(out / "model.int8.onnx"))
    assert sum(n.op_type == "Sub" and n.name.startswith("centre_") for n in qdq.graph.node) == shift["tensors"]
    names = {p.name for p in out.iterdir()}
    assert "model.int8.onnx" in names and not [n for n in names if n.startswith(".int8-")]
    pytest.importorskip("tensorrt_rtx", reason="tensorrt-rtx-cu13 is installed by scripts/setup_env.sh")
    from clipad.export import cli as export_cli

    assert export_cli.main(["--from-onnx", str(out), "--precision", "int8", "--trt-flavor", "rtx",
                            "--compute-capability", "8.6", "-q"]) == 0   # the centring Sub ahead of a Q/DQ builds
    assert [e["file"] for e in manifest_json(out)["engines"]] == ["model.int8.rtx-sm86.engine"]


@pytest.mark.parametrize("extra, message", [
    (["--precision", "fp16", "--int8-smoothquant", "0.5"], "--int8-smoothquant: applies to the Q/DQ INT8 file"),
    (["--precision", "int8", "--int8-smoothquant", "1.5", "--calib-data", "."], "--int8-smoothquant 1.5: α must lie"),
    (["--precision", "int8-cpu", "--int8-shift"], "--int8-shift: applies to the Q/DQ INT8 file"),
])
def test_smoothquant_usage_errors_are_one_line(tiny_files, tmp_path, capsys, extra, message):
    assert export_tiny(tiny_files, tmp_path / "m", "clip", extra, classes=("tile",)) != 0
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "m").exists()
