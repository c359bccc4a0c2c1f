"""The OK/NG policy of one export on one precision and backend: which decision score, which thresholds (each class
with its own provenance), and the one fail-closed decision that every path uses — ``Detector``, the staged
``edge-detect`` run, ``edge-eval`` and Triton's post model. Plumbing (running models, reading frames) lives elsewhere.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .decision import check_threshold, decision_score, nonfinite_error, normalized_score, p_value
from .manifest import Calibration, ClassCalibration, Manifest


@dataclass
class Decision:
    decision_score: float | None       # what OK/NG is decided on (None: the rule needs calibration constants)
    label: str | None                  # "OK" / "NG"; None without a threshold
    error: str | None                  # set when the outputs (or the threshold) cannot be trusted; then label "NG"
    normalized_score: float | None = None
    p_value: float | None = None
    pixel_threshold: float | None = None
    calibration: dict | None = None    # which calibration decided: method, target_fpr, created, precision, backend


class DecisionPolicy:
    def __init__(self, manifest: Manifest, precision: str, backend: str, threshold: float | None = None,
                 memory: bool = True):
        """``memory`` False: the model runs without few-shot memories, so thresholds fitted with one do not apply
        (those classes count as uncalibrated)."""
        self.manifest, self.memory = manifest, memory
        self.rule = manifest.model.decision_score
        self.override = check_threshold(threshold)
        self.calibration: Calibration | None
        self.calibration, self.warning = manifest.calibration(precision, backend)

    def take_warning(self) -> str | None:
        """The warning about falling back to another precision's thresholds, once (then None)."""
        warning, self.warning = self.warning, None
        return warning

    def rule_for(self, class_name: str) -> str:
        """The model's decision-score rule, or ``fused`` for a class calibrated with a few-shot memory."""
        cal = self.class_calibration(class_name)
        return cal.decision["rule"] if cal is not None and cal.memory is not None else self.rule

    def class_calibration(self, class_name: str) -> ClassCalibration | None:
        cal = self.calibration.classes.get(class_name) if self.calibration else None
        return None if cal is not None and cal.memory is not None and not self.memory else cal

    def provenance(self, class_name: str) -> dict | None:
        cal = self.class_calibration(class_name)
        if cal is None:
            return None
        return {"method": cal.method, "target_fpr": cal.target_fpr, "created": cal.created,
                "precision": self.calibration.precision, "backend": self.calibration.backend}

    def describe(self, class_name: str, override: float | None = None) -> str:
        """One line on how OK/NG is decided for this class, for logs and headers."""
        override = self.override if override is None else check_threshold(override)
        if override is not None:
            return f"NG when the raw score >= {override:.6g} (--threshold)"
        cal = self.class_calibration(class_name)
        if cal is None:
            return "no OK/NG (no --threshold and no calibration for this class; run edge-calibrate)"
        memory = f", few-shot memory of {cal.memory['images']} image(s)" if cal.memory else ""
        return (f"NG when the {self.rule_for(class_name)} decision score >= {cal.image_threshold:.6g}{memory} "
                f"({cal.method}, target "
                f"false-alarm rate {cal.target_fpr:g}, calibrated on {cal.images} normal images, "
                f"{self.calibration.precision} on {self.calibration.backend}, {cal.created})")

    def decide(self, class_name: str, anomaly_map: np.ndarray, score: float,
               override: float | None = None) -> Decision:
        """The decision for one class's outputs. Fail-closed: outputs that are not finite, or a threshold that is
        not finite, give NG with ``error`` set, never OK."""
        override = self.override if override is None else check_threshold(override)
        cal = self.class_calibration(class_name)
        map_max = float(np.max(anomaly_map))
        value = decision_score(self.rule_for(class_name), cal.decision if cal else None, map_max, float(score))
        bad = nonfinite_error(float(score), anomaly_map)
        if override is not None:
            threshold, compared = override, float(score)
        elif cal is not None and value is not None:
            threshold, compared = cal.image_threshold, value
        else:
            threshold, compared = None, value
        provenance = self.provenance(class_name) if override is None else None
        if bad is not None:
            return Decision(value, "NG", bad, calibration=provenance)
        if threshold is None:
            decision = Decision(value, None, None)
        elif not math.isfinite(threshold):
            return Decision(value, "NG", f"the threshold is not finite ({threshold}); labelled NG",
                            calibration=provenance)
        elif not math.isfinite(compared):
            return Decision(value, "NG", f"the decision score is not finite ({compared}); labelled NG",
                            calibration=provenance)
        else:
            decision = Decision(value, "NG" if compared >= threshold else "OK", None, calibration=provenance)
        if cal is not None and value is not None and math.isfinite(value):
            decision.p_value = p_value(cal.normal_scores, value)
            decision.normalized_score = normalized_score(value, cal.image_threshold, cal.normal_scores)
            decision.pixel_threshold = cal.pixel_threshold
        return decision

    def display_range(self, class_name: str, anomaly_map: np.ndarray) -> tuple[float, float]:
        """The class's fixed colour range from calibration (frames comparable), else this map's own min-max (a
        relative map). Non-finite values are ignored."""
        cal = self.class_calibration(class_name)
        if cal is not None:
            return float(cal.display_range[0]), float(cal.display_range[1])
        finite = anomaly_map[np.isfinite(anomaly_map)]
        return (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
