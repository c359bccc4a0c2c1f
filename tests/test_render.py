"""Rendering: map resize, colour indices, overlay drawing, regions and masks, atomic saves (OK/NG: test_decision.py)."""
from __future__ import annotations

import os

import numpy as np
import pytest

cv2 = pytest.importorskip("cv2")

from clipad.runtime.errors import ClipadError  # noqa: E402
from clipad.runtime.render import draw_text_block, find_regions, overlay, resize_map, save_image_atomic, save_npy_atomic  # noqa: E402


def hot_left_map(s: int = 16) -> np.ndarray:
    m = np.zeros((s, s), np.float32)
    m[:, : s // 2] = 1.0  # left half anomalous
    return m


def test_resize_map_shape_and_values():
    m = np.arange(16, dtype=np.float32).reshape(4, 4)
    out = resize_map(m, width=40, height=30)
    assert out.shape == (30, 40) and out.dtype == np.float32
    assert out.min() >= m.min() and out.max() <= m.max()  # bilinear never overshoots
    assert out[0, 0] < out[-1, -1]
    assert resize_map(m[None], 8, 8).shape == (8, 8)  # [1, S, S] tolerated
    np.testing.assert_array_equal(resize_map(m, 4, 4), m)
    with pytest.raises(ClipadError, match="expected"):
        resize_map(np.zeros((2, 3, 3), np.float32), 4, 4)


def test_overlay_shape_dtype_and_heat():
    frame = np.full((60, 90, 3), 128, np.uint8)
    out = overlay(frame, hot_left_map(), low=0.0, high=1.0, alpha=0.5)
    assert out.shape == frame.shape and out.dtype == np.uint8
    assert not np.array_equal(out, frame)
    left, right = out[30:50, 5:35].astype(int), out[30:50, 55:85].astype(int)
    assert (left[..., 2] - left[..., 0]).mean() > 50    # hot half is red
    assert (right[..., 0] - right[..., 2]).mean() > 50  # cold half is blue
    assert (frame == 128).all()  # input untouched
    same = overlay(frame, hot_left_map(), low=0.0, high=1.0, alpha=0.0)
    np.testing.assert_array_equal(same, frame)  # alpha 0 → frame only


def test_overlay_border_and_text():
    frame = np.full((120, 160, 3), 128, np.uint8)
    flat = np.zeros((8, 8), np.float32)
    ng = overlay(frame, flat, 0.0, 1.0, label="NG")
    ok = overlay(frame, flat, 0.0, 1.0, label="OK")
    plain = overlay(frame, flat, 0.0, 1.0)
    assert tuple(ng[0, 80]) == (0, 0, 255) and tuple(ng[60, -1]) == (0, 0, 255)
    assert tuple(ok[-1, 80]) == (0, 255, 0) and tuple(ok[60, 0]) == (0, 255, 0)
    assert tuple(plain[0, 80]) == tuple(plain[60, 80])  # no border without a label
    texted = overlay(frame, flat, 0.0, 1.0, text_lines=["score 0.91", "NG", "FPS 30.0"], label="NG")
    box = texted[4:40, 4:60].astype(int)
    assert not np.array_equal(texted, ng)
    assert box.mean() < ng[4:40, 4:60].mean()  # dark background box behind the text
    assert (box.max(axis=2) > 200).any()          # bright text pixels on it
    assert texted[60:, 80:].tolist() == ng[60:, 80:].tolist()  # text stays top-left


def test_overlay_accepts_grey_frame():
    out = overlay(np.full((20, 30), 50, np.uint8), hot_left_map(), 0.0, 1.0)
    assert out.shape == (20, 30, 3)
    with pytest.raises(ClipadError):
        overlay(np.zeros((20, 30, 3), np.float32), hot_left_map(), 0.0, 1.0)


@pytest.mark.parametrize("ext", [".png", ".jpg"])
def test_save_image_atomic(tmp_path, ext):
    img = np.zeros((20, 30, 3), np.uint8)
    img[:, :15] = (0, 0, 255)
    path = tmp_path / "out" / f"frame{ext}"
    assert save_image_atomic(str(path), img) == str(path)
    save_image_atomic(str(path), img)  # overwrite in place
    assert sorted(os.listdir(path.parent)) == [f"frame{ext}"]  # no temp files left
    back = cv2.imread(str(path))
    assert back.shape == img.shape
    if ext == ".png":
        np.testing.assert_array_equal(back, img)  # lossless
    else:  # JPEG: chroma blur at the edge, colours right away from it
        assert np.abs(back[:, :10].astype(int) - img[:, :10]).max() <= 12
        assert np.abs(back[:, 20:].astype(int) - img[:, 20:]).max() <= 12
    assert (os.stat(path).st_mode & 0o777) == (0o666 & ~_umask())


def _umask() -> int:
    old = os.umask(0)
    os.umask(old)
    return old


def test_save_image_atomic_errors(tmp_path):
    img = np.zeros((4, 4, 3), np.uint8)
    with pytest.raises(ClipadError, match="extension"):
        save_image_atomic(str(tmp_path / "noext"), img)
    with pytest.raises(ClipadError, match="could not encode"):
        save_image_atomic(str(tmp_path / "x.notaformat"), img)
    assert os.listdir(tmp_path) == []


def test_save_npy_atomic(tmp_path):
    arr = np.random.default_rng(0).random((5, 7)).astype(np.float32)
    for name in ("map.npy", "map_without_suffix"):
        path = tmp_path / name
        assert save_npy_atomic(str(path), arr) == str(path)
        np.testing.assert_array_equal(np.load(path), arr)
    assert sorted(os.listdir(tmp_path)) == ["map.npy", "map_without_suffix"]  # exact names, no temp/.npy leftovers
    save_npy_atomic(str(tmp_path / "map.npy"), arr * 2)
    np.testing.assert_array_equal(np.load(tmp_path / "map.npy"), arr * 2)
    assert len(os.listdir(tmp_path)) == 2


def test_failed_write_leaves_no_temp(tmp_path, monkeypatch):
    def boom(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(ClipadError, match="No space left"):
        save_npy_atomic(str(tmp_path / "m.npy"), np.zeros(3))
    assert os.listdir(tmp_path) == []


def test_display_index_fast_path_matches_the_formula():
    """The one-pass OpenCV conversion equals round(255·(x−low)/(high−low)) clipped (±1 at exact halves), and
    non-finite maps or very narrow ranges (the NumPy path) keep NaN → 0, +inf → 255, −inf → 0."""
    from clipad.runtime.render import display_index

    rng = np.random.default_rng(1)
    for low, high, offset in ((0, 1, 0), (0.3, 0.7, 0), (-2, 5, 0), (0.5, 0.5000001, 0), (1000, 1001, 1000)):
        m = rng.normal(0.5, 1, (200, 200)).astype(np.float32) + offset
        ref = np.rint(np.clip((m - np.float32(low)) * np.float32(255.0 / (high - low)), 0, 255)).astype(np.uint8)
        got = display_index(m, low, high)
        assert got.dtype == np.uint8 and np.abs(got.astype(int) - ref).max() <= 1 and (got != ref).mean() < 1e-3
    m = np.zeros((3, 3), np.float32)
    m[0, 0], m[1, 1], m[2, 2] = np.nan, np.inf, -np.inf
    assert display_index(m, 0, 1)[0, 0] == 0 and display_index(m, 0, 1)[1, 1] == 255
    assert display_index(m, 0, 1)[2, 2] == 0 and not display_index(m, 1, 1).any()


def test_regions_of_a_part_whose_peak_the_resize_lowers():
    """The decision score (map max) reaches the threshold, but resizing to a smaller frame lowers the peak: without
    ensure_peak no region is found; with it (an NG part) the peak region is reported, marked, and in the mask."""
    m = np.zeros((16, 16), np.float32)
    m[7, 9] = 1.0                      # a one-pixel peak exactly at the threshold
    mask, regions = find_regions(m, 1.0, 10, 10)
    assert regions == [] and not mask.any()
    mask, regions = find_regions(m, 1.0, 10, 10, ensure_peak=True)
    assert len(regions) == 1 and regions[0]["kind"] == "peak" and mask.any()
    x, y, w, h = regions[0]["bbox"]
    assert 4 <= x + w / 2 <= 7 and 3 <= y + h / 2 <= 6     # where the peak is, in frame pixels
    mask, regions = find_regions(m, 0.5, 32, 32, ensure_peak=True)   # upscaled: a real region, kind defect
    assert regions and all(r["kind"] == "defect" for r in regions)
    nan_map = np.full((4, 4), np.nan, np.float32)
    assert find_regions(nan_map, 1.0, 8, 8, ensure_peak=True)[1] == []   # nothing finite: no invented region


@pytest.mark.parametrize("width", [429, 200, 120])
def test_overlay_text_fits_narrow_frames(width):
    """The text block shrinks until its widest line fits (the 429 px image ran off the right edge)."""
    frame = np.zeros((300, width, 3), np.uint8)
    lines = ["bottle: score 0.4251  map max 9.1421", "decision 0.3914  p 0.909", "NG"]
    out = draw_text_block(frame.copy(), lines, label="NG")
    drawn = np.flatnonzero((out > 0).any(axis=(0, 2)))
    assert drawn.size and drawn.max() < width - 1     # the last column stays untouched: nothing ran off
    wide = draw_text_block(np.zeros((300, 2000, 3), np.uint8), lines, label="NG")
    assert np.flatnonzero((wide > 0).any(axis=(0, 2))).max() < 2000 // 2
