"""INT8 quantizers side by side (export/quantize_nncf.py, export/quantize_modelopt.py): the same calibration images
through onnxruntime's quantize_static, NNCF and NVIDIA ModelOpt (in its own environment), the same policy (only the
linear layers quantized, the projections into the head float), the same gate; NNCF's and ModelOpt's files are checked
to suit TensorRT, run on OpenVINO and build in TensorRT-RTX."""
from __future__ import annotations

import json
import platform

import numpy as np
import onnx
import pytest

from clipad.export import convert, quantize_modelopt, quantize_nncf
from clipad.export.options import QUANTIZERS
from tiny_fixtures import export_tiny, images

pytest.importorskip("nncf", reason="NNCF comes with the export extra")


@pytest.fixture(scope="module")
def normals(tmp_path_factory):
    from clipad.calibration.samples import write_samples

    folder = tmp_path_factory.mktemp("normals")
    write_samples(str(folder), count=24, seed=5)
    return folder


def modelopt_missing() -> str | None:
    """Why ModelOpt's environment is absent; on Linux x86-64 scripts/setup_env.sh makes it, so there it must exist."""
    why = quantize_modelopt.available()
    if why and (platform.system(), platform.machine()) == ("Linux", "x86_64"):
        pytest.fail(f"{why} (scripts/setup_env.sh makes .venv-modelopt on Linux x86-64)")
    return why


@pytest.fixture(scope="module")
def exports(tiny_files, normals, tmp_path_factory):
    out = {}
    for quantizer in [q for q in QUANTIZERS if q != "modelopt" or not modelopt_missing()]:
        folder = tmp_path_factory.mktemp(quantizer) / "m"
        assert export_tiny(tiny_files, folder, "clip", ["--precision", "int8", "--int8-quantizer", quantizer,
                                                        "--calib-data", str(normals), "--accept-accuracy-loss",
                                                        "--no-engine"], classes=("tile",)) == 0
        out[quantizer] = folder
    return out


def quantized_consumers(model) -> set[str]:
    """Nodes that read a DequantizeLinear output of an activation (not a weight)."""
    inits = {i.name for i in model.graph.initializer}
    producers = {o: n for n in model.graph.node for o in n.output}
    activation_dq = set()
    for node in model.graph.node:
        if node.op_type == "DequantizeLinear":
            q = producers.get(node.input[0])
            if q is not None and q.op_type == "QuantizeLinear" and q.input[0] not in inits:
                activation_dq.add(node.output[0])
    return {n.name for n in model.graph.node if any(i in activation_dq for i in n.input)}


def test_both_quantizers_follow_one_policy_and_one_gate(exports):
    fp32 = onnx.load(str(exports["onnxruntime"] / "model.onnx"))
    linears = set(convert.linear_nodes(fp32))
    head_side = convert.head_feeding_linears(fp32)
    for quantizer, folder in exports.items():
        m = json.loads((folder / "manifest.json").read_text())["precisions"]["int8"]
        conversion, gate = m["conversion"], m["gate"]
        assert conversion["quantizer"] == quantizer and conversion["tensorrt_compatible"] is True
        assert gate["decision"] is not None and gate["comparison"]["map_pearson_min"] > 0.9
        quantized = quantized_consumers(onnx.load(str(folder / "model.int8.onnx")))
        assert quantized and quantized <= linears - head_side, (quantizer, sorted(quantized - linears)[:5])
    muls = {q: sum(n.op_type == "Mul" for n in onnx.load(str(f / "model.int8.onnx")).graph.node)
            for q, f in exports.items()}
    assert muls["nncf"] == muls["onnxruntime"]             # no SmoothQuant Mul in front of the FP32 head
    nncf_conversion = json.loads((exports["nncf"] / "manifest.json").read_text())["precisions"]["int8"]["conversion"]
    assert "nncf.quantize" in nncf_conversion["tool"] and nncf_conversion["quantized_nodes"] == len(linears - head_side)
    if "modelopt" in exports:
        conversion = json.loads((exports["modelopt"] / "manifest.json").read_text())["precisions"]["int8"][
            "conversion"]
        assert "modelopt.onnx.quantization" in conversion["tool"] and "0.47.0" in conversion["tool"]
        assert conversion["quantized_nodes"] == len(linears - head_side) and muls["modelopt"] == muls["onnxruntime"]
        # Every calibration image went through ModelOpt's session at least once, as the progress lines counted.
        assert conversion["calibration_batches_read"] >= conversion["calibration_images"] > 0


def test_tensorrt_compatibility_is_checked():
    from onnx import TensorProto, helper, numpy_helper

    def graph(zero_point):
        z = "z" if zero_point is not None else ""
        nodes = [helper.make_node("QuantizeLinear", ["x", "s", z][:3 if z else 2], ["q"]),
                 helper.make_node("DequantizeLinear", ["q", "s", z][:3 if z else 2], ["y"])]
        zero_point = np.array(0, np.int8) if zero_point is None else zero_point
        inits = [numpy_helper.from_array(np.array(0.1, np.float32), "s"), numpy_helper.from_array(zero_point, "z")]
        return helper.make_model(helper.make_graph(nodes, "g", [helper.make_tensor_value_info(
            "x", TensorProto.FLOAT, [2])], [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])], inits))

    assert quantize_nncf.tensorrt_compatible(graph(np.array(0, np.int8)))[0]
    ok, why = quantize_nncf.tensorrt_compatible(graph(np.array(128, np.uint8)))
    assert not ok and "UINT8" in why
    ok, why = quantize_nncf.tensorrt_compatible(graph(np.array(3, np.int8)))
    assert not ok and "asymmetric" in why
    ok, why = quantize_nncf.tensorrt_compatible(graph(None))
    assert not ok and "no zero point" in why
    bias = helper.make_model(helper.make_graph(
        [helper.make_node("DequantizeLinear", ["b", "s"], ["y"], name="bias_dq")], "g", [],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])],
        [numpy_helper.from_array(np.array([3, -4], np.int32), "b"), numpy_helper.from_array(np.array(0.1, np.float32),
                                                                                           "s")]))
    ok, why = quantize_nncf.tensorrt_compatible(bias)
    assert not ok and "bias_dq: dequantizes INT32" in why


@pytest.mark.parametrize("quantizer", ["nncf", "modelopt"])
def test_file_runs_on_openvino_and_builds_in_tensorrt_rtx(exports, quantizer):
    from clipad.runtime.backends.openvino import OpenVINOBackend

    if quantizer not in exports:
        pytest.skip(modelopt_missing())
    folder = exports[quantizer]
    backend = OpenVINOBackend.for_file(str(folder / "model.int8.onnx"), "int8", 56, (1, 1), "images",
                                       ["anomaly_map", "image_score"])
    try:
        maps, scores = backend.run(images(1, 56, seed=3))
    finally:
        backend.close()
    assert np.isfinite(maps).all() and np.isfinite(scores).all()
    pytest.importorskip("tensorrt_rtx", reason="tensorrt-rtx-cu13 is installed by scripts/setup_env.sh")
    from clipad.export import cli as export_cli

    assert export_cli.main(["--from-onnx", str(folder), "--precision", "int8", "--trt-flavor", "rtx",
                            "--compute-capability", "8.6", "-q"]) == 0
    engines = json.loads((folder / "manifest.json").read_text())["engines"]
    assert [e["file"] for e in engines] == ["model.int8.rtx-sm86.engine"]


def test_quantizer_choice_for_another_precision_is_a_usage_error(tiny_files, tmp_path, capsys):
    assert export_tiny(tiny_files, tmp_path / "m", "clip", ["--precision", "int8-cpu", "--int8-quantizer", "nncf"],
                       classes=("tile",)) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "--int8-quantizer nncf: applies to the Q/DQ INT8 file (--precision int8)" in err
    assert not (tmp_path / "m").exists()


def test_modelopt_needs_its_environment_and_says_so_before_exporting(tiny_files, tmp_path, capsys, monkeypatch):
    base = ["--precision", "int8", "--int8-quantizer", "modelopt", "--calib-data", str(tmp_path)]
    monkeypatch.delenv(quantize_modelopt.ENV, raising=False)
    assert export_tiny(tiny_files, tmp_path / "m", "clip", base, classes=("tile",)) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "environment of its own" in err and quantize_modelopt.ENV in err and "pip install" in err
    monkeypatch.setenv(quantize_modelopt.ENV, str(tmp_path / "nowhere" / "python"))
    assert export_tiny(tiny_files, tmp_path / "m", "clip", base, classes=("tile",)) == 2
    assert "no such executable" in capsys.readouterr().err.strip().splitlines()[-1]
    not_python = tmp_path / "not-python"
    not_python.write_bytes(b"\x7fELF garbage")
    not_python.chmod(0o755)
    monkeypatch.setenv(quantize_modelopt.ENV, str(not_python))
    assert export_tiny(tiny_files, tmp_path / "m", "clip", base, classes=("tile",)) == 2
    assert "does not run" in capsys.readouterr().err.strip().splitlines()[-1]
    monkeypatch.setenv(quantize_modelopt.ENV, "/usr/bin/python3")   # a Python without ModelOpt
    assert export_tiny(tiny_files, tmp_path / "m", "clip", base, classes=("tile",)) == 2
    assert "nvidia-modelopt is not installed there" in capsys.readouterr().err.strip().splitlines()[-1]
    assert not (tmp_path / "m").exists()


def test_modelopt_refuses_a_calibration_method_it_does_not_have(tiny_files, tmp_path, capsys):
    assert export_tiny(tiny_files, tmp_path / "m", "clip", ["--precision", "int8", "--int8-quantizer", "modelopt",
                                                             "--calib-method", "percentile", "--calib-data",
                                                             str(tmp_path)], classes=("tile",)) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "--calib-method percentile: ModelOpt calibrates INT8 with minmax or entropy only" in err
    assert not (tmp_path / "m").exists()


def test_a_failing_modelopt_run_is_one_line_and_leaves_nothing(tmp_path, monkeypatch):
    """The child's own error (here: a model file that is not ONNX) comes back as one line; the job folder goes."""
    if modelopt_missing():
        pytest.skip(modelopt_missing())
    bad = tmp_path / "model.onnx"
    bad.write_bytes(b"not an onnx file")
    with pytest.raises(Exception) as info:
        quantize_modelopt.quantize(str(bad), np.zeros((2, 8, 8, 3), np.uint8), ["x"], "minmax", str(tmp_path))
    assert type(info.value).__name__ == "ClipadError" and "ModelOpt quantization failed" in str(info.value)
    assert "\n" not in str(info.value) and sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx"]


def test_a_modelopt_child_killed_for_memory_is_named(tmp_path, monkeypatch):
    """A stand-in interpreter (a shell script, not ModelOpt) answers the version probe, then dies by SIGKILL as the
    kernel's OOM killer would end it: the error names the signal and the likely cause, and the job folder goes."""
    fake = tmp_path / "python"
    fake.write_text('#!/bin/sh\n[ "$2" = "-c" ] && { echo 0.47.0; exit 0; }\nkill -9 $$\n')
    fake.chmod(0o755)
    monkeypatch.setenv(quantize_modelopt.ENV, str(fake))
    model = tmp_path / "model.onnx"
    model.write_bytes(b"x")
    with pytest.raises(Exception) as info:
        quantize_modelopt.quantize(str(model), np.zeros((2, 8, 8, 3), np.uint8), ["x"], "minmax", str(tmp_path))
    assert "killed by SIGKILL (out of memory?" in str(info.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx", "python"]
