"""clipad.benchmarks.metrics against an independent exact implementation: streamed pixel AUROC / AP / F1-max / AUPRO
within 1e-3 of the exact values (sorting every pixel), over sets with good images, several and diagonal-touching
regions, ties and score ranges that force the histogram to widen; memory that does not grow with the image count."""
from __future__ import annotations

import gc
import tracemalloc

import numpy as np
import pytest
from scipy import ndimage
from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score

from clipad.benchmarks.metrics import PixelMetrics, gt_regions, image_metrics

METRICS = ("auroc", "ap", "f1_max", "aupro")


def exact_aupro(maps, masks, limit: float = 0.3) -> float:
    """AUPRO from the MVTec AD definition: 8-connected regions over all images, a threshold at every distinct score,
    FPR over all defect-free pixels, PRO = mean region overlap, trapezoid up to ``limit`` (interpolated), / limit."""
    scores, ok, weight, regions = [], [], [], 0
    for amap, mask in zip(maps, masks):
        labels, n = ndimage.label(mask, structure=np.ones((3, 3), int))
        regions += n
        w = np.zeros(mask.shape)
        for r in range(1, n + 1):
            w[labels == r] = 1.0 / np.count_nonzero(labels == r)
        scores.append(np.asarray(amap, np.float64).ravel())
        ok.append((labels == 0).ravel())
        weight.append(w.ravel())
    s, ok, weight = np.concatenate(scores), np.concatenate(ok), np.concatenate(weight)
    order = np.argsort(-s, kind="stable")
    s, ok, weight = s[order], ok[order], weight[order]
    last_of_tie = np.append(s[1:] != s[:-1], True)  # the curve point at threshold t takes every score >= t
    x = np.concatenate(([0.0], (np.cumsum(ok) / ok.sum())[last_of_tie]))
    y = np.concatenate(([0.0], (np.cumsum(weight) / regions)[last_of_tie]))
    x0, x1, y0, y1 = x[:-1], x[1:], y[:-1], y[1:]
    seg = x0 < limit
    x0, x1, y0, y1 = x0[seg], x1[seg], y0[seg], y1[seg]
    x1c = np.minimum(x1, limit)
    steep = x1 > x0
    y1c = np.where(steep, y0 + (y1 - y0) * (x1c - x0) / np.where(steep, x1 - x0, 1.0), y1)
    return float(np.sum(0.5 * (y0 + y1c) * (x1c - x0))) / limit


def exact_pixel(maps, masks) -> dict:
    s = np.concatenate([np.asarray(m, np.float64).ravel() for m in maps])
    y = np.concatenate([np.asarray(k, bool).ravel() for k in masks])
    p, r, _ = precision_recall_curve(y, s)
    f1 = np.where(p + r > 0, 2 * p * r / np.maximum(p + r, 1e-300), 0.0)
    return {"auroc": roc_auc_score(y, s), "ap": average_precision_score(y, s), "f1_max": float(f1.max()),
            "aupro": exact_aupro(maps, masks)}


def streamed(maps, masks, **kw) -> dict:
    pm = PixelMetrics(**kw)
    for m, k in zip(maps, masks):
        pm.add(m, k)
    return pm.result()


def make_set(seed: int, quantize: bool = False):
    """8 images of 40x48: 2 good, the rest with 1-3 regions (one image has two squares touching only at a corner);
    image 0 in [0, 1], later ones rescaled and shifted, with hot / cold pixels up to 150 and down to -40 (image 4,
    on a defect, and 6) and image 7 in [-2, 2], so the histogram range has to widen."""
    rng = np.random.default_rng(seed)
    maps, masks = [], []
    for i in range(8):
        mask = np.zeros((40, 48), bool)
        if i == 3:
            mask[2:6, 2:6] = True
            mask[6:10, 6:10] = True  # touches the first square only diagonally
            mask[20:24, 30:40] = True
        elif i not in (1, 5):
            for _ in range(1 + i % 3):
                r, c = rng.integers(0, 34), rng.integers(0, 40)
                mask[r:r + rng.integers(3, 10), c:c + rng.integers(3, 12)] = True
        amap = rng.random(mask.shape) + mask * (0.3 + rng.random(mask.shape))
        amap = amap / amap.max()
        if i >= 2:
            amap = amap * [1.0, 1.3, 0.8, 1.1][i % 4] - [0.0, 0.2, -0.1, 0.3][i % 4]
        if i == 4:
            amap[np.argwhere(mask)[0][0], np.argwhere(mask)[0][1]] = 150.0
        if i == 6:
            amap[-1, -1] = -40.0
        if i == 7:
            amap = 4 * amap - 2
        if quantize:
            amap = np.round(amap, 2)
        maps.append(amap.astype(np.float32))
        masks.append(mask)
    return maps, masks


def test_exact_reference_by_hand():
    # one region {0, 1} (scores 0.9, 0.5); defect-free scores 0.8, 0.5 (a tie with the region), 0.2, 0.1.
    # Curve: (0,0) (0,.5) [t=.9] (.25,.5) [t=.8] (.5,1) [t=.5] (.75,1) (1,1). Up to 0.3: 0.25*0.5 = 0.125, then
    # PRO(0.3) = 0.5 + 0.5 * 0.05/0.25 = 0.6 -> 0.05 * (0.5 + 0.6)/2 = 0.0275; (0.125 + 0.0275) / 0.3 = 0.508333...
    amap = np.array([[0.9, 0.5, 0.8, 0.5, 0.2, 0.1]])
    mask = np.array([[True, True, False, False, False, False]])
    assert exact_aupro([amap], [mask]) == pytest.approx(0.1525 / 0.3, abs=1e-12)
    got = streamed([amap], [mask])
    assert got["aupro"] == pytest.approx(0.1525 / 0.3, abs=1e-9)
    assert got["regions"] == 1 and got["pixels"] == 6 and got["defect_pixels"] == 2
    # two separate regions of one pixel each: PRO steps by 1/2 per region, not by pixel share
    amap2 = np.array([[0.9, 0.3, 0.7, 0.1, 0.2, 0.05]])
    mask2 = np.array([[True, False, True, False, False, False]])
    # (0,0) (0,.5) [.9] (0,1) [.7] (.25,1) [.3] ... -> area to 0.3 = 0.3 -> AUPRO 1
    assert exact_aupro([amap2], [mask2]) == pytest.approx(1.0, abs=1e-12)
    assert streamed([amap2], [mask2])["aupro"] == pytest.approx(1.0, abs=1e-9)


def test_gt_regions_use_8_connectivity():
    _, masks = make_set(0)
    labels, n = gt_regions(masks[3])
    assert labels.dtype == np.int32 and labels.shape == masks[3].shape
    assert n == 2  # the diagonal pair is one region
    assert ndimage.label(masks[3])[1] == 3  # 4-connectivity would split it
    assert set(np.unique(labels)) == {0, 1, 2}
    assert np.array_equal(labels > 0, masks[3])
    assert gt_regions(np.zeros((5, 7), bool))[1] == 0


@pytest.mark.parametrize("quantize", [False, True])
def test_streamed_matches_exact(quantize):
    maps, masks = make_set(1, quantize)
    exact = exact_pixel(maps, masks)
    got = streamed(maps, masks)
    regions = sum(ndimage.label(k, structure=np.ones((3, 3), int))[1] for k in masks)
    assert got["regions"] == regions
    assert got["pixels"] == 8 * 40 * 48 and got["defect_pixels"] == sum(int(k.sum()) for k in masks)
    assert got["reason"] is None
    for key in METRICS:
        assert 0.05 < exact[key] < 0.95, (key, exact[key])  # not a trivial set (all 0 or all 1)
        assert abs(got[key] - exact[key]) < 1e-3, (key, got[key], exact[key])
    if quantize:
        # scores 0.01 apart land in separate bins, so every exact curve point is kept: equal up to rounding
        for key in METRICS:
            assert abs(got[key] - exact[key]) < 1e-9, (key, got[key], exact[key])


def test_range_widening_keeps_counts_and_is_order_independent():
    maps, masks = make_set(2)
    pm = PixelMetrics()
    pm.add(maps[0], masks[0])
    width0 = pm._e
    for m, k in zip(maps[1:], masks[1:]):
        pm.add(m, k)
    assert pm._e > width0  # the histogram had to widen (bins merged) for the later ranges
    forward = pm.result()
    backward = streamed(maps[::-1], masks[::-1])
    exact = exact_pixel(maps, masks)
    assert forward["pixels"] == backward["pixels"] == 8 * 40 * 48
    for key in METRICS:
        assert abs(forward[key] - exact[key]) < 1e-3, key
        assert abs(backward[key] - exact[key]) < 1e-3, key


def test_constant_first_image_then_wide_range():
    rng = np.random.default_rng(3)
    mask = np.zeros((30, 30), bool)
    mask[10:15, 10:20] = True
    maps = [np.zeros((30, 30)), rng.random((30, 30)) + mask, 50 * rng.random((30, 30)) + 30 * mask - 25]
    masks = [np.zeros((30, 30), bool), mask, mask]
    exact, got = exact_pixel(maps, masks), streamed(maps, masks)
    for key in METRICS:
        assert abs(got[key] - exact[key]) < 1e-3, (key, got[key], exact[key])


def test_memory_does_not_grow_with_images():
    gt_regions(np.zeros((4, 4), bool))  # import cv2 before tracing
    rng = np.random.default_rng(4)
    tracemalloc.start()
    try:
        gc.collect()
        start = tracemalloc.get_traced_memory()[0]
        pm = PixelMetrics()
        for i in range(100):
            mask = np.zeros((64, 64), bool)
            mask[i % 50:i % 50 + 6, 10:20] = True
            pm.add(rng.random((64, 64)) + mask, mask)
            del mask
            if i == 4:
                gc.collect()
                after5 = tracemalloc.get_traced_memory()[0] - start
        gc.collect()
        after100 = tracemalloc.get_traced_memory()[0] - start
    finally:
        tracemalloc.stop()
    assert abs(after100 - after5) < 8 * 1024, (after5, after100)
    assert 3 * pm.bins * 8 <= after5 < 10 * 1024 * 1024, after5  # the three histograms, nothing per image
    assert pm.result()["pixels"] == 100 * 64 * 64


def test_image_metrics_hand_case_and_sklearn():
    labels, scores = [False, False, True, True], [0.1, 0.6, 0.4, 0.8]
    got = image_metrics(labels, scores)
    assert got["reason"] is None
    assert got["auroc"] == pytest.approx(0.75)
    assert got["ap"] == pytest.approx(0.5 + 0.5 * 2 / 3)
    assert got["f1_max"] == pytest.approx(0.8)  # threshold 0.4: P = 2/3, R = 1
    rng = np.random.default_rng(5)
    y = rng.random(60) < 0.4
    s = rng.random(60) + 0.5 * y
    got = image_metrics(y.astype(int), s)
    assert got["auroc"] == pytest.approx(roc_auc_score(y, s), abs=1e-12)
    assert got["ap"] == pytest.approx(average_precision_score(y, s), abs=1e-12)
    p, r, _ = precision_recall_curve(y, s)
    assert got["f1_max"] == pytest.approx(np.max(2 * p * r / np.maximum(p + r, 1e-300)), abs=1e-12)


def test_image_metrics_single_class_and_bad_input():
    good = image_metrics([0, 0, 0], [0.1, 0.2, 0.3])
    assert good["auroc"] is None and good["ap"] is None and good["f1_max"] is None
    assert "only good images" in good["reason"]
    bad = image_metrics([True, True], [0.1, 0.2])
    assert bad["auroc"] is None and bad["ap"] is None and bad["f1_max"] is None
    assert "only defective images" in bad["reason"]
    for value in (np.nan, np.inf):
        with pytest.raises(ValueError):
            image_metrics([0, 1, 1], [0.1, value, 0.3])
    with pytest.raises(ValueError):
        image_metrics([0, 1], [0.1, 0.2, 0.3])


def test_pixel_metrics_without_defects_or_without_good_pixels():
    pm = PixelMetrics()
    assert pm.result()["reason"] and pm.result()["auroc"] is None
    pm.add(np.random.default_rng(6).random((8, 8)), np.zeros((8, 8), bool))
    pm.add(np.full((8, 8), 3.0), np.zeros((8, 8), bool))
    res = pm.result()
    assert all(res[key] is None for key in METRICS)
    assert "no defect pixels" in res["reason"]
    assert res["pixels"] == 128 and res["defect_pixels"] == 0 and res["regions"] == 0
    only_defects = PixelMetrics()
    only_defects.add(np.random.default_rng(7).random((4, 4)), np.ones((4, 4), bool))
    res = only_defects.result()
    assert all(res[key] is None for key in METRICS) and "no defect-free pixels" in res["reason"]


def test_pixel_metrics_rejects_bad_maps_without_changing_state():
    pm = PixelMetrics()
    mask = np.zeros((6, 6), bool)
    mask[2:4, 2:4] = True
    pm.add(np.random.default_rng(8).random((6, 6)), mask)
    before = pm.result()
    amap = np.ones((6, 6))
    amap[1, 1] = np.nan
    with pytest.raises(ValueError):
        pm.add(amap, mask)
    amap[1, 1] = -np.inf
    with pytest.raises(ValueError):
        pm.add(amap, mask)
    with pytest.raises(ValueError):
        pm.add(np.ones((6, 5)), mask)
    assert pm.result() == before
