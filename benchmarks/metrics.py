"""Image- and pixel-level anomaly-detection metrics: AUROC, AP, F1-max and AUPRO (MVTec AD definition).

Pixel metrics are streamed: ``PixelMetrics.add(map, mask)`` per image folds the image into three fixed-size histograms
over score bins, so memory does not grow with the number of images or pixels. Bin edges are exact multiples of a
power-of-two width, which makes every binned curve point a point of the exact curve (equal scores always share a bin)
and lets the range grow by merging adjacent bins without any loss of counts.
"""
from __future__ import annotations

import math

import numpy as np


def _check_labels(labels, n: int | None = None) -> np.ndarray:
    """A 1-D bool array from bool or 0/1 labels."""
    y = np.asarray(labels)
    if y.ndim != 1 or (n is not None and y.shape[0] != n):
        raise ValueError(f"labels must be 1-D with {n} entries, got shape {y.shape}")
    if y.dtype != bool:
        if not np.isin(y, (0, 1)).all():
            raise ValueError("labels must be bool or 0/1")
        y = y.astype(bool)
    return y


def image_metrics(labels, scores) -> dict:
    """Image-level AUROC, AP and F1-max of ``scores`` (float per image, higher = more anomalous) against ``labels``
    (bool or 0/1 per image, True = defective).

    Returns ``{"auroc", "ap", "f1_max", "reason"}``; when only one class is present the metrics are None and
    ``reason`` says why. Raises ValueError for non-finite scores or mismatched lengths.
    """
    from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score

    s = np.asarray(scores, dtype=np.float64)
    if s.ndim != 1:
        raise ValueError(f"scores must be 1-D, got shape {s.shape}")
    y = _check_labels(labels, s.shape[0])
    if not np.isfinite(s).all():
        raise ValueError(f"image scores contain {int((~np.isfinite(s)).sum())} non-finite values")
    out = {"auroc": None, "ap": None, "f1_max": None, "reason": None}
    defective = int(y.sum())
    if y.size == 0:
        out["reason"] = "no images"
    elif defective == 0:
        out["reason"] = "only good images: image AUROC needs defective ones"
    elif defective == y.size:
        out["reason"] = "only defective images: image AUROC needs good ones"
    else:
        precision, recall, _ = precision_recall_curve(y, s)
        out["auroc"] = float(roc_auc_score(y, s))
        out["ap"] = float(average_precision_score(y, s))
        out["f1_max"] = _f1_max(precision, recall)
    return out


def _f1_max(precision: np.ndarray, recall: np.ndarray) -> float:
    """max of 2PR/(P+R) over the curve's points, 0 where P+R = 0."""
    denom = precision + recall
    f1 = np.divide(2 * precision * recall, denom, out=np.zeros_like(denom, dtype=np.float64), where=denom > 0)
    return float(f1.max())


def gt_regions(mask) -> tuple[np.ndarray, int]:
    """Ground-truth defect regions of a bool mask [H, W]: the 8-connected components as an int32 label image
    (0 = background, 1..n = regions) and their count n."""
    import cv2

    m = np.asarray(mask)
    if m.ndim != 2:
        raise ValueError(f"mask must be 2-D [H, W], got shape {m.shape}")
    count, labels = cv2.connectedComponents((m != 0).astype(np.uint8), connectivity=8, ltype=cv2.CV_32S)
    return labels.astype(np.int32, copy=False), int(count) - 1


def _area_to(x: np.ndarray, y: np.ndarray, limit: float) -> float:
    """Trapezoidal area under the curve (x non-decreasing, ending at x = 1) from x = 0 to ``limit``, with y linearly
    interpolated at ``limit`` between the last point below it and the first point above it (the MVTec AD
    reference ``trapezoid``)."""
    i = int(np.searchsorted(x, limit, side="right"))  # x[:i] <= limit
    area = float(np.sum(0.5 * (y[1:i] + y[:i - 1]) * np.diff(x[:i])))
    if x[i - 1] < limit:
        y_at = y[i - 1] + (y[i] - y[i - 1]) * (limit - x[i - 1]) / (x[i] - x[i - 1])
        area += 0.5 * (y_at + y[i - 1]) * (limit - x[i - 1])
    return area


class PixelMetrics:
    """Streaming pixel AUROC, AP, F1-max and AUPRO (MVTec AD definition) with memory independent of the number of
    images: ``add(map, mask)`` per image, ``result()`` at the end.

    State: per score bin, the number of defect-free pixels, the number of defect pixels and a PRO weight (each defect
    pixel adds 1 / size of its ground-truth region). A threshold at a bin's lower edge counts the scores >= it, so
    FPR, TPR, precision and PRO are suffix sums. Bin ``i`` holds scores in ``[(base + i) * w, (base + i + 1) * w)``
    with ``w = 2**e``; ``floor(score / w)`` is exact, so ties never straddle an edge. When a score falls outside the
    window, ``e`` grows (pairs of bins merge) until everything fits, and the window is re-centred on the data.
    Memory: three arrays of ``bins`` 8-byte values (6 MiB at the default 2**18).
    """

    def __init__(self, bins: int = 1 << 18, fpr_limit: float = 0.3):
        if bins < 64:
            raise ValueError(f"bins must be >= 64, got {bins}")
        if not 0.0 < fpr_limit <= 1.0:
            raise ValueError(f"fpr_limit must be in (0, 1], got {fpr_limit}")
        self.bins = int(bins)
        self.fpr_limit = float(fpr_limit)
        self._neg = np.zeros(self.bins, np.int64)
        self._pos = np.zeros(self.bins, np.int64)
        self._pro = np.zeros(self.bins, np.float64)
        self._regions = 0
        self._e: int | None = None  # bin width is 2**_e; None until the first image
        self._base = 0  # global bin index (floor(score / width)) of array bin 0
        self._gmin = self._gmax = 0  # global indices of the lowest / highest bin that may hold data

    def add(self, anomaly_map, mask) -> None:
        """Fold one image in. anomaly_map: float [H, W] (any range; all finite, else ValueError); mask: bool (or
        integer, nonzero = defect) [H, W] of the same shape, all False for a good image."""
        scores = np.asarray(anomaly_map, dtype=np.float64)
        defect = np.asarray(mask)
        if scores.ndim != 2 or scores.size == 0:
            raise ValueError(f"anomaly map must be a non-empty 2-D array [H, W], got shape {scores.shape}")
        if defect.shape != scores.shape:
            raise ValueError(f"mask shape {defect.shape} differs from anomaly map shape {scores.shape}")
        if not (defect.dtype == bool or np.issubdtype(defect.dtype, np.integer)):
            raise ValueError(f"mask must be bool or integer, got {defect.dtype}")
        if not np.isfinite(scores).all():
            raise ValueError(f"anomaly map contains {int((~np.isfinite(scores)).sum())} non-finite values")
        labels, n = gt_regions(defect)
        self._make_room(float(scores.min()), float(scores.max()))
        idx = np.floor(scores.ravel() / math.ldexp(1.0, self._e)).astype(np.int64)
        idx -= self._base
        d = labels.ravel() > 0
        self._neg += np.bincount(idx[~d], minlength=self.bins)
        if n:
            pos_idx = idx[d]
            region = labels.ravel()[d]
            size = np.bincount(region)
            self._pos += np.bincount(pos_idx, minlength=self.bins)
            self._pro += np.bincount(pos_idx, weights=1.0 / size[region], minlength=self.bins)
            self._regions += n

    def _make_room(self, lo: float, hi: float) -> None:
        """Choose the bin width and window so that [lo, hi] and everything added so far fit, merging bins if needed."""
        big = max(abs(lo), abs(hi))
        if self._e is None:
            span = hi - lo
            if not (math.isfinite(span) and span > 0):
                span = big * 2.0 ** -30 if big > 0 else 2.0 ** -100
            e = math.frexp(span / (self.bins / 4))[1]  # the first image fills at most a quarter of the bins
        else:
            e = self._e
        if big > 0:
            e = max(e, math.frexp(big)[1] - 62)  # global bin indices must fit in int64
        e = max(e, -1074)  # smallest power of two a float holds
        while True:
            width = math.ldexp(1.0, e)
            a, b = math.floor(lo / width), math.floor(hi / width)
            if self._e is not None:
                shift = e - self._e
                a, b = min(a, self._gmin >> shift), max(b, self._gmax >> shift)
            if b - a < self.bins:
                break
            e += 1
        if self._e is not None and e == self._e and self._base <= a and b < self._base + self.bins:
            self._gmin, self._gmax = a, b
            return
        base = a - (self.bins - (b - a + 1)) // 2
        if self._e is not None:
            old = np.arange(self._gmin, self._gmax + 1, dtype=np.int64)
            target = np.right_shift(old, min(e - self._e, 63)) - base
            used = slice(self._gmin - self._base, self._gmax - self._base + 1)
            for name in ("_neg", "_pos", "_pro"):
                hist = getattr(self, name)
                merged = np.zeros_like(hist)
                np.add.at(merged, target, hist[used])
                setattr(self, name, merged)
        self._e, self._base, self._gmin, self._gmax = e, base, a, b

    def result(self) -> dict:
        """``{"auroc", "ap", "f1_max", "aupro", "pixels", "defect_pixels", "regions", "reason"}``. AUROC, AP
        (sklearn's step-wise average precision) and F1-max are over all pixels added; AUPRO is the area under
        the (FPR, PRO) curve up to ``fpr_limit``, divided by ``fpr_limit``. Without defect pixels (or without
        defect-free ones) the four metrics are None and ``reason`` says why."""
        n_neg, n_pos = int(self._neg.sum()), int(self._pos.sum())
        out = {"auroc": None, "ap": None, "f1_max": None, "aupro": None, "pixels": n_neg + n_pos,
               "defect_pixels": n_pos, "regions": self._regions, "reason": None}
        if n_neg + n_pos == 0:
            out["reason"] = "no images added"
        elif n_pos == 0:
            out["reason"] = "no defect pixels: pixel metrics need images with defect masks"
        elif n_neg == 0:
            out["reason"] = "no defect-free pixels: pixel metrics need some"
        if out["reason"]:
            return out
        used = slice(self._gmin - self._base, self._gmax - self._base + 1)
        neg, pos, pro = self._neg[used][::-1], self._pos[used][::-1], self._pro[used][::-1]  # high scores first
        keep = (neg + pos) > 0
        fp = np.cumsum(neg)[keep].astype(np.float64)
        tp = np.cumsum(pos)[keep].astype(np.float64)
        fpr = np.concatenate(([0.0], fp / n_neg))
        tpr = np.concatenate(([0.0], tp / n_pos))
        precision = tp / (tp + fp)
        out["auroc"] = float(np.sum(0.5 * (tpr[1:] + tpr[:-1]) * np.diff(fpr)))
        out["ap"] = float(np.sum(np.diff(tpr) * precision))
        out["f1_max"] = _f1_max(precision, tpr[1:])
        pro_curve = np.concatenate(([0.0], np.minimum(np.cumsum(pro)[keep] / self._regions, 1.0)))
        out["aupro"] = _area_to(fpr, pro_curve, self.fpr_limit) / self.fpr_limit
        return out
