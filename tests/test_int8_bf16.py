"""int8-bf16: the Q/DQ file's INT8 linear layers with the BF16 keep-list for the rest (the issue's "INT8 with BF16 for
the rest": attention and float linear layers BF16, residual stream, LayerNorm and head FP32), run by OpenVINO: its own
file and gate (on OpenVINO, judged by OK/NG), the compiled model's kernels, and the runtime's choices and refusals."""
from __future__ import annotations

import json

import numpy as np
import pytest

from clipad.runtime.errors import ClipadError
from tiny_fixtures import export_tiny

openvino = pytest.importorskip("openvino")
if "BF16" not in openvino.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES"):
    pytest.skip("this CPU has no BF16 path in OpenVINO (int8-bf16 is refused there: tested in test_bf16's way)",
                allow_module_level=True)


@pytest.fixture(scope="module")
def exported(tiny_files, tmp_path_factory, normals):
    from clipad.export import cli as export_cli

    out = tmp_path_factory.mktemp("int8bf16") / "clip"
    assert export_tiny(tiny_files, out, "clip", ["--precision", "int8-bf16", "--calib-data", str(normals),
                                                 "--accept-accuracy-loss"], classes=("tile",)) == 0
    assert export_cli.main(["--from-onnx", str(out), "--precision", "int8", "--calib-data", str(normals),
                            "--accept-accuracy-loss", "-q"]) == 0
    return out


def test_its_gate_runs_on_openvino_and_judges_decisions(exported):
    import onnx

    from clipad.export.convert import head_nodes

    manifest = json.loads((exported / "manifest.json").read_text())
    entry = manifest["precisions"]["int8-bf16"]
    assert entry["gate"]["candidate"].startswith("openvino ") and "int8-bf16" in entry["gate"]["candidate"]
    assert manifest["precisions"]["int8"]["gate"]["candidate"].startswith("onnxruntime ")
    decision = entry["gate"]["decision"]
    assert decision["normal_images"] == 24 and len(decision["verify_flips"]) == 2   # 32 calibration images: 8 held back
    conversion = entry["conversion"]
    assert conversion["tensorrt_compatible"] and conversion["quantized_nodes"] > 0
    fp32 = onnx.load(str(exported / "model.onnx"))
    softmaxes = [n for n in fp32.graph.node if n.op_type == "Softmax" and n.name not in head_nodes(fp32)]
    assert conversion["high_precision"] == "bf16" and conversion["bf16_attention_chains"] == len(softmaxes) > 0
    assert manifest["precisions"]["int8"]["conversion"]["high_precision"] == "fp16"   # int8's own default
    assert manifest["files"]["model.int8-bf16.onnx"]["precision"] == "int8-bf16"
    assert manifest["files"]["model.int8.onnx"]["precision"] == "int8"   # its own file: int8's gate is untouched


def _runtime_precisions(backend) -> dict[str, set[str]]:
    kinds: dict[str, set[str]] = {}
    for op in backend.compiled.get_runtime_model().get_ordered_ops():
        info = op.get_rt_info()
        kinds.setdefault(info["layerType"].astype(str), set()).add(info["runtimePrecision"].astype(str))
    return kinds


def test_openvino_runs_the_products_in_int8_the_attention_in_bf16_and_layernorm_in_fp32(exported):
    """What makes it fast and keeps it close: the quantized products on INT8 kernels, the attention on BF16 kernels,
    the LayerNorms (MVN) in FP32 (OpenVINO's own BF16 hint would run them BF16); the int8 precision runs the same
    products in INT8 and all the rest in FP32."""
    from clipad.runtime.detector import Detector

    image = np.random.default_rng(1).integers(0, 255, (56, 56, 3), dtype=np.uint8)
    with Detector.open(str(exported), backend="openvino", precision="int8-bf16") as fast, \
            Detector.open(str(exported), backend="openvino", precision="int8") as plain, \
            Detector.open(str(exported), backend="openvino", precision="fp32") as fp32:
        fast_kinds, plain_kinds = _runtime_precisions(fast.backend), _runtime_precisions(plain.backend)
        assert fast_kinds["FullyConnected"] & {"i8", "u8"}, fast_kinds["FullyConnected"]
        assert any("bf16" in kinds for kinds in fast_kinds.values()), fast_kinds
        assert fast_kinds["MVN"] == {"f32"}, fast_kinds["MVN"]
        assert not any("bf16" in kinds for kinds in plain_kinds.values()), plain_kinds
        a, b, ref = fast.predict(image), plain.predict(image), fp32.predict(image)
        assert "int8-bf16" in fast.backend.description
        assert np.corrcoef(a.anomaly_map.ravel(), ref.anomaly_map.ravel())[0, 1] > 0.98
        assert not np.array_equal(a.anomaly_map, b.anomaly_map)


def test_onnxruntime_refuses_it_and_auto_runs_it_on_openvino(exported):
    from clipad.runtime.backends import registry
    from clipad.runtime.detector import Detector
    from clipad.runtime.manifest import Manifest

    with pytest.raises(ClipadError, match="onnxruntime does not run int8-bf16 .* it runs on openvino"):
        Detector.open(str(exported), backend="onnxruntime", precision="int8-bf16")
    backend = registry.open_backend(registry.AUTO, str(exported), Manifest.read(str(exported)), precision="int8-bf16")
    try:
        assert backend.name == "openvino" and backend.precision == "int8-bf16"
    finally:
        backend.close()


def test_a_cpu_without_bf16_is_refused(exported, openvino_without_bf16):
    from clipad.runtime.detector import Detector

    with pytest.raises(ClipadError, match="--precision int8-bf16: this CPU has no BF16 support .* use fp32"):
        Detector.open(str(exported), backend="openvino", precision="int8-bf16")


def test_a_file_made_for_the_bf16_hint_warns_that_it_runs_as_plain_int8(exported, tmp_path, caplog):
    """int8-bf16's first version (an FP16 remainder compiled under OpenVINO's BF16 hint) now runs at f32 as a plain
    INT8 file: slower, not less accurate; the backend says so and how to remake it."""
    import logging
    import shutil

    from clipad.runtime.detector import Detector

    old = tmp_path / "old"
    shutil.copytree(exported, old)
    manifest = json.loads((old / "manifest.json").read_text())
    manifest["precisions"]["int8-bf16"]["conversion"]["high_precision"] = "fp16"
    (old / "manifest.json").write_text(json.dumps(manifest))
    with caplog.at_level(logging.WARNING, logger="clipad"):
        with Detector.open(str(exported), backend="openvino", precision="int8-bf16"):
            pass
        assert "older clipad-edge" not in caplog.text
        with Detector.open(str(old), backend="openvino", precision="int8-bf16"):
            pass
    assert "made by an older clipad-edge (fp16 remainder" in caplog.text
    assert f"export-engine --from-onnx {old} --precision int8-bf16" in caplog.text
