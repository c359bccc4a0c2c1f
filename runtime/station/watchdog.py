"""Hints for the operator, never a changed decision: per camera, the NG rate of a rolling window against the
calibrated false-alarm rate (a binomial test), the uniformity of recent conformal p-values (they are uniform while the
line is normal), and cheap image checks (frozen frame, black or over-exposed frame, blur).

Image checks run on a 64×48 grey thumbnail of each frame (well under a millisecond); the statistical tests run when
the status is asked for (scipy, lazily)."""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

import numpy as np

WINDOW = 200          # decisions in the rolling window
MIN_DECISIONS = 30    # fewer: no statistical warning yet
ALARM_P = 1e-3        # a test's p-value below this is a warning
FROZEN_FRAMES = 25    # identical frames in a row
DARK, BRIGHT = 12.0, 243.0   # mean grey level of a black / over-exposed frame
BLUR_DROP = 0.25      # Laplacian variance below this share of the camera's own early median


@dataclass
class CameraWatch:
    labels: deque = field(default_factory=lambda: deque(maxlen=WINDOW))
    p_values: deque = field(default_factory=lambda: deque(maxlen=WINDOW))
    previous: np.ndarray | None = None
    same: int = 0
    brightness: float | None = None
    sharpness: float | None = None
    sharpness_baseline: list = field(default_factory=list)

    def frame(self, image_bgr: np.ndarray | None) -> None:
        import cv2

        if image_bgr is None:
            return
        grey = cv2.cvtColor(cv2.resize(image_bgr, (64, 48), interpolation=cv2.INTER_AREA), cv2.COLOR_BGR2GRAY)
        if self.previous is not None and np.abs(grey.astype(np.int16) - self.previous).mean() < 0.5:
            self.same += 1
        else:
            self.same = 0
        self.previous = grey.astype(np.int16)
        self.brightness = float(grey.mean())
        self.sharpness = float(cv2.Laplacian(grey, cv2.CV_32F).var())
        if len(self.sharpness_baseline) < 50:
            self.sharpness_baseline.append(self.sharpness)

    def decision(self, label: str | None, p_value: float | None) -> None:
        if label in ("OK", "NG"):
            self.labels.append(label == "NG")
        if p_value is not None:
            self.p_values.append(p_value)

    def warnings(self, camera: str, alpha: float | None) -> list[dict]:
        out = []
        if self.same >= FROZEN_FRAMES:
            out.append({"camera": camera, "kind": "frozen_frame", "detail": f"{self.same} identical frames in a row"})
        if self.brightness is not None and self.brightness < DARK:
            out.append({"camera": camera, "kind": "black_frame", "detail": f"mean grey {self.brightness:.0f}"})
        if self.brightness is not None and self.brightness > BRIGHT:
            out.append({"camera": camera, "kind": "over_exposed", "detail": f"mean grey {self.brightness:.0f}"})
        if len(self.sharpness_baseline) >= 50 and self.sharpness is not None:
            baseline = float(np.median(self.sharpness_baseline))
            if baseline > 0 and self.sharpness < BLUR_DROP * baseline:
                share = self.sharpness / baseline
                out.append({"camera": camera, "kind": "blur",
                            "detail": f"sharpness {self.sharpness:.1f}, {share:.0%} of its start"})
        out += self.statistics(camera, alpha)
        return out

    def statistics(self, camera: str, alpha: float | None) -> list[dict]:
        out = []
        n = len(self.labels)
        if alpha is not None and n >= MIN_DECISIONS:
            from scipy.stats import binomtest

            ng = int(sum(self.labels))
            p = binomtest(ng, n, alpha, alternative="greater").pvalue
            if p < ALARM_P:
                out.append({"camera": camera, "kind": "ng_rate", "detail": f"{ng}/{n} NG in the last {n} parts "
                            f"against a calibrated false-alarm rate of {alpha:g} (binomial p = {p:.1e})"})
        if len(self.p_values) >= MIN_DECISIONS:
            from scipy.stats import kstest

            p = kstest(list(self.p_values), "uniform").pvalue
            if p < ALARM_P:
                out.append({"camera": camera, "kind": "p_values", "detail": f"the last {len(self.p_values)} p-values "
                            f"are not uniform (KS p = {p:.1e}): the parts, the light or the camera changed?"})
        return out
