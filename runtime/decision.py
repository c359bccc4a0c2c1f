"""The OK/NG rule, fail-closed, used by every live path (Detector, edge-detect).

NG when the score reaches the threshold; OK below it; no label without a threshold. A model output that is not finite
(NaN or inf anywhere in the score or the map) is never OK: it is NG with an error, threshold or not, because a part
whose inspection produced garbage has not passed inspection.
"""
from __future__ import annotations

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
