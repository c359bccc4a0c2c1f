"""Display helpers: map resize/scale/colorize, overlay drawing, atomic saves (OK/NG: test_decision.py)."""
from __future__ import annotations

import os

import numpy as np
import pytest

cv2 = pytest.importorskip("cv2")

from clipad.runtime.errors import ClipadError  # noqa: E402
from clipad.runtime.postprocess import (  # noqa: E402
    colorize, overlay, resize_map, save_image_atomic, save_npy_atomic, scale_for_display)


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


def test_scale_for_display():
    m = np.array([[0.0, 0.25], [0.5, 1.0]], np.float32)
    np.testing.assert_allclose(scale_for_display(m, 0.25, 0.75), [[0.0, 0.0], [0.5, 1.0]])
    assert scale_for_display(m, 0.5, 0.5).tolist() == [[0, 0], [0, 0]]  # high <= low → zeros
    assert not scale_for_display(m, 1.0, 0.0).any()
    assert scale_for_display(np.array([np.nan, 2.0]), 0.0, 1.0).tolist() == [0.0, 1.0]


def test_colorize_jet():
    c = colorize(np.array([[0.0, 1.0, 5.0, -3.0]], np.float32))
    assert c.shape == (1, 4, 3) and c.dtype == np.uint8
    cold, hot = c[0, 0], c[0, 1]
    assert cold[0] > cold[2]  # 0 → blue (BGR)
    assert hot[2] > hot[0]    # 1 → red
    assert (c[0, 2] == hot).all() and (c[0, 3] == cold).all()  # clipped into [0, 1]


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
    from clipad.runtime.postprocess import display_index

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
