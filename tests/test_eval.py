"""edge-eval on a tiny model and a small synthetic test set in MVTec AD layout: the numbers against sklearn on the
saved maps, --compare, the random-weights note, plots, and every bad input."""
from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
from PIL import Image, ImageDraw
from sklearn.metrics import average_precision_score, roc_auc_score

from clipad.benchmarks.eval_cli import main as edge_eval
from clipad.calibration.cli import main as edge_calibrate
from clipad.calibration.samples import write_samples
from tiny_fixtures import export_tiny


def make_dataset(root, cls="part", good=5, defect=5, seed=0):
    rng = np.random.default_rng(seed)
    for sub in ("test/good", "test/scratch", "ground_truth/scratch", "train/good"):
        (root / cls / sub).mkdir(parents=True, exist_ok=True)
    for i in range(good):
        Image.fromarray(np.clip(rng.normal(120, 12, (70, 90, 3)), 0, 255).astype(np.uint8)).save(
            root / cls / "test" / "good" / f"{i:03d}.png")
    for i in range(defect):
        im = Image.fromarray(np.clip(rng.normal(120, 12, (70, 90, 3)), 0, 255).astype(np.uint8))
        mask = Image.new("L", (90, 70))
        for box in ([5 + 9 * i, 10, 30 + 9 * i, 22], [60, 40 + i, 80, 60]):   # two regions per image
            ImageDraw.Draw(im).rectangle(box, fill=(240, 240, 240))
            ImageDraw.Draw(mask).rectangle(box, fill=255)
        im.save(root / cls / "test" / "scratch" / f"{i:03d}.png")
        mask.save(root / cls / "ground_truth" / "scratch" / f"{i:03d}_mask.png")
    return root


@pytest.fixture(scope="module")
def model(tiny_files, tmp_path_factory, calib_dir):
    root = tmp_path_factory.mktemp("eval")
    out = root / "aa"
    assert export_tiny(tiny_files, out, "aaclip", ["--precision", "int8", "--calib-data", str(calib_dir),
                                                   "--accept-accuracy-loss", "--no-engine"]) == 0
    normal = root / "normal"
    write_samples(str(normal), count=25, seed=8)
    for precision in ("fp32", "int8"):   # the defect-free samples only (every second one has a drawn defect)
        assert edge_calibrate(["--model", str(out), "--normal", str(normal / "*_good.png"), "--target-fpr", "0.2",
                               "--precision", precision, "-q"]) == 0
    return out


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("data"))


def run(model, data, tmp_path, *extra):
    out = tmp_path / "r.json"
    rc = edge_eval(["--model", str(model), "--data", str(data), "--class-map", "part=screw", "--json", str(out),
                    "-q", *extra])
    return rc, (json.loads(out.read_text()) if out.exists() else None)


def test_numbers_match_sklearn_on_the_saved_maps(model, data, tmp_path):
    rc, report = run(model, data, tmp_path, "--save-maps", str(tmp_path / "maps"), "--csv", str(tmp_path / "r.csv"),
                     "--markdown", str(tmp_path / "r.md"))
    assert rc == 0
    part = report["classes"]["part"]
    assert part["n_good"] == 5 and part["n_defect"] == 5 and report["random_weights"] is False
    rows = report["images"]
    assert len(rows) == 10 and {r["pred"] for r in rows} <= {"OK", "NG"}
    labels = [r["label"] == "defect" for r in rows]
    scores = [r["decision_score"] for r in rows]
    assert part["image"]["auroc"] == pytest.approx(roc_auc_score(labels, scores))
    assert part["image"]["ap"] == pytest.approx(average_precision_score(labels, scores))
    maps, masks = [], []
    for r in rows:
        maps.append(np.load(tmp_path / "maps" / "part" / r["defect"] / (os.path.basename(r["path"])[:-4] + ".npy")))
        if r["defect"] == "good":
            masks.append(np.zeros((56, 56), bool))
        else:
            m = np.asarray(Image.open(data / "part" / "ground_truth" / "scratch" /
                                      (os.path.basename(r["path"])[:-4] + "_mask.png"))) > 127
            masks.append(np.asarray(Image.fromarray(m.astype(np.uint8)).resize((56, 56), Image.NEAREST), bool))
    flat_maps, flat_masks = np.concatenate([m.ravel() for m in maps]), np.concatenate([m.ravel() for m in masks])
    assert part["pixel"]["auroc"] == pytest.approx(roc_auc_score(flat_masks, flat_maps), abs=1e-3)
    assert part["pixel"]["ap"] == pytest.approx(average_precision_score(flat_masks, flat_maps), abs=1e-3)
    assert part["pixel"]["regions"] == 10 and 0 <= part["pixel"]["aupro"] <= 1
    d = part["decision"]
    assert d["constants_from"].startswith("calibration") and d["threshold"] is not None
    good_ng = sum(r["pred"] == "NG" for r in rows if r["label"] == "good")
    assert d["false_alarm_rate"] == pytest.approx(good_ng / 5)
    assert (tmp_path / "r.csv").read_text().splitlines()[0].startswith("class,good,defect,img AUROC")
    assert "| part | 5 | 5 |" in (tmp_path / "r.md").read_text()


def test_compare_int8(model, data, tmp_path):
    rc, report = run(model, data, tmp_path, "--compare", "int8", "--plots", str(tmp_path / "plots"))
    assert rc == 0
    comp = report["compare"]["classes"]["part"]
    assert "int8" in report["compare"]["candidate"]
    assert comp["image"]["auroc"] == pytest.approx(comp["candidate"]["image"]["auroc"]
                                                   - report["classes"]["part"]["image"]["auroc"])
    assert 0.9 < comp["map_pearson_min"] <= 1 and comp["ok_ng_images"] == 10
    assert comp["candidate"]["decision"]["precision"] == "int8"
    assert sorted(os.listdir(tmp_path / "plots")) == ["part_curves.png", "part_worst.png"]
    # The agreement, cross-checked through another path: edge-detect on the same images at each precision, each
    # with its own calibration, gives the labels whose agreement edge-eval reports.
    from clipad.runtime.detect.cli import main as edge_detect

    labels = {}
    for precision in ("fp32", "int8"):
        jsonl = tmp_path / f"{precision}.jsonl"
        assert edge_detect(["--model", str(model), "--source", str(data / "part" / "test" / "**" / "*.png"),
                            "--class-name", "screw", "--precision", precision, "--jsonl", str(jsonl), "-q"]) == 0
        labels[precision] = {json.loads(line)["source"]: json.loads(line)["label"]
                             for line in jsonl.read_text().splitlines()}
    assert len(labels["fp32"]) == 10 and set(labels["fp32"].values()) <= {"OK", "NG"}
    same = sum(labels["fp32"][k] == labels["int8"][k] for k in labels["fp32"])
    assert comp["ok_ng_agreement"] == pytest.approx(same / 10)
    ours = {r["path"]: r["pred"] for r in report["images"]}
    assert ours == labels["fp32"]


def test_compare_reports_no_agreement_when_a_side_borrows_thresholds(model, data, tmp_path):
    """OpenVINO has no calibration of its own in this export: the runtime falls back to ONNX Runtime's thresholds,
    and an agreement measured that way would judge OpenVINO by another backend's offsets; edge-eval says so."""
    pytest.importorskip("openvino")
    rc, report = run(model, data, tmp_path, "--compare", "openvino", "--markdown", str(tmp_path / "r.md"))
    assert rc == 0
    comp = report["compare"]["classes"]["part"]
    assert comp["ok_ng_agreement"] is None and comp["ok_ng_images"] == 0
    assert "fp32 on openvino uses the thresholds calibrated for fp32 on onnxruntime" in comp["ok_ng_note"]
    assert "- OK/NG: fp32 on openvino uses the thresholds" in (tmp_path / "r.md").read_text()


def test_uncalibrated_aaclip_uses_the_official_transductive_normalisation(model, data, tmp_path):
    from clipad.runtime.manifest import Manifest

    copy = tmp_path / "uncal"
    shutil.copytree(model, copy)

    def drop_calibrations(m):
        m.calibrations = []

    Manifest.update(str(copy), drop_calibrations)
    rc, report = run(copy, data, tmp_path, "--save-maps", str(tmp_path / "maps"))
    assert rc == 0
    rows = report["images"]
    maps = [np.load(tmp_path / "maps" / "part" / r["defect"] / (os.path.basename(r["path"])[:-4] + ".npy"))
            for r in rows]
    lo, hi = min(m.min() for m in maps), max(m.max() for m in maps)
    s = np.array([r["score"] for r in rows])
    official = 0.5 * (np.array([m.max() for m in maps]) - lo) / (hi - lo) + 0.5 * (s - s.min()) / np.ptp(s)
    np.testing.assert_allclose([r["decision_score"] for r in rows], official, rtol=1e-6)
    assert "transductive" in report["classes"]["part"]["decision"]["constants_from"]
    assert "false_alarm_rate" not in report["classes"]["part"]["decision"]


def test_random_weights_are_said(tiny_files, data, tmp_path):
    from clipad.export import cli as export_cli

    out = tmp_path / "rand"
    assert export_cli.main(["--model", "clip", "--arch", "tiny-vit", "--image-size", "56", "--random-init",
                            "--class-name", "part", "--output", str(out), "-q"]) == 0
    rc = edge_eval(["--model", str(out), "--data", str(data), "--json", str(tmp_path / "r.json"),
                    "--markdown", str(tmp_path / "r.md"), "-q"])
    assert rc == 0
    assert "RANDOM weights" in json.loads((tmp_path / "r.json").read_text())["note"]
    assert "RANDOM weights" in (tmp_path / "r.md").read_text()


def test_bad_data_is_reported(model, tmp_path):
    root = make_dataset(tmp_path / "d", good=3, defect=3)
    make_dataset(root, cls="only_good", good=4, defect=0)
    (root / "empty" / "test" / "good").mkdir(parents=True)
    os.remove(root / "part" / "ground_truth" / "scratch" / "001_mask.png")          # missing mask
    Image.new("L", (10, 10)).save(root / "part" / "ground_truth" / "scratch" / "002_mask.png")   # wrong size
    (root / "part" / "test" / "good" / "zz_broken.png").write_bytes(b"broken")
    out = tmp_path / "r.json"
    assert edge_eval(["--model", str(model), "--data", str(root), "--class-map", "part=screw", "only_good=screw",
                      "empty=screw", "--json", str(out), "-q"]) == 0
    report = json.loads(out.read_text())
    warnings = "\n".join(report["warnings"])
    assert "no mask" in warnings and "001.png" in warnings and "002_mask.png: mask is 10x10" in warnings
    assert "empty: no test images; class skipped" in warnings and "empty" not in report["classes"]
    assert len(report["unreadable"]) == 1 and "zz_broken.png" in report["unreadable"][0]
    only = report["classes"]["only_good"]["image"]
    assert only["auroc"] is None and "only good images" in only["reason"]
    assert report["classes"]["part"]["pixel"]["regions"] == 2   # only 000.png keeps a usable mask


@pytest.mark.parametrize("args, needle", [
    (["--data", "nowhere"], "not a directory"),
    (["--classes", "nope"], "--classes nope: not in"),
    (["--class-map", "part=bottel"], "--class-map part=bottel"),
    (["--compare", "fp64"], "--compare fp64"),
    (["--compare", "fp16"], "no model.fp16.onnx in this export"),
])
def test_bad_arguments_are_one_line(model, data, tmp_path, capsys, args, needle):
    full = ["--model", str(model), "--data", str(data), "--class-map", "part=screw", "-q"]
    for i in range(0, len(args), 2):
        if args[i] in full:
            full[full.index(args[i]) + 1] = args[i + 1]
        else:
            full += args[i:i + 2]
    assert edge_eval(full) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("edge-eval: error:") and needle in err[0], err


def test_two_model_classes_need_a_map(model, data, capsys):
    assert edge_eval(["--model", str(model), "--data", str(data), "-q"]) == 2
    assert "--class-map part=MODEL_CLASS" in capsys.readouterr().err


@pytest.mark.parametrize("flag, target", [("--json", "model.onnx"), ("--markdown", "manifest.json"),
                                          ("--csv", "part/test/good/000.png"),
                                          ("--json", "part/ground_truth/scratch/000_mask.png")])
def test_reports_never_replace_the_model_or_the_data(model, data, tmp_path, capsys, flag, target):
    path = (model if target.endswith((".onnx", ".json")) else data) / target
    before = path.read_bytes()
    assert edge_eval(["--model", str(model), "--data", str(data), "--class-map", "part=screw", "-q",
                      flag, str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"{flag} would overwrite the input" in err[0]
    assert path.read_bytes() == before
