"""The decision scores OK/NG is decided on, the conformal p-value and normalised score, and the checks that keep
the decision fail-closed (``policy.DecisionPolicy`` applies them): a model output that is not finite (NaN or inf
anywhere in the score or the map) is never OK, because a part whose inspection produced garbage has not passed.

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


FUSED = "fused"   # with a few-shot memory: the few-shot graph's fused score (clipad.export.fewshot_graph)
RULES = ("aaclip_industrial", "aaclip_medical", "image_score", "map_max", FUSED)
CONSTANTS = {"aaclip_industrial": ("p_min", "p_max", "i_min", "i_max"), "aaclip_medical": ("p_min", "p_max"),
             "image_score": (), "map_max": (), FUSED: ()}


def decision_score(rule: str, constants: dict | None, map_max: float, score: float) -> float | None:
    """The decision score, or None when the rule needs calibration constants that are not there."""
    if rule in ("image_score", FUSED):
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
