"""Few-shot memories (issue 22): patch features from every model kind, the few-shot graph against its numpy reference,
edge-calibrate --memory, and what edge-detect does with the memory."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from clipad.calibration import cli as calibrate_cli
from clipad.calibration.samples import write_samples
from clipad.runtime.detect.cli import main as edge_detect
from clipad.runtime.detector import Detector
from clipad.runtime.fewshot import as_loaded
from clipad.runtime.fewshot_reference import fewshot_outputs
from tiny_fixtures import TINY, export_tiny, manifest_json

TAPS = {"aaclip": 4, "crane": 1, "clip": 1, "crane_plus": 3}


def export_with_features(tiny_files, out, kind, dino=None):
    if kind == "crane_plus":
        from clipad.export import cli as export_cli

        return export_cli.main(["--model", "crane_plus", "--arch", TINY, "--image-size", "56", "--ckpt",
                                str(tiny_files["crane"]), "--clip-weights", str(tiny_files["state_dict"]),
                                "--dino-weights", str(dino), "--output", str(out), "-q", "--no-engine",
                                "--memory-features"])
    return export_tiny(tiny_files, out, kind, ["--no-engine", "--memory-features"], classes=("tile",))


@pytest.fixture(scope="module")
def dino_file(tmp_path_factory):
    from clipad.export.models import dinov2

    path = tmp_path_factory.mktemp("dino") / "dinov2_tiny_reg4.pth"
    torch.save(dinov2.random_dino(TINY, 4, seed=2), path)
    return path


@pytest.fixture(scope="module")
def normals(tmp_path_factory):
    folder = tmp_path_factory.mktemp("fs_normals")
    write_samples(str(folder), count=14, seed=3)
    return folder


@pytest.fixture(scope="module")
def aaclip(tiny_files, tmp_path_factory):
    out = tmp_path_factory.mktemp("fs") / "aa"
    assert export_with_features(tiny_files, out, "aaclip") == 0
    return out


def graph_outputs(model_dir, features, memory, amap, score):
    import onnxruntime as ort

    session = ort.InferenceSession(str(model_dir / "fewshot.onnx"), providers=["CPUExecutionProvider"])
    return session.run(None, {"patch_features": features, "memory": memory, "anomaly_map": amap,
                              "image_score": score})


@pytest.mark.parametrize("kind", ["aaclip", "crane", "clip", "crane_plus"])
def test_every_kind_gives_unit_patch_features_and_a_graph_that_matches_numpy(kind, tiny_files, dino_file, normals,
                                                                           tmp_path):
    out = tmp_path / kind
    assert export_with_features(tiny_files, out, kind, dino_file) == 0
    m = manifest_json(out)
    spec = next(o for o in m["outputs"] if o["name"] == "patch_features")
    assert spec["shape"][1:3] == [TAPS[kind], 16] and "fewshot.onnx" in m["files"]
    features_parity = m["parity"]["comparison"]["patch_features"]   # the parity gate compares them too
    assert len(features_parity["cosine"]) == m["parity"]["comparison"]["images"] == 3
    assert features_parity["cosine_min"] >= m["parity"]["limits"]["features_cosine_min"] == 1 - 1e-4
    images = sorted(str(p) for p in normals.iterdir())[:3]
    with Detector.open(str(out), backend="onnxruntime") as det:
        from clipad.runtime.preprocess import prepare

        batch = np.stack([prepare(p, 56) for p in images])
        maps, scores, features = det.run_raw(batch)
    norms = np.linalg.norm(features, axis=-1)
    assert np.allclose(norms, 1, atol=1e-4)          # unit per tap (Crane+'s DINOv2 tap zero-padded to the width)
    memory = features[:2].transpose(1, 0, 2, 3).reshape(TAPS[kind], -1, features.shape[-1])
    memory = as_loaded(memory)        # stored FP16, loaded renormalised
    got = graph_outputs(out, features, memory, maps[:, 0], scores[:, 0])
    want = fewshot_outputs(features, memory, maps[:, 0], scores[:, 0], m["model"]["details"]["fewshot"])
    for g, w in zip(got, want):
        assert np.abs(g - w).max() <= 1e-5
    assert np.abs(got[0][:2]).max() <= 1e-4          # the two images in the memory: few-shot map 0
    assert got[0][2].max() > 1e-3                     # the third is not in it


def test_the_reference_catches_a_wrong_graph(aaclip):
    """The numpy reference is independent: a head with another resize would differ (guards the test above)."""
    recipe = manifest_json(aaclip)["model"]["details"]["fewshot"]
    rng = np.random.default_rng(0)
    features = rng.standard_normal((1, 4, 16, 32)).astype(np.float32)
    features /= np.linalg.norm(features, axis=-1, keepdims=True)
    memory = features[0, :, :8].copy()
    args = (features, memory, np.zeros((1, 56, 56), np.float32), np.zeros(1, np.float32))
    good = fewshot_outputs(*args, recipe)[0]
    wrong = fewshot_outputs(*args, {**recipe, "align_corners": False})[0]
    assert np.abs(graph_outputs(aaclip, *args)[0] - good).max() <= 1e-5 < np.abs(good - wrong).max()


def test_fp16_and_int8_files_keep_the_features(aaclip, tiny_files, tmp_path):
    import shutil

    from clipad.export import cli as export_cli

    copy = tmp_path / "aa"
    shutil.copytree(aaclip, copy)
    assert export_cli.main(["--from-onnx", str(copy), "--precision", "fp16", "--no-engine", "-q"]) == 0
    assert export_cli.main(["--from-onnx", str(copy), "--precision", "int8-cpu", "--no-engine", "-q"]) == 0
    import onnxruntime as ort

    for name in ("model.fp16.onnx", "model.int8-cpu.onnx"):
        session = ort.InferenceSession(str(copy / name), providers=["CPUExecutionProvider"])
        outputs = {o.name: o.type for o in session.get_outputs()}
        assert outputs == {"anomaly_map": "tensor(float)", "image_score": "tensor(float)",
                           "patch_features": "tensor(float)"}, name
    for precision in ("fp16", "int8-cpu"):     # each gate measured how far its features moved
        features = manifest_json(copy)["precisions"][precision]["gate"]["comparison"]["patch_features"]
        assert 0.5 < features["cosine_min"] < 1 and features["cosine_min"] <= features["cosine_mean"] <= 1
    pytest.importorskip("tensorrt_rtx", reason="tensorrt-rtx-cu13 is installed by scripts/setup_env.sh")
    assert export_cli.main(["--from-onnx", str(copy), "--precision", "fp16", "--trt-flavor", "rtx",
                            "--compute-capability", "8.6", "-q"]) == 0   # the engine has the output too
    plan = (copy / manifest_json(copy)["engines"][0]["file"]).read_bytes()
    assert b"patch_features" in plan   # its I/O names are in the plan (reading it back needs a GPU)


def calibrate(*argv):
    return calibrate_cli.main(list(map(str, argv)))


def test_memory_calibration_excludes_memory_images_and_edge_detect_fuses(aaclip, normals, tmp_path):
    import shutil

    model = tmp_path / "m"
    shutil.copytree(aaclip, model)
    assert calibrate("--model", model, "--normal", normals, "--memory", 4, "--holdout", 0, "--target-fpr", 0.2,
                     "-q") == 0
    m = manifest_json(model)
    assert m["schema_version"] == 7
    cal = m["calibrations"][0]["classes"]["tile"]
    record = cal["memory"]
    assert cal["decision"]["rule"] == "fused" and cal["images"] == 14 - 4 and record["images"] == 4
    assert record["rows"] == 4 * 16 and record["taps"] == 4 and record["coreset"] is None
    assert (model / record["file"]).is_file() and record["model_sha256"] == m["files"]["model.onnx"]["sha256"]
    bank = np.load(model / record["file"], allow_pickle=False)
    assert bank.dtype == np.float16 and bank.shape == (4, 64, 32)

    jsonl, maps = tmp_path / "r.jsonl", tmp_path / "maps"
    assert edge_detect(["--model", str(model), "--source", str(normals), "--jsonl", str(jsonl), "--save-maps",
                        str(maps), "-q"]) == 0
    rows = [json.loads(line) for line in jsonl.read_text().splitlines()]
    from clipad.calibration.memory import file_sha256

    in_memory = set(record["image_sha256s"])
    for row in rows:
        stem = os.path.splitext(os.path.basename(row["source"]))[0]
        fused, fewshot = np.load(maps / f"{stem}.npy"), np.load(maps / f"{stem}.fewshot.npy")
        assert row["label"] in ("OK", "NG") and row["fewshot_max"] == pytest.approx(float(fewshot.max()), abs=1e-6)
        assert row["map_max"] == pytest.approx(float(fused.max()), abs=1e-6)
        if file_sha256(row["source"]) in in_memory:
            assert row["fewshot_max"] <= 1e-4
        else:
            assert row["fewshot_max"] > 1e-3
    assert sum(file_sha256(r["source"]) in in_memory for r in rows) == 4

    # a new calibration without a memory replaces it, and its file goes; its thresholds are the zero-shot ones, the
    # same as on a copy that never had a memory (never fitted on fused outputs)
    assert calibrate("--model", model, "--normal", normals, "--holdout", 0, "--target-fpr", 0.2, "-q") == 0
    assert not (model / record["file"]).exists()
    plain = manifest_json(model)["calibrations"][0]["classes"]["tile"]
    fresh = tmp_path / "fresh"
    shutil.copytree(aaclip, fresh)
    assert calibrate("--model", fresh, "--normal", normals, "--holdout", 0, "--target-fpr", 0.2, "-q") == 0
    never = manifest_json(fresh)["calibrations"][0]["classes"]["tile"]
    assert plain.get("memory") is None and plain["decision"] == never["decision"]
    assert plain["image_threshold"] == never["image_threshold"] and plain["normal_scores"] == never["normal_scores"]


def test_coreset_keeps_the_share_and_covers_every_cluster():
    from clipad.calibration.memory import greedy_coreset, make_bank

    rng = np.random.default_rng(0)
    centres = rng.standard_normal((5, 32)) * 10
    points = np.concatenate([c + rng.standard_normal((200, 32)) * 0.1 for c in centres]).astype(np.float32)
    chosen = greedy_coreset(points, 5, seed=1)
    assert sorted(set(chosen // 200)) == [0, 1, 2, 3, 4]          # one per cluster: the farthest-point rule
    features = rng.standard_normal((3, 2, 16, 8)).astype(np.float32)
    assert make_bank(features, 0.1, 0, True).shape == (2, 5, 8)   # ceil(0.1 · 48)
    assert make_bank(features, None, 0, True).shape == (2, 48, 8)


def test_stale_or_tampered_memory_is_refused_in_one_line(aaclip, normals, tmp_path, capsys):
    import shutil

    model = tmp_path / "m"
    shutil.copytree(aaclip, model)
    assert calibrate("--model", model, "--normal", normals, "--memory", 3, "--coreset", 0.5, "--holdout", 0,
                     "--target-fpr", 0.2, "-q") == 0
    data = json.loads((model / "manifest.json").read_text())
    record = data["calibrations"][0]["classes"]["tile"]["memory"]
    assert record["rows"] == 24 and record["coreset"] == 0.5
    stale = json.loads(json.dumps(data))
    stale["calibrations"][0]["classes"]["tile"]["memory"]["model_sha256"] = "0" * 64
    (model / "manifest.json").write_text(json.dumps(stale))
    capsys.readouterr()
    assert edge_detect(["--model", str(model), "--source", str(normals), "-q"]) == 2
    assert "few-shot memory is stale" in capsys.readouterr().err
    (model / "manifest.json").write_text(json.dumps(data))
    with open(model / record["file"], "r+b") as fh:
        fh.seek(-4, 2)
        fh.write(b"\0\0\0\0")
    assert edge_detect(["--model", str(model), "--source", str(normals), "-q"]) == 2
    err = capsys.readouterr().err
    assert "sha256 does not match" in err and "Traceback" not in err


@pytest.mark.parametrize("argv, message", [
    (["--memory", "3", "--memory-from", "X"], "give one"),
    (["--memory", "0"], "must be at least 1"),
    (["--memory", "99"], "only 14 normal image(s)"),
    (["--memory", "3", "--coreset", "1.5"], "a share in (0, 1]"),
    (["--coreset", "0.1"], "give --memory K"),
])
def test_memory_options_fail_in_one_line_before_any_image_runs(aaclip, normals, argv, message, capsys):
    assert calibrate("--model", aaclip, "--normal", normals, *argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not [f for f in os.listdir(aaclip) if f.startswith("memory-")]


def test_memory_needs_an_export_with_features(tiny_files, normals, tmp_path, capsys):
    out = tmp_path / "plain"
    assert export_tiny(tiny_files, out, "clip", ["--no-engine"], classes=("tile",)) == 0
    assert calibrate("--model", out, "--normal", normals, "--memory", 2) == 2
    assert "re-export with export-engine … --memory-features" in capsys.readouterr().err


def test_edge_eval_reports_zero_shot_few_shot_and_fused_side_by_side(aaclip, tmp_path):
    import shutil

    from PIL import Image
    from sklearn.metrics import roc_auc_score

    from clipad.benchmarks.eval_cli import main as edge_eval
    from test_eval import make_dataset

    data = make_dataset(tmp_path / "data")
    train = data / "part" / "train" / "good"
    rng = np.random.default_rng(5)
    for i in range(3):
        Image.fromarray(np.clip(rng.normal(120, 12, (70, 90, 3)), 0, 255).astype(np.uint8)).save(train / f"t{i}.png")
    leaked = data / "part" / "test" / "good" / "000.png"
    shutil.copy(leaked, train / "copy_of_a_test_image.png")   # never goes into the memory

    def run(*extra):
        out = tmp_path / "r.json"
        rc = edge_eval(["--model", str(aaclip), "--data", str(data), "--json", str(out), "-q", *extra])
        return rc, (json.loads(out.read_text()) if rc == 0 else None)

    assert run("--fewshot", "4")[0] == 2            # only 3 train images are not test images
    rc, report = run("--fewshot", "3", "--save-maps", str(tmp_path / "maps"))
    assert rc == 0
    fs = report["fewshot"]
    part = fs["classes"]["part"]
    assert fs["k"] == 3 and part["memory_images"] == 3 and part["zero_shot"] == report["classes"]["part"]
    rows = report["images"]
    labels = [r["label"] == "defect" for r in rows]
    assert part["fused"]["image"]["auroc"] == pytest.approx(roc_auc_score(labels, [r["fused_score"] for r in rows]))
    assert part["few_shot"]["image"]["auroc"] == pytest.approx(
        roc_auc_score(labels, [r["fewshot_max"] for r in rows]))
    assert part["fused"]["decision"]["score"] == "fused" and part["few_shot"]["decision"]["score"] == "map_max"
    copied = next(r for r in rows if r["path"] == str(leaked))
    assert copied["fewshot_max"] > 1e-3             # its copy in train/good was left out of the memory
    saved = tmp_path / "maps" / "part" / "good"
    assert float(np.load(saved / "000.fewshot.npy").max()) == pytest.approx(copied["fewshot_max"], rel=1e-5)
    fused, zero_shot = np.load(saved / "000.fused.npy"), np.load(saved / "000.npy")
    assert fused.shape == zero_shot.shape and not np.allclose(fused, zero_shot)
    assert run("--fewshot", "2", "--compare", "int8")[0] == 2


def test_fewshot_graph_runs_on_openvino_and_builds_in_tensorrt_rtx(aaclip):
    from clipad.runtime.fewshot import OpenVINOFewShotGraph
    from clipad.runtime.manifest import Manifest

    manifest = Manifest.read(str(aaclip))
    recipe = manifest.model.details["fewshot"]
    rng = np.random.default_rng(1)
    features = rng.standard_normal((2, 4, 16, 32)).astype(np.float32)
    features /= np.linalg.norm(features, axis=-1, keepdims=True)
    memory = as_loaded(features[1].copy())
    args = (features, memory, rng.uniform(0, 1, (2, 56, 56)).astype(np.float32), np.array([0.3, 0.6], np.float32))
    got = OpenVINOFewShotGraph(str(aaclip), manifest).run(*args)
    for g, w in zip(got, fewshot_outputs(*args, recipe)):
        assert np.abs(g - w).max() <= 1e-5
    assert got[0][1].max() <= 1e-4

    trt = pytest.importorskip("tensorrt_rtx", reason="tensorrt-rtx-cu13 is installed by scripts/setup_env.sh")
    logger = trt.Logger(trt.Logger.ERROR)
    builder = trt.Builder(logger)
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, logger)
    assert parser.parse_from_file(str(aaclip / "fewshot.onnx"))
    config = builder.create_builder_config()
    profile = builder.create_optimization_profile()
    for name, low, high in (("patch_features", (1, 4, 16, 32), (4, 4, 16, 32)), ("memory", (4, 1, 32), (4, 4096, 32)),
                            ("anomaly_map", (1, 56, 56), (4, 56, 56)), ("image_score", (1,), (4,))):
        profile.set_shape(name, low, low, high)
    config.add_optimization_profile(profile)
    config.num_compute_capabilities = 1
    config.set_compute_capability(trt.ComputeCapability.SM86, 0)
    plan = builder.build_serialized_network(network, config)
    assert plan is not None and plan.nbytes > 0


def test_triton_python_flavor_carries_the_memory_and_the_others_drop_its_thresholds(aaclip, normals, tmp_path):
    import shutil

    from clipad.export import cli as export_cli
    from clipad.runtime.manifest import Manifest
    from clipad.runtime.preprocess import prepare
    from clipad.runtime.serving.triton_models import OnnxModel

    model = tmp_path / "m"
    shutil.copytree(aaclip, model)
    assert calibrate("--model", model, "--normal", normals, "--memory", 3, "--holdout", 0, "--target-fpr", 0.2,
                     "-q") == 0
    repo = tmp_path / "repo"
    for flavor in ("python", "onnxruntime"):
        assert export_cli.main(["--from-onnx", str(model), "--triton-repo", str(repo), "--triton-name", flavor,
                                "--triton-backend", flavor, "-q"]) == 0
    python_version = repo / "python" / "1"
    memory_file = manifest_json(model)["calibrations"][0]["classes"]["tile"]["memory"]["file"]
    assert {"fewshot.onnx", memory_file} <= set(os.listdir(python_version))
    served = OnnxModel()
    served.initialize({"model_repository": str(repo / "python"), "model_version": "1", "model_config": "{}"})
    images = np.stack([prepare(str(p), 56) for p in sorted(normals.iterdir())[:4]])
    try:
        got = served.compute(images)
    finally:
        served.finalize()
    with Detector.open(str(model), backend="onnxruntime") as local:
        maps, scores = local.run(images)
    assert np.allclose(got["anomaly_map"], maps, atol=1e-6) and np.allclose(got["image_score"], scores, atol=1e-6)
    # the onnxruntime flavor serves the plain model: no fused thresholds to misapply in its post model
    from clipad.export.triton_repo import served_manifest

    full = Manifest.read(str(model))
    assert full.calibrations[0].classes["tile"].memory is not None
    served = served_manifest(full, "python", "fp32").calibrations
    assert len(served) == 1 and served[0].backend == "onnxruntime" and served[0].classes["tile"].memory is not None
    assert served_manifest(full, "onnxruntime", "fp32").calibrations == []


def test_edge_bench_times_the_fewshot_step(aaclip, tmp_path, capsys):
    from clipad.benchmarks.bench_cli import main as edge_bench

    out = tmp_path / "b.json"
    assert edge_bench(["--model", str(aaclip), "--backends", "onnxruntime,openvino", "--precisions", "fp32",
                       "--fewshot", "4", "--coreset", "0.5", "--iters", "2", "--no-ceiling", "--json", str(out),
                       "-q"]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [r["status"] for r in rows] == ["ok", "ok"]
    for r in rows:
        assert r["fewshot_rows"] == 32 and r["stages_ms"]["fewshot"] > 0 and r["fewshot_rss_mb"] is not None
    assert "few-shot step" in capsys.readouterr().out
    assert edge_bench(["--model", str(aaclip), "--coreset", "0.1", "-q"]) == 2


def test_a_station_reload_brings_the_new_memory_with_its_thresholds(aaclip, normals, tmp_path):
    """edge-calibrate --memory on a running station: the reload swaps in the memory with the fused thresholds (never
    fused thresholds over zero-shot outputs)."""
    import shutil
    from types import SimpleNamespace

    from clipad.runtime.preprocess import prepare
    from clipad.runtime.station.station import Station

    model = tmp_path / "m"
    shutil.copytree(aaclip, model)
    image = prepare(str(sorted(normals.iterdir())[0]), 56)[None]
    with Detector.open(str(model), backend="onnxruntime") as detector:
        assert detector.fewshot is None and detector.predict_prepared(image, "tile")[0].fewshot_max is None
        assert calibrate("--model", model, "--normal", normals, "--memory", 3, "--holdout", 0, "--target-fpr", 0.2,
                         "-q") == 0
        station = SimpleNamespace(model_dir=str(model), detector=detector, _model_sha=None, _manifest_seen=None,
                                  _manifest_stamp=lambda: "changed", state=SimpleNamespace(notes={}, cameras={}))
        Station._reload_if_changed(station)
        assert station.state.notes == {} and detector.fewshot is not None
        pred = detector.predict_prepared(image, "tile")[0]
        assert pred.fewshot_max is not None and detector.policy.rule_for("tile") == "fused"


def test_a_memory_too_big_for_this_machine_is_refused_before_it_runs(aaclip, normals, capsys):
    assert calibrate("--model", aaclip, "--normal", normals, "--memory", 10 ** 9) == 2
    err = capsys.readouterr().err
    assert "over a quarter of this machine" in err and "Traceback" not in err


def test_another_precisions_memory_thresholds_are_not_borrowed(aaclip, normals, tmp_path, caplog):
    import shutil

    from clipad.export import cli as export_cli

    model = tmp_path / "m"
    shutil.copytree(aaclip, model)
    assert export_cli.main(["--from-onnx", str(model), "--precision", "fp16", "--no-engine", "-q"]) == 0
    assert calibrate("--model", model, "--normal", normals, "--memory", 3, "--holdout", 0, "--target-fpr", 0.2,
                     "-q") == 0
    with Detector.open(str(model), backend="onnxruntime", precision="fp16") as det:
        assert det.fewshot is None and det.policy.class_calibration("tile") is None
    assert "fitted with a few-shot memory of fp32 features" in caplog.text


def test_fewshot_runs_in_chunks_and_only_for_the_classes_asked(aaclip):
    from clipad.runtime.fewshot import FewShot, FewShotGraph
    from clipad.runtime.manifest import Manifest

    rng = np.random.default_rng(2)
    features = rng.standard_normal((5, 4, 16, 32)).astype(np.float32)
    features /= np.linalg.norm(features, axis=-1, keepdims=True)
    few = FewShot(FewShotGraph(str(aaclip), Manifest.read(str(aaclip))), {"tile": as_loaded(features[0])})
    maps, scores = rng.uniform(0, 1, (5, 1, 56, 56)).astype(np.float32), rng.uniform(0, 1, (5, 1)).astype(np.float32)
    whole = [maps.copy(), scores.copy()]
    one = few.apply(["tile"], whole[0], whole[1], features, None, chunk=5)
    parts = [maps.copy(), scores.copy()]
    two = few.apply(["tile"], parts[0], parts[1], features, {0}, chunk=2)
    assert np.array_equal(one[0], two[0]) and np.array_equal(whole[0], parts[0]) and np.array_equal(whole[1], parts[1])
    untouched = [maps.copy(), scores.copy()]
    assert few.apply(["tile"], untouched[0], untouched[1], features, set(), chunk=2) == {}
    assert np.array_equal(untouched[0], maps)


def test_triton_configs_declare_the_features_output(aaclip, tmp_path):
    from clipad.export import cli as export_cli

    repo = tmp_path / "repo"
    assert export_cli.main(["--from-onnx", str(aaclip), "--triton-repo", str(repo), "--triton-name", "aa",
                            "--triton-backend", "onnxruntime", "-q"]) == 0
    config = (repo / "aa" / "config.pbtxt").read_text()
    assert 'name: "patch_features"' in config and "dims: [ 4, 16, 32 ]" in config.replace(",  ", ", ")
