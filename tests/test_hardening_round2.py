"""The second hardening round (issue 18): each defect found by trying every command as a careless user would, with
a test that fails on the code before the fix. (Manifest validation: test_manifest.py; class names against the graph
and --save into the source folder: test_hardening.py; Triton: test_triton.py; the narrow overlay: test_render.py.)"""
from __future__ import annotations

import json
import os
import shlex
import shutil

import numpy as np
import pytest
from PIL import Image

from clipad.benchmarks.bench_cli import main as edge_bench
from clipad.benchmarks.eval_cli import main as edge_eval
from clipad.calibration.cli import main as edge_calibrate
from clipad.runtime import detector as detector_module
from clipad.runtime.detect.cli import main as edge_detect
from clipad.runtime.detector import Detector
from clipad.runtime.errors import ClipadError
from clipad.runtime.manifest import ClassCalibration, Manifest
from tiny_fixtures import export_tiny, write_video


@pytest.fixture(scope="module")
def clip_model(tiny_files, tmp_path_factory):
    """Zero-shot CLIP: its decision score is the map maximum, the rule where image and pixel thresholds meet."""
    out = tmp_path_factory.mktemp("r2") / "clip"
    assert export_tiny(tiny_files, out, "clip", ["--dynamic-batch", "1:2", "--no-engine"]) == 0
    return out


def one_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "Traceback" not in err[0], err
    return err[0]


def never_open(monkeypatch):
    """Make opening a model an error: a check that must happen before the first image can prove it did."""
    def refuse(*a, **k):
        raise AssertionError("the model was opened before the arguments were checked")

    monkeypatch.setattr(detector_module.Detector, "open", classmethod(lambda cls, *a, **k: refuse()))


# ---- 3. an NG part always shows where -------------------------------------------------------------------------------
def test_an_ng_part_has_a_region_and_a_mask_even_when_the_resize_lowers_its_peak(clip_model, tmp_path):
    copy = tmp_path / "m"
    shutil.copytree(clip_model, copy)
    rng = np.random.default_rng(5)
    image = rng.integers(0, 256, (23, 31, 3), dtype=np.uint8)      # smaller than the 56 px map: the resize averages
    Image.fromarray(image).save(tmp_path / "part.png")
    with Detector.open(str(copy)) as det:
        peak = det.predict(str(tmp_path / "part.png"), "bottle").map_max

    def at_the_peak(m):   # the part's decision score equals both thresholds: NG by the image rule and the pixel rule
        m.set_class_calibration("fp32", "onnxruntime", "bottle", ClassCalibration(
            decision={}, image_threshold=peak, pixel_threshold=peak, normal_scores=[peak - 1, peak - 0.5],
            display_range=[peak - 1, peak], method="conformal", target_fpr=0.1, images=9, normal="/x",
            images_sha256="0" * 64, created="now"))

    Manifest.update(str(copy), at_the_peak)
    jsonl = tmp_path / "r.jsonl"
    assert edge_detect(["--model", str(copy), "--source", str(tmp_path / "part.png"), "--class-name", "bottle",
                        "--jsonl", str(jsonl), "--save-masks", str(tmp_path / "masks"), "-q"]) == 0
    (row,) = [json.loads(line) for line in jsonl.read_text().splitlines()]
    assert row["label"] == "NG" and row["pixel_label"] == "NG"
    assert row["regions"] and row["regions"][0]["kind"] in ("peak", "defect")
    mask = np.asarray(Image.open(tmp_path / "masks" / "part.png"))
    assert mask.shape == (23, 31) and (mask == 255).sum() == sum(r["area"] for r in row["regions"]) > 0
    assert row["calibration"]["method"] == "conformal"


# ---- 4. 0/1 masks ----------------------------------------------------------------------------------------------------
def test_zero_one_masks_are_read_as_masks_and_counted(clip_model, tmp_path):
    from test_eval import make_dataset

    root = make_dataset(tmp_path / "d", good=3, defect=3)
    folder = root / "part" / "ground_truth" / "scratch"
    for path in sorted(folder.iterdir())[:2]:                  # two of the three masks written as 0/1
        binary = (np.asarray(Image.open(path)) > 127).astype(np.uint8)
        Image.fromarray(binary).save(path)
    faint = sorted(folder.iterdir())[2]                       # the third: values up to 90, neither 0/1 nor 0/255
    Image.fromarray((np.asarray(Image.open(faint)) > 127).astype(np.uint8) * 90).save(faint)
    out = tmp_path / "r.json"
    assert edge_eval(["--model", str(clip_model), "--data", str(root), "--class-map", "part=bottle", "--json",
                      str(out), "--markdown", str(tmp_path / "r.md"), "-q"]) == 0
    report = json.loads(out.read_text())
    assert len(report["masks_01"]) == 2
    assert report["classes"]["part"]["pixel"]["regions"] == 4   # two regions in each of the two 0/1 masks
    warnings = "\n".join(report["warnings"])
    assert "2 mask(s) hold only 0 and 1" in warnings and "mask values go up to 90" in warnings
    assert "hold only 0 and 1" in (tmp_path / "r.md").read_text()


# ---- 6. video overlays keep their Unicode names --------------------------------------------------------------------
def test_differently_named_videos_keep_their_own_overlays(clip_model, tmp_path):
    frames = [np.full((40, 48, 3), 60 * i, np.uint8) for i in range(2)]
    overlays = tmp_path / "ov"
    for name in ("検査", "外観"):
        video = write_video(tmp_path / f"{name}.avi", frames)
        assert edge_detect(["--model", str(clip_model), "--source", video, "--save", str(overlays), "-q"]) == 0
    assert sorted(os.listdir(overlays)) == sorted(f"{n}_{i:06d}.jpg" for n in ("検査", "外観") for i in range(2))


# ---- 7. everything knowable before the first image is checked before it --------------------------------------------
@pytest.mark.parametrize("flag, target, needle", [
    ("--plots", "FILE", "exists and is not a folder"), ("--json", "DIR", "is a folder; give a file name"),
    ("--markdown", "MISSING/x.md", "parent folder"), ("--csv", "DIR", "is a folder"),
])
def test_edge_eval_checks_its_report_paths_first(clip_model, tmp_path, capsys, monkeypatch, flag, target, needle):
    from test_eval import make_dataset

    root = make_dataset(tmp_path / "d", good=2, defect=2)
    (tmp_path / "FILE").write_text("x")
    (tmp_path / "DIR").mkdir()
    never_open(monkeypatch)
    assert edge_eval(["--model", str(clip_model), "--data", str(root), flag, str(tmp_path / target), "-q"]) == 2
    assert needle in one_line(capsys)


@pytest.mark.parametrize("args, needle", [
    (["--json", "DIR"], "is a folder; give a file name"), (["--plot", "MISSING/p.png"], "parent folder"),
    (["--source", "MISSING"], "--source"),
])
def test_edge_bench_checks_its_paths_first(clip_model, tmp_path, capsys, args, needle):
    (tmp_path / "DIR").mkdir()
    args = [str(tmp_path / a) if a.startswith(("DIR", "MISSING")) else a for a in args]
    assert edge_bench(["--model", str(clip_model), "--backends", "onnxruntime", "--precisions", "fp32", *args,
                       "-q"]) == 2
    line = one_line(capsys)
    assert needle in line and "--normal" not in line


def test_edge_bench_takes_a_single_image(clip_model, tmp_path):
    Image.fromarray(np.zeros((30, 30, 3), np.uint8)).save(tmp_path / "one.png")
    out = tmp_path / "b.json"
    assert edge_bench(["--model", str(clip_model), "--backends", "onnxruntime", "--precisions", "fp32", "--source",
                       str(tmp_path / "one.png"), "--iters", "1", "--json", str(out), "-q"]) == 0
    report = json.loads(out.read_text())
    assert report["images"] == 1 and report["rows"][0]["status"] == "ok"


@pytest.mark.parametrize("args, needle", [
    (["--holdout", "0.95", "--target-fpr", "0.3"], "needs at least"),
    (["--target-fpr", "0.01"], "needs at least 99 normal images"),
])
def test_edge_calibrate_knows_too_few_images_before_the_first(clip_model, tmp_path, capsys, monkeypatch, args,
                                                              needle):
    from clipad.calibration.samples import write_samples

    write_samples(str(tmp_path / "n"), count=12, seed=2)
    never_open(monkeypatch)
    assert edge_calibrate(["--model", str(clip_model), "--normal", str(tmp_path / "n"), *args, "-q"]) == 2
    assert needle in one_line(capsys)


# ---- 9. the smaller ones ---------------------------------------------------------------------------------------------
def test_calibrating_int8_does_not_warn_about_int8_cpu(tiny_files, tmp_path, caplog):
    out = tmp_path / "aa"
    assert export_tiny(tiny_files, out, "aaclip", ["--precision", "int8-cpu", "--accept-accuracy-loss",
                                                   "--no-engine"]) == 0
    from clipad.calibration.samples import write_samples

    write_samples(str(tmp_path / "n"), count=12, seed=2)
    assert edge_calibrate(["--model", str(out), "--normal", str(tmp_path / "n"), "--target-fpr", "0.3", "-q"]) == 0
    caplog.clear()   # an fp32 calibration exists: the int8-cpu run used to warn that it would fall back to it
    assert edge_calibrate(["--model", str(out), "--normal", str(tmp_path / "n"), "--target-fpr", "0.3",
                           "--precision", "int8"]) == 0
    said = caplog.text
    assert "no calibration for" not in said and "onnxruntime int8-cpu" in said   # said what ran, did not warn


def test_next_step_commands_are_shell_quoted(tiny_files, tmp_path, capsys):
    out = tmp_path / "with space" / "it's"
    out.parent.mkdir()
    assert export_tiny(tiny_files, out, "clip", ["--precision", "fp16"]) == 0   # no TensorRT build here
    printed = capsys.readouterr().out
    command = next(line.strip() for line in printed.splitlines() if line.strip().startswith("export-engine"))
    assert shlex.split(command)[:3] == ["export-engine", "--from-onnx", str(out)]


def test_a_closed_detector_refuses_to_predict(clip_model):
    image = np.zeros((20, 20, 3), np.uint8)
    with Detector.open(str(clip_model)) as det:
        assert det.predict(image).error is None
    with pytest.raises(ClipadError, match="closed"):
        det.predict(image)


def test_predict_batch_reports_a_missing_path_and_predicts_the_rest(clip_model, tmp_path):
    Image.fromarray(np.zeros((20, 20, 3), np.uint8)).save(tmp_path / "a.png")
    with Detector.open(str(clip_model)) as det:
        good, missing, again = det.predict_batch([str(tmp_path / "a.png"), str(tmp_path / "nope.png"),
                                                  str(tmp_path / "a.png")])
    assert good.error is None and again.error is None and good.score == again.score
    assert "no such image file" in missing.error and missing.label is None and missing.anomaly_map is None
