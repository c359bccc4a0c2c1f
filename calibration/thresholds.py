"""OK/NG thresholds from defect-free images only: decision-score constants, the threshold rule (conformal by default),
the hold-out check and the pixel threshold for defect regions. Pure numpy; ``edge-calibrate`` (``cli``) feeds it.

Conformal rule: with n normal decision scores and target false-alarm rate α the threshold is the k-th smallest score,
k = ⌈(n+1)(1−α)⌉; for exchangeable normal parts with continuous scores P(false alarm) ≤ α. It needs k ≤ n, i.e.
n ≥ ⌈1/α⌉ − 1 images (equivalently α ≥ 1/(n+1)).
"""
from __future__ import annotations

import math
import statistics
from dataclasses import dataclass

import numpy as np

from clipad.runtime.decision import CONSTANTS, decision_score
from clipad.runtime.errors import ClipadError
from clipad.runtime.manifest import ClassCalibration

METHODS = ("conformal", "quantile", "meanstd")


@dataclass
class NormalStats:
    """Per image of one class: the map's minimum and maximum and the raw image score."""
    map_min: np.ndarray
    map_max: np.ndarray
    score: np.ndarray


def images_needed(alpha: float) -> int:
    """The fewest normal images for which the conformal threshold exists at false-alarm rate ``alpha``."""
    return math.ceil(1.0 / alpha - 1e-9) - 1


def threshold(method: str, values: np.ndarray, alpha: float, what: str = "images") -> float:
    """The threshold of ``values`` (normal scores) at false-alarm rate ``alpha`` by ``method``."""
    values = np.sort(np.asarray(values, np.float64))
    n = len(values)
    if not 0 < alpha < 1:
        raise ClipadError(f"--target-fpr {alpha}: must be between 0 and 1")
    if method == "conformal":
        k = math.ceil((n + 1) * (1 - alpha) - 1e-9)
        if k > n:
            raise ClipadError(f"--target-fpr {alpha:g} needs at least {images_needed(alpha)} normal {what} for the "
                              f"conformal threshold, {n} are left after the hold-out; add images, lower --holdout, "
                              f"or use --target-fpr {1 / (n + 1):.4g} or more")
        return float(values[max(k, 1) - 1])
    if n < 2:
        raise ClipadError(f"{method} needs at least 2 normal {what}, {n} are left after the hold-out")
    if method == "quantile":
        return float(np.quantile(values, 1 - alpha))
    if method == "meanstd":
        return float(values.mean() + statistics.NormalDist().inv_cdf(1 - alpha) * values.std(ddof=1))
    raise ClipadError(f"--method {method!r}: choose one of {', '.join(METHODS)}")


def holdout_split(n: int, share: float, seed: int = 0) -> np.ndarray:
    """Boolean mask of the images held out (a seeded random ``share`` of ``n``, at least one when share > 0)."""
    if not 0 <= share < 1:
        raise ClipadError(f"--holdout {share}: must be at least 0 and below 1")
    held = np.zeros(n, bool)
    count = min(n - 1, max(1, round(share * n))) if share > 0 and n > 1 else 0
    held[np.random.default_rng(seed).permutation(n)[:count]] = True
    return held


def fit_constants(rule: str, stats: NormalStats) -> dict:
    """The decision rule's constants from normal images (AA-CLIP: the per-class min-max that the official evaluation
    took over the whole test set)."""
    names = CONSTANTS[rule]
    if not names:
        return {}
    constants = {"p_min": float(stats.map_min.min()), "p_max": float(stats.map_max.max())}
    if "i_min" in names:
        constants.update(i_min=float(stats.score.min()), i_max=float(stats.score.max()))
    if constants["p_max"] <= constants["p_min"] or constants.get("i_max", 1.0) <= constants.get("i_min", 0.0):
        raise ClipadError("the normal images give constant maps or scores; cannot fit the decision score")
    return constants


def calibrate_class(rule: str, stats: NormalStats, held: np.ndarray, method: str, alpha: float,
                    provenance: dict, extra: dict | None = None) -> ClassCalibration:
    """Thresholds of one class from the normal images not held out; the held-out ones measure the false alarms.
    ``provenance``: method, target_fpr, images, normal, images_sha256, created (stored with the class)."""
    fit = NormalStats(stats.map_min[~held], stats.map_max[~held], stats.score[~held])
    constants = fit_constants(rule, fit)
    scores = np.array([decision_score(rule, constants, mx, s) for mx, s in zip(stats.map_max, stats.score)])
    if not np.isfinite(scores).all():
        raise ClipadError("the normal images give non-finite decision scores; cannot calibrate")
    image_threshold = threshold(method, scores[~held], alpha)
    pixel_threshold = threshold(method, fit.map_max, alpha, "images (per-image map maxima)")
    return ClassCalibration(
        decision=constants, image_threshold=image_threshold, pixel_threshold=pixel_threshold,
        normal_scores=sorted(float(v) for v in scores[~held]),
        display_range=[float(np.median(fit.map_min)), pixel_threshold], **provenance,
        holdout_images=int(held.sum()), holdout_false_alarms=int((scores[held] >= image_threshold).sum()),
        extra={"holdout_region_false_alarms": int((stats.map_max[held] >= pixel_threshold).sum()), **(extra or {})})
