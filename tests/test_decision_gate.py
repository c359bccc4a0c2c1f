"""The precision gates judge OK/NG: each side's own conformal threshold from normal images, flips on held-back normal
images and on the verify images at α = 5 % and 10 %, the score error relative to the margin, Spearman with its
interval; and the export records it (schema 4)."""
from __future__ import annotations

import json

import numpy as np
import pytest

from clipad.runtime.compare import GateLimits, compare, gate
from clipad.runtime import schema
from clipad.runtime.decision_check import DecisionCheck, check, conformal_threshold, spearman_ci95
from clipad.runtime.manifest import SCHEMA_VERSION
from tiny_fixtures import export_tiny


def pairs(scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(map max, image score) of a [N, 1] score column, for the image_score rule."""
    return np.zeros_like(scores), scores


def test_conformal_threshold_is_the_split_conformal_quantile():
    normal = np.arange(1, 20, dtype=float)            # 19 scores: α = 5 % needs the 19th of 19
    assert conformal_threshold(normal, 0.05) == 19.0
    assert conformal_threshold(normal, 0.10) == 18.0   # ⌈20 × 0.9⌉ = 18
    assert conformal_threshold(normal[:18], 0.05) is None   # too few for α = 5 %
    assert conformal_threshold(np.array([]), 0.1) is None


def test_a_shift_is_absorbed_by_the_candidates_own_threshold():
    rng = np.random.default_rng(0)
    normal = rng.normal(0, 1, (60, 1))
    verify = np.concatenate([rng.normal(0, 1, (30, 1)), rng.normal(5, 1, (10, 1))])
    shifted = check("image_score", pairs(normal), pairs(normal * 1.3 + 2.0), pairs(verify), pairs(verify * 1.3 + 2.0))
    assert shifted.evaluated and shifted.held_back_flips == [0, 0] and shifted.verify_flips == [0, 0]
    assert shifted.verify_agreement == 1.0 and shifted.normal_images == 45 and shifted.held_back_images == 15
    ref_t, cand_t = np.array(shifted.reference_thresholds), np.array(shifted.candidate_thresholds)
    assert np.allclose(cand_t, ref_t * 1.3 + 2.0)     # its own threshold, not the reference's


def test_noise_near_the_threshold_flips_decisions_and_is_counted():
    rng = np.random.default_rng(1)
    normal = rng.normal(0, 1, (80, 1))
    verify = rng.normal(1.5, 1, (40, 1))
    noise = lambda x: x + rng.normal(0, 0.8, x.shape)  # noqa: E731
    noisy = check("image_score", pairs(normal), pairs(noise(normal)), pairs(verify), pairs(noise(verify)))
    assert sum(noisy.verify_flips) > 0 and noisy.verify_agreement < 0.99
    assert noisy.score_error_over_margin > 0.5
    report = gate(compare((np.zeros((3, 1, 4, 4)), np.zeros((3, 1))), (np.zeros((3, 1, 4, 4)), np.zeros((3, 1)))),
                  GateLimits(decision_flips_max=0, decision_agreement_min=0.99), "int8", "a", "b", noisy)
    assert not report.passed and any("OK/NG agreement on 40 verify images" in f for f in report.failures)


def test_each_flip_is_named_with_its_distance_to_the_threshold():
    normal = np.linspace(0, 1, 40)[:, None]                  # held back: every 4th; thresholds from the other 30
    verify = np.array([[0.2], [0.99], [2.0]])
    cand_verify = verify + np.array([[0.0], [-0.5], [0.0]])  # the second verify image drops below the threshold
    cand_normal = normal.copy()
    cand_normal[3] += 1.0                                    # the first held-back normal image rises above it
    result = check("image_score", pairs(normal), pairs(cand_normal), pairs(verify), pairs(cand_verify),
                   verify_names=["a.png", "b.png", "c.png"])
    flips = [n for n in result.notes if n.startswith("flip: ")]
    assert result.verify_flips == [1, 1] and result.held_back_flips == [1, 1] and len(flips) == 4
    assert result.verify_flipped == [[1], [1]]                 # which verify image, in memory …
    written = schema.dump(result)
    assert "verify_flipped" not in written                     # … not in the manifest (schema 7 readers load it)
    assert schema.load(DecisionCheck, written, "decision").verify_flips == [1, 1]
    at_10 = [n for n in flips if "α = 0.1:" in n]
    assert any(n.startswith("flip: verify b.png at α = 0.1: reference 0.99 NG") and "candidate 0.49 OK" in n
               for n in at_10), at_10
    assert any(n.startswith("flip: held-back normal normal image 4 of 40 at α = 0.1: reference") for n in at_10)
    threshold = result.reference_thresholds[1][0]
    distance = float(next(n for n in at_10 if "b.png" in n).split("the reference is ")[1].split("×")[0])
    assert distance == pytest.approx(abs(0.99 - threshold) / 1.0, abs=0.01)   # the largest normal error is 1.0
    assert "a.png" not in " ".join(flips) and "c.png" not in " ".join(flips)
    rates = [n for n in result.notes if n.startswith("verify flip rate")]
    assert rates[1] == "verify flip rate at α = 0.1: 1/3, 95 % interval 0.8% … 90.6% (Clopper–Pearson)", rates
    none = check("image_score", pairs(normal), pairs(normal), pairs(np.zeros((20, 1))), pairs(np.zeros((20, 1))))
    assert "verify flip rate at α = 0.05: 0/20, 95 % interval 0.0% … 16.8% (Clopper–Pearson)" in none.notes


def test_too_few_normals_is_said_and_fails_a_gate_that_needs_decisions():
    normal = np.linspace(0, 1, 8)[:, None]
    few = check("image_score", pairs(normal), pairs(normal), pairs(normal), pairs(normal))
    assert not few.evaluated and any("too few for a threshold" in n for n in few.notes)
    maps = (np.random.default_rng(0).random((3, 1, 4, 4)), np.zeros((3, 1)))
    report = gate(compare(maps, maps), GateLimits(decision_flips_max=0), "int8", "a", "b", few)
    assert report.failures == ["no OK/NG decision check (too few normal images for a threshold)"]


def test_mixed_rules_normalise_both_sides_with_the_references_constants():
    rng = np.random.default_rng(2)
    normal = (rng.random((40, 2)) * 100, rng.random((40, 2)))     # AA-CLIP: map max spans ±100s, score [0, 1]
    result = check("aaclip_industrial", normal, normal, normal, normal)
    assert result.evaluated and result.held_back_flips == [0, 0]
    assert any("normalisation constants" in n for n in result.notes)
    assert np.array(result.reference_thresholds).shape == (2, 2)   # [alpha][class]


def test_spearman_interval():
    low, high = spearman_ci95(0.9, 20)
    assert low < 0.9 < high <= 1.0
    assert spearman_ci95(0.9, 200)[0] > low                        # narrower with more images
    assert spearman_ci95(0.9, 3) is None and spearman_ci95(None, 20) is None


def test_int8_export_is_judged_by_decisions(tiny_files, tmp_path, normals):
    out = tmp_path / "aa"
    code = export_tiny(tiny_files, out, "clip", ["--precision", "int8", "--calib-data", str(normals),
                                                 "--accept-accuracy-loss"], classes=("tile",))
    assert code == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["schema_version"] == SCHEMA_VERSION == 7
    report = manifest["precisions"]["int8"]["gate"]
    decision = report["decision"]
    assert report["limits"]["score_spearman_min"] is None              # the rank no longer decides
    assert report["limits"]["decision_flips_max"] == 0 and report["limits"]["decision_agreement_min"] == 0.99
    assert decision["alphas"] == [0.05, 0.1] and decision["rule"] == "map_max"
    assert decision["normal_images"] + decision["held_back_images"] == 32   # 40 − 8 held back as verify images
    assert decision["verify_images"] == 8 and len(decision["reference_thresholds"]) == 2
    assert all(t is not None for row in decision["candidate_thresholds"] for t in row)
    assert report["passed"] == (max(decision["held_back_flips"]) == 0 and decision["verify_agreement"] >= 0.99
                                and report["comparison"]["map_pearson_min"] >= 0.99)


def test_fp16_takes_calibration_data_for_the_decision_gate(tiny_files, tmp_path, normals, caplog):
    out = tmp_path / "f"
    assert export_tiny(tiny_files, out, "clip", ["--precision", "fp16", "--calib-data", str(normals)],
                       classes=("tile",)) == 0
    assert "recommended for the FP16 OK/NG gate" in caplog.text and "for INT8" not in caplog.text   # 40 < 100
    report = json.loads((out / "manifest.json").read_text())["precisions"]["fp16"]["gate"]
    assert report["passed"] and report["decision"]["held_back_flips"] == [0, 0]
    assert report["decision"]["normal_images"] == 30                    # all 40 images, 10 held back
    out2 = tmp_path / "g"
    assert export_tiny(tiny_files, out2, "clip", ["--precision", "fp16"], classes=("tile",)) == 0
    plain = json.loads((out2 / "manifest.json").read_text())["precisions"]["fp16"]["gate"]
    assert plain["decision"] is None and plain["limits"]["decision_flips_max"] is None   # map gate only
