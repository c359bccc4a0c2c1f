"""Crane+ on the tiny configuration: export with parity, the DINOv2 weights file and its one-line errors, the graph
shape that D-Attn must have (one shared matrix, an explicit where, FP32 in every precision), and a TensorRT-RTX
build."""
from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch

from clipad.export import cli as export_cli
from clipad.export import convert as precision
from clipad.export.models import dinov2
from clipad.runtime.detect.cli import main as edge_detect
from tiny_fixtures import TINY, fp16_round_trips


@pytest.fixture(scope="module")
def dino_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("dino") / "dinov2_tiny_reg4.pth"
    torch.save(dinov2.random_dino(TINY, 4, seed=2), path)
    return path


def export(tiny_files, out, *extra):
    return export_cli.main(["--model", "crane_plus", "--arch", TINY, "--image-size", "56", "--ckpt",
                            str(tiny_files["crane"]), "--output", str(out), "-q", *extra])


@pytest.fixture(scope="module")
def model(tiny_files, dino_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("cp") / "m"
    assert export(tiny_files, out, "--clip-weights", str(tiny_files["state_dict"]), "--dino-weights",
                  str(dino_file), "--precision", "fp16", "--no-engine") == 0
    return out


def scoped(graph, scope):
    return [n for n in graph.graph.node if scope in precision._scopes(n)]


def test_export_parity_manifest_and_edge_detect(model, tmp_path):
    m = json.loads((model / "manifest.json").read_text())
    assert m["model"]["kind"] == "crane_plus" and m["parity"]["passed"]
    assert m["model"]["details"]["dattn"] == {"beta": 1.2, "gamma": 3.0, "mean": "per image",
                                              "diagonal": "always kept"}
    assert m["sources"]["dino_weights"]["sha256"] and m["model"]["decision_score"] == "image_score"
    assert m["precisions"]["fp16"]["gate"]["passed"]
    from PIL import Image

    Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 50, 3), dtype=np.uint8)).save(tmp_path / "a.png")
    assert edge_detect(["--model", str(model), "--source", str(tmp_path / "a.png"), "--jsonl",
                        str(tmp_path / "r.jsonl"), "-q"]) == 0
    row = json.loads((tmp_path / "r.jsonl").read_text())
    assert row["error"] is None and 0 < row["score"] < 1


def test_dattn_graph_is_one_shared_matrix_kept_fp32(model):
    graph = onnx.load(str(model / "model.onnx"))
    dattn = scoped(graph, "core.vision.dattn_weights")
    ops = [n.op_type for n in dattn]
    assert ops.count("Softmax") == 1 and "Where" in ops
    assert "ReduceMean" not in ops and "ReduceSum" in ops    # mean(S) in closed form, not over the P² similarities
    assert not {"Tile", "Expand"} & set(ops)                 # the 16 per-head copies are never made
    half = onnx.load(str(model / "model.fp16.onnx"))
    assert fp16_round_trips(half) == []      # ‖Σ f̂‖² (7e5 at ViT-L) never passes through FP16 between FP32 nodes
    types = {v.name: v.type.tensor_type.elem_type for v in half.graph.value_info}
    for node in scoped(half, "core.vision.dattn_weights"):
        if node.op_type not in ("Cast", "Constant", "Shape", "Equal", "Not", "And", "Less", "EyeLike"):
            assert all(types.get(o, onnx.TensorProto.FLOAT) != onnx.TensorProto.FLOAT16 for o in node.output), node


def test_random_init_and_mask_guard(tiny_files, tmp_path):
    """--random-init seeds both towers; with every DINO feature equal, every off-diagonal entry is masked and the
    kept diagonal keeps the rows finite (the official code gives NaN there)."""
    from clipad.export.models.crane_plus import DAttnWeights

    assert export(tiny_files, tmp_path / "r", "--random-init") == 0
    same = torch.ones(1, 16, 8)
    weights = DAttnWeights()(same)
    assert torch.isfinite(weights).all()


@pytest.mark.parametrize("problem, needle", [
    ("no_dino", "--dino-weights is required for --model crane_plus"),
    ("dino_for_aaclip", "--model aaclip does not use DINOv2"),
    ("wrong_size", "Crane+ on tiny-vit needs DINOv2 ViT-64-wide/14 with 4 registers"),
    ("no_registers", "this file is DINOv2 ViT-64-wide/14 with 0 registers"),
    ("not_dino", "not a DINOv2 state dict"),
])
def test_dino_weight_errors_are_one_line(tiny_files, dino_file, tmp_path, capsys, problem, needle):
    base = ["--clip-weights", str(tiny_files["state_dict"])]
    if problem == "no_dino":
        rc = export(tiny_files, tmp_path / "o", *base)
    elif problem == "dino_for_aaclip":
        rc = export_cli.main(["--model", "aaclip", "--arch", TINY, "--image-size", "56", "--ckpt",
                              str(tiny_files["aaclip"]), "--class-name", "x", "--dino-weights", str(dino_file),
                              "--output", str(tmp_path / "o"), "-q", *base])
    else:
        sd = torch.load(dino_file, weights_only=True)
        if problem == "wrong_size":
            sd = {k: v for k, v in dinov2.random_dino(TINY, 4, 0).items() if not k.startswith("blocks.1.")}
        elif problem == "no_registers":
            sd = {k: v for k, v in sd.items() if k != "register_tokens"}
        else:
            sd = {"weight": torch.zeros(3)}
        torch.save(sd, tmp_path / "bad.pth")
        rc = export(tiny_files, tmp_path / "o", *base, "--dino-weights", str(tmp_path / "bad.pth"))
    assert rc == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("export-engine: error:") and needle in err[-1], err


def test_tensorrt_rtx_builds_crane_plus(model):
    pytest.importorskip("tensorrt_rtx", reason="tensorrt-rtx-cu13 is installed by scripts/setup_env.sh")
    assert export_cli.main(["--from-onnx", str(model), "--precision", "fp16", "--trt-flavor", "rtx",
                            "--compute-capability", "8.6", "-q"]) == 0
    m = json.loads((model / "manifest.json").read_text())
    assert [e["file"] for e in m["engines"]] == ["model.fp16.rtx-sm86.engine"]


def test_int8_qdq_keeps_the_dino_patch_embedding_bias_float_and_builds_in_tensorrt_rtx(model, tmp_path):
    """ViT-L Crane+'s Q/DQ file did not parse in TensorRT-RTX: onnxruntime quantized the bias of DINOv2's patch
    embedding Conv (CLIP's has none) to an INT32 Q/DQ pair. Biases stay float now."""
    from clipad.calibration.samples import write_samples

    write_samples(str(tmp_path / "normals"), count=8, seed=5)
    assert export_cli.main(["--from-onnx", str(model), "--precision", "int8", "--calib-data", str(tmp_path / "normals"),
                            "--accept-accuracy-loss", "--no-int8-sensitivity", "--no-engine", "-q"]) == 0
    graph = onnx.load(str(model / "model.int8.onnx"))
    inits = {i.name: i.data_type for i in graph.graph.initializer}
    dq_inputs = {inits.get(n.input[0]) for n in graph.graph.node if n.op_type == "DequantizeLinear"}
    assert dq_inputs - {None} == {onnx.TensorProto.INT8}
    conv = [n for n in graph.graph.node if n.op_type == "Conv" and "dino" in precision._scopes(n)]
    assert conv and all(inits.get(n.input[2]) in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16) for n in conv)
    assert json.loads((model / "manifest.json").read_text())["precisions"]["int8"]["conversion"][
        "tensorrt_compatible"] is True
    pytest.importorskip("tensorrt_rtx", reason="tensorrt-rtx-cu13 is installed by scripts/setup_env.sh")
    assert export_cli.main(["--from-onnx", str(model), "--precision", "int8", "--trt-flavor", "rtx",
                            "--compute-capability", "8.6", "-q"]) == 0
    engines = [e["file"] for e in json.loads((model / "manifest.json").read_text())["engines"]]
    assert "model.int8.rtx-sm86.engine" in engines


def test_bench_torch_row_finds_moved_dino_weights(model, dino_file, tmp_path):
    """edge-bench's torch row rebuilds Crane+ from the recorded files; when the DINOv2 file moved, the row says to
    pass --dino-weights, and with it the torch reference matches the ONNX model."""
    import shutil

    from clipad.benchmarks.bench_cli import main as edge_bench
    from clipad.runtime.manifest import Manifest

    shutil.copytree(model, tmp_path / "m")
    moved = shutil.copy(dino_file, tmp_path / "moved.pth")
    manifest = Manifest.read(str(tmp_path / "m"))
    manifest.sources["dino_weights"]["path"] = str(tmp_path / "gone.pth")
    manifest.write(str(tmp_path / "m"))
    common = ["--model", str(tmp_path / "m"), "--backends", "torch,onnxruntime", "--precisions", "fp32",
              "--iters", "1", "--warmup", "0", "-q"]
    assert edge_bench(common + ["--json", str(tmp_path / "a.json")]) == 0
    torch_row = json.loads((tmp_path / "a.json").read_text())["rows"][0]
    assert torch_row["status"] == "skipped" and "--dino-weights" in torch_row["reason"]
    assert edge_bench(common + ["--json", str(tmp_path / "b.json"), "--dino-weights", str(moved)]) == 0
    torch_row, ort_row = json.loads((tmp_path / "b.json").read_text())["rows"]
    assert torch_row["status"] == ort_row["status"] == "ok", (torch_row["reason"], ort_row["reason"])
    assert ort_row["map_pearson"] > 0.9999 and ort_row["score_max_abs"] < 1e-5


def test_dattn_at_vit_l_size_builds_in_tensorrt(tmp_path):
    """At 1369 patches the exporter no longer folds the diagonal into a constant (it does at the tiny size), so the
    ViT-L graph has its own initializers: every one must be of a type TensorRT imports, and TensorRT-RTX must build
    the D-Attn block (torch.eye had exported as a uint16 arange there and the ViT-L Crane+ engine build failed)."""
    from clipad.export.models.crane_plus import DAttnWeights

    path = tmp_path / "dattn.onnx"
    features = torch.randn(1, 1369, 8)
    torch.onnx.export(DAttnWeights(), (features,), str(path), dynamo=True, opset_version=18, optimize=True)
    graph = onnx.load(str(path))
    importable = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.INT64, onnx.TensorProto.INT32,
                  onnx.TensorProto.BOOL}
    assert {(i.name, i.data_type) for i in graph.graph.initializer if i.data_type not in importable} == set()
    trt = pytest.importorskip("tensorrt_rtx", reason="tensorrt-rtx-cu13 is installed by scripts/setup_env.sh")
    logger = trt.Logger(trt.Logger.ERROR)
    builder = trt.Builder(logger)
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, logger)
    assert parser.parse_from_file(str(path)), [str(parser.get_error(i)) for i in range(parser.num_errors)]
    config = builder.create_builder_config()
    config.num_compute_capabilities = 1
    config.set_compute_capability(trt.ComputeCapability.SM86, 0)
    assert builder.build_serialized_network(network, config) is not None
