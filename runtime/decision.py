"""The OK/NG rule, fail-closed, used by every live path (Detector, edge-detect, edge-eval), and the decision scores
it is applied to.

NG when the score reaches the threshold; OK below it; no label without a threshold. A model output that is not finite
(NaN or inf anywhere in the score or the map) is never OK: it is NG with an error, threshold or not, because a part
whose inspection produced garbage has not passed inspection.

Decision score per model (``RULES``): AA-CLIP's image score as its paper defines it, 0.5 · max(map) + 0.5 · score after
per-class min-max normalisation (medical: the normalised map maximum only), with the constants that the official
evaluation took from the whole test set fitted on normal images instead (``edge-calibrate``); Crane: its official image
score; zero-shot CLIP: the map maximum. ``score`` itself always stays the raw official score.
"""
from __future__ import annotations

import bisect
import math

import numpy as np

from .errors import ClipadError


def check_threshold(value: float | None, what: str = "--threshold") -> float | None:
    if value is None:
        return None
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise ClipadError(f"{what} {value!r}: not a number") from None
    if not math.isfinite(value):
        raise ClipadError(f"{what} {value}: must be a finite number")
    return value


def nonfinite_error(score: float, anomaly_map: np.ndarray | None) -> str | None:
    """Why the outputs cannot be trusted, or None when they are all finite."""
    bad = []
    if not math.isfinite(score):
        bad.append(f"score {score}")
    if anomaly_map is not None:
        finite = np.isfinite(anomaly_map)
        if not finite.all():
            bad.append(f"{int(finite.size - finite.sum())} of {finite.size} map values")
    return None if not bad else f"model output is not finite ({', '.join(bad)} NaN/inf); labelled NG"


def decide(score: float, threshold: float | None, anomaly_map: np.ndarray | None = None) -> tuple[str | None,
                                                                                             str | None]:
    """(label, error): label "NG"/"OK" or None without a threshold; error set when the outputs are not finite."""
    error = nonfinite_error(float(score), anomaly_map)
    if error is not None:
        return "NG", error
    if threshold is None:
        return None, None
    return ("NG" if float(score) >= float(threshold) else "OK"), None


RULES = ("aaclip_industrial", "aaclip_medical", "image_score", "map_max")
CONSTANTS = {"aaclip_industrial": ("p_min", "p_max", "i_min", "i_max"), "aaclip_medical": ("p_min", "p_max"),
             "image_score": (), "map_max": ()}


def rule_for(kind: str, domain: str | None, declared: str | None = None) -> str:
    """The decision-score rule of a model: the one its manifest names, else the one of its kind."""
    if declared:
        if declared not in RULES:
            raise ClipadError(f"unknown decision score {declared!r} in the manifest; upgrade clipad-edge")
        return declared
    if kind == "aaclip":
        return "aaclip_medical" if domain == "medical" else "aaclip_industrial"
    return "map_max" if kind == "clip" else "image_score"


def decision_score(rule: str, constants: dict | None, map_max: float, score: float) -> float | None:
    """The decision score, or None when the rule needs calibration constants that are not there."""
    if rule == "image_score":
        return score
    if rule == "map_max":
        return map_max
    if not constants or any(k not in constants for k in CONSTANTS[rule]):
        return None
    normalized_map = (map_max - constants["p_min"]) / (constants["p_max"] - constants["p_min"])
    if rule == "aaclip_medical":
        return normalized_map
    return 0.5 * normalized_map + 0.5 * (score - constants["i_min"]) / (constants["i_max"] - constants["i_min"])


def p_value(normal_sorted: list[float], value: float) -> float:
    """Conformal p-value (1 + #{normal >= value}) / (n + 1) against the sorted normal decision scores."""
    n = len(normal_sorted)
    return (1 + n - bisect.bisect_left(normal_sorted, value)) / (n + 1)


def normalized_score(value: float, threshold: float, normal_sorted: list[float]) -> float:
    """anomalib's convention: (value − threshold) / (normal max − normal min) + 0.5, clipped to [0, 1]; 0.5 is the
    threshold."""
    spread = normal_sorted[-1] - normal_sorted[0]
    return float(min(1.0, max(0.0, (value - threshold) / (spread if spread > 0 else 1.0) + 0.5)))
