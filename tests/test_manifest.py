"""The typed manifest schema: round trip, one-line errors for bad documents, file names confined to the model
folder, and an export written by the previous release (schema 1, checked in) that still reads, runs and upgrades."""
from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest

from clipad.export import cli as export_cli
from clipad.runtime.detect.cli import main as edge_detect
from clipad.runtime.detector import Detector
from clipad.runtime.errors import ClipadError
from clipad.runtime.manifest import SCHEMA_VERSION, Manifest
from conftest import REPO

RELEASE_0_1_0 = REPO / "tests" / "data" / "release-0.1.0-aaclip-tiny"


@pytest.fixture
def old_export(tmp_path):
    copy = tmp_path / "old"
    shutil.copytree(RELEASE_0_1_0, copy)
    return copy


def test_previous_release_manifest_reads_typed():
    m = Manifest.read(str(RELEASE_0_1_0))
    assert m.model.kind == "aaclip" and m.class_names == ["bottle", "screw"] and m.image_size == 56
    assert m.model.prompt_names == ["dark bottle", "screw"] and m.model.domain == "industrial"
    assert m.model.details["checkpoint_epoch"] == 7 and m.model.details["blur"] == [7, 1.0]
    assert m.parity.passed and m.parity.reference == "torch" and m.parity.comparison.images == 3
    assert m.parity.comparison.anomaly_map.max_abs == pytest.approx(4.76837158203125e-06)
    assert m.parity.limits.map_error_over_range == 1e-4 and m.parity.limits.score_max_abs == 1e-5
    fp16 = m.precisions["fp16"]
    assert fp16.gate.passed and fp16.gate.limits.map_pearson_min == 0.999
    assert fp16.gate.comparison.map_pearson_min > 0.999 and "fp32_ops" in fp16.conversion
    (engine,) = m.engines
    assert engine.file == "model.fp16.rtx-sm86.engine" and engine.target.compute_capability == "8.6"
    assert engine.batch.min == engine.batch.max == 1
    assert m.files["model.onnx"].precision == "fp32"


def test_previous_release_export_runs(old_export, tmp_path):
    image = np.random.default_rng(0).integers(0, 256, (40, 60, 3), dtype=np.uint8)
    with Detector.open(str(old_export)) as det:
        pred = det.predict(image, class_name="screw")
    assert pred.anomaly_map.shape == (56, 56) and np.isfinite(pred.score)
    from PIL import Image

    Image.fromarray(image).save(tmp_path / "x.png")
    jsonl = tmp_path / "r.jsonl"
    assert edge_detect(["--model", str(old_export), "--source", str(tmp_path / "x.png"), "--class-name", "screw",
                        "--jsonl", str(jsonl), "-q"]) == 0
    assert json.loads(jsonl.read_text())["score"] == pytest.approx(pred.score, abs=0)


def test_previous_release_export_upgrades_on_the_next_write(old_export, calib_dir):
    before = json.loads((old_export / "manifest.json").read_text())
    assert before["schema_version"] == 1
    assert export_cli.main(["--from-onnx", str(old_export), "--precision", "int8", "--calib-data", str(calib_dir),
                            "--accept-accuracy-loss", "--no-engine", "-q"]) == 0
    after = json.loads((old_export / "manifest.json").read_text())
    assert after["schema_version"] == SCHEMA_VERSION
    assert after["model"]["details"]["checkpoint_epoch"] == 7 and after["export"] == before["export"]
    assert set(after["precisions"]) == {"fp16", "int8"} and "model.int8.onnx" in after["files"]
    assert Manifest.read(str(old_export)).to_dict() == after


def test_round_trip_keeps_unknown_keys(old_export):
    m = Manifest.read(str(old_export))
    data = m.to_dict()
    data["from_a_newer_writer"] = {"kept": True}
    data["calibrations"] = [{"precision": "fp32", "backend": "onnxruntime", "classes": {"bottle": {
        "decision": {"p_min": 0.0, "p_max": 1.0, "i_min": 0.0, "i_max": 1.0}, "image_threshold": 0.7,
        "pixel_threshold": 1.5, "normal_scores": [0.1, 0.2], "display_range": [0.0, 1.5], "method": "conformal",
        "target_fpr": 0.01, "images": 99, "normal": "/x", "images_sha256": "0" * 64, "created": "now",
        "new_field": 3}}}]
    again = Manifest.from_dict(json.loads(json.dumps(data)))
    bottle = again.calibrations[0].classes["bottle"]
    assert bottle.image_threshold == 0.7 and bottle.extra == {"new_field": 3}
    out = again.to_dict()
    assert out["from_a_newer_writer"] == {"kept": True} and out["calibrations"][0]["classes"]["bottle"]["new_field"] == 3
    assert Manifest.from_dict(out).to_dict() == out


def bad(data: dict, path: list, value):
    data = json.loads(json.dumps(data))
    node = data
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    return data


@pytest.mark.parametrize("path, value, message", [
    (["batch", "min"], "1", "manifest.batch.min: expected an integer"),
    (["batch", "min"], 0, "need 1 <= min <= opt <= max"),
    (["model", "class_names"], [], "class_names: empty"),
    (["engines", 0, "file"], "../../etc/passwd", "not a plain file name inside the model folder"),
    (["engines", 0, "file"], "/tmp/x.engine", "not a plain file name"),
    (["files"], {"model.onnx": {"sha256": "x", "bytes": 1, "precision": "fp32"},
                 "sub/dir.onnx": {"sha256": "x", "bytes": 1, "precision": "fp16"}}, "not a plain file name"),
    (["files"], {}, "no model.onnx entry"),
    (["engines", 0, "target"], None, "manifest.engines[0].target: expected an object"),
    (["engines", 0, "unexpected"], 1, "unknown field(s) unexpected"),
    (["schema_version"], 99, "newer than this clipad-edge supports"),
    (["schema_version"], "2", "is not a version number"),
    (["calibrations"], [{"precision": "fp32"}], "manifest.calibrations[0]: missing backend"),
    (["calibrations"], [{"precision": "fp17", "backend": "onnxruntime", "classes": {}}], "unknown precision 'fp17'"),
    (["files", "model.onnx", "precision"], "int4", "manifest.files.model.onnx.precision: unknown precision 'int4'"),
    (["model", "decision_score"], "bogus", "model.decision_score: unknown rule 'bogus'"),
    (["model", "class_names"], ["bottle"], "does not fit 1 class name(s) ['bottle']"),
    (["model", "class_names"], ["bottle", "bottle"], "a name appears twice"),
    (["files"], ["model.onnx"], "manifest.files: expected an object"),
    (["schema_version"], 0, "is not a version number"),
    (["model", "class_names"], None, "manifest.model.class_names: expected a list"),
    (["input", "shape"], "518", "manifest.input.shape: expected a list"),
])
def test_bad_manifests_are_one_line_errors(path, value, message):
    data = Manifest.read(str(RELEASE_0_1_0)).to_dict()
    with pytest.raises(ClipadError) as err:
        Manifest.from_dict(bad(data, path, value), "x/manifest.json")
    text = str(err.value)
    assert message in text and "\n" not in text and text.startswith("x/manifest.json")


@pytest.mark.parametrize("path", [["model", "class_names"], ["input", "shape"], ["model"], ["files"]])
def test_missing_nested_keys_are_one_line_errors(path):
    data = Manifest.read(str(RELEASE_0_1_0)).to_dict()
    node = data
    for key in path[:-1]:
        node = node[key]
    del node[path[-1]]
    with pytest.raises(ClipadError, match=f"missing {path[-1]}"):
        Manifest.from_dict(data, "x/manifest.json")


def test_written_manifest_is_strict_json_and_honours_the_umask(old_export):
    m = Manifest.read(str(old_export))
    m.parity.comparison.map_pearson_min = float("nan")   # never written as a bare NaN
    m.write(str(old_export))
    text = (old_export / "manifest.json").read_text()
    json.loads(text, parse_constant=lambda c: (_ for _ in ()).throw(ValueError(c)))
    assert '"map_pearson_min": null' in text
    umask = os.umask(0)
    os.umask(umask)
    assert (os.stat(old_export / "manifest.json").st_mode & 0o777) == (0o666 & ~umask)
    assert not [f for f in os.listdir(old_export) if f.startswith(".")]


SCHEMA2 = REPO / "tests" / "data" / "schema2-aaclip-tiny"


def calibrated(data: dict) -> dict:
    """``data`` (a schema-3 document) with one valid calibration for class screw."""
    data = json.loads(json.dumps(data))
    data["calibrations"] = [{"precision": "fp32", "backend": "onnxruntime", "classes": {"screw": {
        "decision": {"p_min": 0.0, "p_max": 2.0, "i_min": 0.1, "i_max": 0.9}, "image_threshold": 0.7,
        "pixel_threshold": 1.5, "normal_scores": [0.1, 0.2], "display_range": [0.0, 1.5], "method": "conformal",
        "target_fpr": 0.2, "images": 9, "normal": "/x", "images_sha256": "0" * 64, "created": "now"}}}]
    return data


@pytest.mark.parametrize("key, value", [
    ("image_threshold", float("nan")), ("image_threshold", float("inf")), ("pixel_threshold", float("-inf")),
    ("normal_scores", [0.1, float("nan")]), ("display_range", [0.0, float("inf")]), ("target_fpr", float("nan")),
    ("target_fpr", 1.5), ("decision", {"p_min": float("nan"), "p_max": 2.0, "i_min": 0.1, "i_max": 0.9}),
    ("decision", {"p_min": 0.0, "p_max": 2.0, "i_min": 0.1}), ("decision", {"p_min": 3.0, "p_max": 2.0,
                                                                             "i_min": 0.1, "i_max": 0.9}),
    ("decision", {"rule": "bogus", "p_min": 0.0, "p_max": 2.0, "i_min": 0.1, "i_max": 0.9}),
])
def test_every_decision_number_must_be_finite_after_parsing(key, value):
    """Whatever the JSON spelled (NaN, Infinity, 1e999): a non-finite or inconsistent decision number makes the
    manifest invalid, one line."""
    data = calibrated(Manifest.read(str(RELEASE_0_1_0)).to_dict())
    assert Manifest.from_dict(json.loads(json.dumps(data)))   # the valid one reads
    data["calibrations"][0]["classes"]["screw"][key] = value
    with pytest.raises(ClipadError) as err:
        Manifest.from_dict(json.loads(json.dumps(data)), "x/manifest.json")
    assert "invalid manifest" in str(err.value) and "\n" not in str(err.value)


def test_1e999_in_the_file_is_refused(old_export, capsys):
    data = calibrated(Manifest.read(str(old_export)).to_dict())
    text = json.dumps(data).replace('"image_threshold": 0.7', '"image_threshold": 1e999')
    (old_export / "manifest.json").write_text(text)
    assert edge_detect(["--model", str(old_export), "--source", str(RELEASE_0_1_0 / "README.md"), "-q"]) == 2
    err = capsys.readouterr().err
    assert "image_threshold: must be a finite number" in err and err.count("\n") == 1


def test_schema2_export_reads_upgraded():
    """Schema 2 stored the CPU INT8 file as int8 + target cpu and one description per precision x backend."""
    m = Manifest.read(str(SCHEMA2))
    assert json.loads((SCHEMA2 / "manifest.json").read_text())["schema_version"] == 2
    assert m.files["model.int8-cpu.onnx"].precision == "int8-cpu"
    assert m.model.decision_score == "aaclip_industrial"
    by_precision = {c.precision: c for c in m.calibrations}
    bottle = by_precision["int8-cpu"].classes["bottle"]
    assert bottle.method == "conformal" and bottle.target_fpr == 0.2 and bottle.images == 10
    assert "rule" not in bottle.decision and "provenance_upgraded" in bottle.extra
    assert by_precision["fp32"].classes["bottle"].method == "meanstd"


def test_schema2_export_runs_and_upgrades_on_the_next_write(tmp_path):
    copy = tmp_path / "s2"
    shutil.copytree(SCHEMA2, copy)
    image = np.random.default_rng(0).integers(0, 256, (40, 60, 3), dtype=np.uint8)
    with Detector.open(str(copy), backend="onnxruntime", precision="int8") as det:
        assert det.backend.precision == "int8-cpu"          # the CPU file, picked for int8 on a CPU
        pred = det.predict(image)
        assert pred.label in ("OK", "NG") and pred.calibration["method"] == "conformal"
    Manifest.update(str(copy), lambda m: None)
    stored = json.loads((copy / "manifest.json").read_text())
    assert stored["schema_version"] == SCHEMA_VERSION == 7
    assert stored["files"]["model.int8-cpu.onnx"]["precision"] == "int8-cpu"
    assert "target" not in stored["files"]["model.int8-cpu.onnx"]


def test_a_newer_schema_read_by_an_older_runtime_says_newer(monkeypatch, tmp_path):
    """What a user of the previous release sees: the version check comes first, one line."""
    from clipad.runtime import manifest as manifest_module

    copy = tmp_path / "s2"
    shutil.copytree(SCHEMA2, copy)
    Manifest.update(str(copy), lambda m: None)
    monkeypatch.setattr(manifest_module, "SCHEMA_VERSION", 6)
    with pytest.raises(ClipadError, match="schema_version 7 is newer than this clipad-edge supports"):
        Manifest.read(str(copy))


def test_rewrite_keeps_the_files_mode(tmp_path):
    for mode in (0o600, 0o444, 0o640):
        copy = tmp_path / f"m{mode:o}"
        shutil.copytree(SCHEMA2, copy)
        os.chmod(copy / "manifest.json", mode)
        Manifest.update(str(copy), lambda m: None)
        assert os.stat(copy / "manifest.json").st_mode & 0o777 == mode
