"""OK/NG is one fail-closed rule on the live path: a non-finite score or map is NG with an error, never OK; every
JSONL line stays strict JSON; overlays use the selected class's calibrated display range."""
from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from clipad.runtime import detector as detector_module
from clipad.runtime.backends.base import Backend
from clipad.runtime.decision import check_threshold
from clipad.runtime.detect.cli import main as edge_detect
from clipad.runtime.detector import Detector
from clipad.runtime.errors import ClipadError
from clipad.runtime.manifest import ClassCalibration, Manifest
from clipad.runtime.policy import DecisionPolicy
from conftest import REPO
from tiny_fixtures import export_tiny

SCHEMA2 = REPO / "tests" / "data" / "schema2-aaclip-tiny"


def calibration(threshold: float, display=(0.0, 1.0)) -> ClassCalibration:
    """A map_max class calibration built in memory (no schema validation: the policy must hold on its own)."""
    return ClassCalibration(decision={}, image_threshold=threshold, pixel_threshold=threshold,
                            normal_scores=[0.0, 0.1], display_range=list(display), method="conformal",
                            target_fpr=0.1, images=2, normal="/x", images_sha256="0" * 64, created="now")


def clip_policy(model_dir, threshold: float | None) -> DecisionPolicy:
    manifest = Manifest.read(str(model_dir))
    if threshold is not None:
        manifest.set_class_calibration("fp32", "onnxruntime", "bottle", calibration(threshold))
    return DecisionPolicy(manifest, "fp32", "onnxruntime")


@pytest.mark.parametrize("score, threshold, amap, expected", [
    (0.7, 0.5, np.full((2, 2), 0.7), ("NG", None)), (0.5, 0.5, np.full((2, 2), 0.5), ("NG", None)),
    (0.49, 0.5, np.full((2, 2), 0.49), ("OK", None)), (0.9, None, np.zeros((2, 2)), (None, None)),
    (float("nan"), 0.5, np.zeros((2, 2)), ("NG", "score nan")),
    (float("nan"), None, np.zeros((2, 2)), ("NG", "score nan")),
    (float("-inf"), 0.5, np.zeros((2, 2)), ("NG", "score -inf")),
    (0.1, 0.5, np.array([[0.0, np.nan]]), ("NG", "1 of 2 map values")),
    (0.1, None, np.array([[np.inf, 1.0]]), ("NG", "1 of 2 map values")),
    (0.1, 0.5, np.zeros((2, 2)), ("OK", None)),
    (0.1, float("nan"), np.zeros((2, 2)), ("NG", "threshold is not finite")),
    (0.1, float("inf"), np.zeros((2, 2)), ("NG", "threshold is not finite")),
    (0.1, float("-inf"), np.zeros((2, 2)), ("NG", "threshold is not finite")),
])
def test_policy_decides_fail_closed(model_dir, score, threshold, amap, expected):
    """zero-shot CLIP decides on the map maximum; whatever the path, a non-finite output or threshold is NG."""
    d = clip_policy(model_dir, threshold).decide("bottle", amap.astype(np.float32), score)
    assert d.label == expected[0]
    assert (d.error is None) == (expected[1] is None)
    if d.error is not None:
        assert expected[1] in d.error and "NG" in d.error


def test_override_threshold_is_on_the_raw_score(model_dir):
    policy = clip_policy(model_dir, 0.5)
    assert policy.decide("bottle", np.zeros((2, 2), np.float32), 0.7, override=0.6).label == "NG"
    assert policy.decide("bottle", np.full((2, 2), 0.9, np.float32), 0.5, override=0.6).label == "OK"
    assert "--threshold" in policy.describe("bottle", 0.6)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), "x"])
def test_non_finite_threshold_is_refused(bad):
    with pytest.raises(ClipadError):
        check_threshold(bad)


class NonFiniteFakeBackend(Backend):
    """FAKE backend for tests: the real ONNX Runtime backend, with NaN written into the outputs of every input whose
    first pixel is 0 (score NaN for channel 0, map NaN for channel 1)."""

    name = "fake-nonfinite"

    def __init__(self, real: Backend):
        self.real, self.image_size, self.precision = real, real.image_size, real.precision

    @property
    def description(self):
        return "FAKE non-finite wrapper around " + self.real.description

    @property
    def batch_range(self):
        return self.real.batch_range

    def _infer(self, batch_u8):
        maps, scores = self.real.run(batch_u8)
        poisoned = batch_u8[:, 0, 0, 0] == 0
        scores[poisoned, 0] = np.nan
        maps[poisoned, 1, 3, 4] = np.inf
        return maps, scores


@pytest.fixture(scope="module")
def model_dir(tiny_files, tmp_path_factory):
    out = tmp_path_factory.mktemp("m") / "clip"
    assert export_tiny(tiny_files, out, "clip", ["--dynamic-batch", "1:2"]) == 0
    return out


def images():
    good = np.full((30, 30, 3), 90, np.uint8)
    bad = good.copy()
    bad[0, 0] = 0
    return good, bad


def test_detector_fails_closed(model_dir):
    good, bad = images()
    with Detector.open(str(model_dir)) as det:
        det.backend = NonFiniteFakeBackend(det.backend)
        ok, score_nan = det.predict_batch([good, bad], class_name="bottle", threshold=1e9)
        assert ok.label == "OK" and ok.error is None
        assert score_nan.label == "NG" and "score nan" in score_nan.error
        map_inf = det.predict(bad, class_name="screw", threshold=1e9)  # finite score, one map value inf
        assert map_inf.label == "NG" and "1 of" in map_inf.error
        assert det.predict(bad, class_name="bottle").label == "NG"     # no threshold: still never passes
        assert det.predict(good, class_name="bottle").label is None


def strict_json(line: str):
    def refuse(name):
        raise ValueError(f"non-standard JSON constant {name}")

    return json.loads(line, parse_constant=refuse)


def test_edge_detect_records_are_ng_with_error_and_strict_json(model_dir, tmp_path, monkeypatch):
    good, bad = images()
    Image.fromarray(good).save(tmp_path / "a_good.png")
    Image.fromarray(bad).save(tmp_path / "b_bad.png")
    real_open = detector_module.open_backend
    monkeypatch.setattr(detector_module, "open_backend",
                        lambda *a, **k: NonFiniteFakeBackend(real_open(*a, **k)))
    jsonl = tmp_path / "r.jsonl"
    assert edge_detect(["--model", str(model_dir), "--source", str(tmp_path / "*.png"), "--threshold", "1e9",
                        "--jsonl", str(jsonl), "--save", str(tmp_path / "ov"), "-q"]) == 0
    rows = [strict_json(line) for line in jsonl.read_text().splitlines()]
    assert [r["label"] for r in rows] == ["OK", "NG"]
    assert rows[0]["error"] is None and "not finite" in rows[1]["error"]
    assert rows[1]["score"] is None and isinstance(rows[0]["score"], float)


def test_display_range_is_the_selected_class(model_dir, tmp_path):
    import shutil

    copy = tmp_path / "m"
    shutil.copytree(model_dir, copy)
    Manifest.update(str(copy), lambda m: m.set_class_calibration("fp32", "onnxruntime", "screw",
                                                                   calibration(300.0, (100.0, 200.0))))
    amap = np.linspace(0, 1, 16, dtype=np.float32).reshape(4, 4)
    with Detector.open(str(copy)) as det:
        assert det.policy.display_range("screw", amap) == (100.0, 200.0)
        assert det.policy.display_range("bottle", amap) == (0.0, 1.0)     # no calibration for bottle: its own range
        amap[0, 0] = np.nan
        assert det.policy.display_range("bottle", amap) == (pytest.approx(1 / 15), 1.0)
