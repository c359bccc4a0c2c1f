"""edge-calibrate: the conformal rule and its refusal, p-values, the alternatives, AA-CLIP's decision score against
the official min-max formula, and the command end to end (edge-detect then labels without --threshold)."""
from __future__ import annotations

import json
import math
import os
import shutil
import statistics

import numpy as np
import pytest
from PIL import Image

from clipad.calibration import thresholds as th
from clipad.calibration.cli import main as edge_calibrate
from clipad.runtime.decision import decision_score, normalized_score, p_value
from clipad.runtime.detect.cli import main as edge_detect
from clipad.runtime.errors import ClipadError
from clipad.runtime.manifest import Manifest
from tiny_fixtures import export_tiny, write_good_samples


def test_conformal_threshold_is_the_kth_smallest():
    values = np.arange(1.0, 20.0)          # n = 19
    for alpha in (0.05, 0.1, 0.25, 0.5):
        k = math.ceil(20 * (1 - alpha) - 1e-9)
        assert th.threshold("conformal", values[::-1], alpha) == values[k - 1]
    assert th.threshold("conformal", values, 0.05) == 19.0   # k = 19 = n: the largest normal score


def test_conformal_refuses_with_the_numbers():
    with pytest.raises(ClipadError) as err:
        th.threshold("conformal", np.arange(10.0), 0.01)
    text = str(err.value)
    assert "needs at least 99 normal images" in text and "10 are left" in text and "0.09091 or more" in text
    assert th.images_needed(0.01) == 99 and th.images_needed(0.05) == 19 and th.images_needed(0.2) == 4
    th.threshold("conformal", np.arange(99.0), 0.01)   # exactly enough


def test_conformal_false_alarm_rate_holds():
    """Over many draws of 19 normal scores, a fresh normal part is NG (score >= threshold) at most α of the time."""
    rng = np.random.default_rng(0)
    trials = 4000
    normal = rng.normal(size=(trials, 20))
    alarms = [s[19] >= th.threshold("conformal", s[:19], 0.1) for s in normal]
    assert np.mean(alarms) <= 0.1 + 3 * math.sqrt(0.1 * 0.9 / trials)
    assert np.mean(alarms) >= 0.05   # and it is not trivially conservative


def test_p_values_and_normalized_score():
    normal = [1.0, 2.0, 2.0, 3.0]
    assert p_value(normal, 2.0) == (1 + 3) / 5   # ties count as >=
    assert p_value(normal, 3.5) == 1 / 5 and p_value(normal, 0.0) == 1.0
    assert normalized_score(3.0, 3.0, normal) == 0.5
    assert normalized_score(100.0, 3.0, normal) == 1.0 and normalized_score(-100.0, 3.0, normal) == 0.0


def test_quantile_and_meanstd():
    values = np.random.default_rng(1).normal(5, 2, 200)
    assert th.threshold("quantile", values, 0.05) == pytest.approx(np.quantile(values, 0.95))
    z = statistics.NormalDist().inv_cdf(0.95)
    assert th.threshold("meanstd", values, 0.05) == pytest.approx(values.mean() + z * values.std(ddof=1))
    with pytest.raises(ClipadError, match="between 0 and 1"):
        th.threshold("quantile", values, 1.5)


def test_holdout_split():
    held = th.holdout_split(50, 0.2, seed=3)
    assert held.sum() == 10 and np.array_equal(held, th.holdout_split(50, 0.2, seed=3))
    assert not np.array_equal(held, th.holdout_split(50, 0.2, seed=4))
    assert th.holdout_split(3, 0.01).sum() == 1 and th.holdout_split(10, 0.0).sum() == 0
    with pytest.raises(ClipadError):
        th.holdout_split(10, 1.0)


def test_aaclip_decision_score_is_the_official_formula_with_fitted_constants():
    """With the constants fitted on a set, the decision score equals AA-CLIP's metrics_eval on that set:
    0.5 · max(min-max normalised map) + 0.5 · min-max normalised image score."""
    rng = np.random.default_rng(2)
    maps = rng.normal(0, 50, (6, 8, 8))
    scores = rng.random(6)
    stats = th.NormalStats(maps.reshape(6, -1).min(1), maps.reshape(6, -1).max(1), scores)
    constants = th.fit_constants("aaclip_industrial", stats)
    official = 0.5 * ((maps - maps.min()) / (maps.max() - maps.min())).reshape(6, -1).max(1) \
        + 0.5 * (scores - scores.min()) / (scores.max() - scores.min())
    ours = [decision_score("aaclip_industrial", constants, mx, s) for mx, s in zip(stats.map_max, scores)]
    np.testing.assert_allclose(ours, official, rtol=1e-12)
    medical = [decision_score("aaclip_medical", constants, mx, s) for mx, s in zip(stats.map_max, scores)]
    np.testing.assert_allclose(medical, ((maps - maps.min()) / np.ptp(maps)).reshape(6, -1).max(1))
    assert decision_score("aaclip_industrial", None, 1.0, 0.5) is None
    assert decision_score("image_score", None, 1.0, 0.5) == 0.5 and decision_score("map_max", None, 1.0, 0.5) == 1.0


# ---- the command -----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def normal_dir(tmp_path_factory):
    """30 defect-free sample images (the generator draws every second one with a defect: those are left out)."""
    folder = write_good_samples(tmp_path_factory.mktemp("normal"), 30, seed=5)
    assert len(os.listdir(folder)) == 30
    return folder


@pytest.fixture(scope="module")
def model(tiny_files, tmp_path_factory, calib_dir):
    out = tmp_path_factory.mktemp("m") / "aa"
    assert export_tiny(tiny_files, out, "aaclip", ["--dynamic-batch", "1:2", "--precision", "int8", "--calib-data",
                                                   str(calib_dir), "--accept-accuracy-loss", "--no-engine"]) == 0
    return out


@pytest.fixture
def copy(model, tmp_path):
    out = tmp_path / "aa"
    shutil.copytree(model, out)
    return out


def test_calibrate_then_detect_labels_without_threshold(copy, normal_dir, tmp_path):
    assert edge_calibrate(["--model", str(copy), "--normal", str(normal_dir), "--target-fpr", "0.1", "-q"]) == 0
    m = Manifest.read(str(copy))
    (cal,) = m.calibrations
    assert (cal.precision, cal.backend) == ("fp32", "onnxruntime") and set(cal.classes) == {"bottle", "screw"}
    bottle = cal.classes["bottle"]
    assert bottle.method == "conformal" and bottle.images == 24 and bottle.holdout_images == 6
    assert len(bottle.normal_scores) == 24 and set(bottle.decision) == {"p_min", "p_max", "i_min", "i_max"}
    k = math.ceil(25 * 0.9 - 1e-9)
    assert bottle.image_threshold == bottle.normal_scores[k - 1]
    jsonl = tmp_path / "r.jsonl"
    assert edge_detect(["--model", str(copy), "--source", str(normal_dir), "--jsonl", str(jsonl), "--save-masks",
                        str(tmp_path / "masks"), "-q"]) == 0
    rows = [json.loads(line) for line in jsonl.read_text().splitlines()]
    assert all(r["label"] in ("OK", "NG") and 0 < r["p_value"] <= 1 for r in rows)
    for r in rows:
        assert r["label"] == ("NG" if r["decision_score"] >= bottle.image_threshold else "OK")
        assert r["p_value"] == pytest.approx(p_value(bottle.normal_scores, r["decision_score"]))
        assert r["pixel_label"] == ("NG" if r["map_max"] >= bottle.pixel_threshold else "OK")
        if "NG" in (r["label"], r["pixel_label"]):
            assert r["regions"], "an NG part always shows where"
        for region in r["regions"]:
            assert region["area"] > 0 and region["kind"] in ("defect", "peak")
            if region["kind"] == "defect":
                assert region["max"] >= bottle.pixel_threshold
            else:   # the peak of a part the resize left below the pixel threshold: only for NG parts
                assert len(r["regions"]) == 1 and "NG" in (r["label"], r["pixel_label"])
    first = rows[0]
    mask = np.asarray(Image.open(tmp_path / "masks" / (first["source"].rsplit("/", 1)[1][:-4] + ".png")))
    assert mask.shape == np.asarray(Image.open(first["source"])).shape[:2] and set(np.unique(mask)) <= {0, 255}
    assert (mask > 0).sum() == sum(r["area"] for r in first["regions"])
    # --threshold still overrides (on the raw score)
    override = tmp_path / "override.jsonl"
    assert edge_detect(["--model", str(copy), "--source", str(normal_dir), "--jsonl", str(override), "--threshold",
                        "-1", "-q"]) == 0
    assert {json.loads(line)["label"] for line in override.read_text().splitlines()} == {"NG"}


def test_calibrations_per_precision(copy, normal_dir, caplog):
    assert edge_calibrate(["--model", str(copy), "--normal", str(normal_dir), "--target-fpr", "0.2",
                           "--class-name", "screw", "-q"]) == 0
    assert edge_calibrate(["--model", str(copy), "--normal", str(normal_dir), "--target-fpr", "0.2",
                           "--precision", "int8", "-q"]) == 0
    m = Manifest.read(str(copy))
    assert sorted((c.precision, tuple(sorted(c.classes))) for c in m.calibrations) == [
        ("fp32", ("screw",)), ("int8", ("bottle", "screw"))]
    assert edge_calibrate(["--model", str(copy), "--normal", str(normal_dir), "--target-fpr", "0.2",
                           "--class-name", "bottle", "-q"]) == 0   # adds bottle, keeps screw
    fp32 = next(c for c in Manifest.read(str(copy)).calibrations if c.precision == "fp32")
    assert set(fp32.classes) == {"bottle", "screw"}
    from clipad.runtime.detector import Detector

    with Detector.open(str(copy), precision="int8") as det:
        assert det.policy.calibration.precision == "int8"

    def keep_fp32(m):
        m.calibrations = [c for c in m.calibrations if c.precision == "fp32"]

    Manifest.update(str(copy), keep_fp32)
    with Detector.open(str(copy), precision="int8") as det:   # only fp32's: used, with a warning at the first decision
        assert det.policy.calibration.precision == "fp32"
        det.predict(np.zeros((20, 20, 3), np.uint8))
    assert "no calibration for int8; using the fp32 thresholds" in caplog.text


def test_redoing_int8_drops_its_stale_calibration(copy, normal_dir, calib_dir, caplog):
    from clipad.export import cli as export_cli

    assert edge_calibrate(["--model", str(copy), "--normal", str(normal_dir), "--target-fpr", "0.2",
                           "--precision", "int8", "-q"]) == 0
    assert edge_calibrate(["--model", str(copy), "--normal", str(normal_dir), "--target-fpr", "0.2", "-q"]) == 0
    assert export_cli.main(["--from-onnx", str(copy), "--precision", "int8", "--calib-data", str(calib_dir),
                            "--accept-accuracy-loss", "--no-engine", "-q"]) == 0
    assert [c.precision for c in Manifest.read(str(copy)).calibrations] == ["fp32"]
    assert "removed the int8 thresholds" in caplog.text


@pytest.mark.parametrize("problem, needle", [
    ("too_few_for_alpha", "needs at least 99 normal images"),
    ("no_folder", "no such file, folder or glob"),
    ("empty_glob", "no image files"),
    ("unknown_class", "unknown class name 'bottel'"),
    ("bad_holdout", "--holdout 1.5"),
    ("bad_fpr", "--target-fpr 0.0"),
    ("all_unreadable", "only 0 readable normal image(s) of 2"),
])
def test_bad_input_is_one_line(copy, normal_dir, tmp_path, capsys, problem, needle):
    args = ["--model", str(copy), "--normal", str(normal_dir)]
    if problem == "too_few_for_alpha":
        args += ["--target-fpr", "0.01"]
    elif problem == "no_folder":
        args = ["--model", str(copy), "--normal", str(tmp_path / "nope")]
    elif problem == "empty_glob":
        args = ["--model", str(copy), "--normal", str(tmp_path / "*.png")]
    elif problem == "unknown_class":
        args += ["--class-name", "bottel"]
    elif problem == "bad_holdout":
        args += ["--holdout", "1.5"]
    elif problem == "bad_fpr":
        args += ["--target-fpr", "0"]
    elif problem == "all_unreadable":
        bad = tmp_path / "bad"
        bad.mkdir()
        (bad / "a.png").write_bytes(b"")
        (bad / "b.png").write_bytes(b"\x89PNG\r\n\x1a\nbroken")
        args = ["--model", str(copy), "--normal", str(bad), "--target-fpr", "0.5"]
    before = (copy / "manifest.json").read_text()
    assert edge_calibrate(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("edge-calibrate: error:") and needle in err[-1], err
    assert "Traceback" not in "\n".join(err) and (copy / "manifest.json").read_text() == before


def test_unreadable_images_are_skipped_and_counted(copy, normal_dir, tmp_path, caplog):
    mixed = tmp_path / "mixed"
    shutil.copytree(normal_dir, mixed)
    (mixed / "zz_broken.png").write_bytes(b"not an image")
    assert edge_calibrate(["--model", str(copy), "--normal", str(mixed), "--target-fpr", "0.2", "-q"]) == 0
    (cal,) = Manifest.read(str(copy)).calibrations
    bottle = cal.classes["bottle"]
    assert bottle.images + bottle.holdout_images == 30 and bottle.extra["unreadable"] == 1
    assert "zz_broken.png" in caplog.text
