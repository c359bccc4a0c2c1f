"""Display helpers for anomaly maps: resize, colorize, overlay with text/border, atomic saves (the OK/NG rule is
``decision``).

The map maths (upsampling to the model input, smoothing, normalisation) lives in the model graph; this module only
resizes to the frame and draws. Everything is BGR uint8 as OpenCV uses; cv2 is imported lazily.
"""
from __future__ import annotations

import os
from typing import Sequence

import numpy as np

from .atomic import write_atomic
from .errors import ClipadError

RED = (0, 0, 255)      # BGR
GREEN = (0, 255, 0)
WHITE = (255, 255, 255)


def _as_map(anomaly_map: np.ndarray) -> np.ndarray:
    m = np.asarray(anomaly_map, dtype=np.float32)
    while m.ndim > 2 and m.shape[0] == 1:  # tolerate [1, S, S] / [1, 1, S, S]
        m = m[0]
    if m.ndim != 2 or 0 in m.shape:
        raise ClipadError(f"anomaly map has shape {np.shape(anomaly_map)}; expected [H, W]")
    return m


def resize_map(anomaly_map: np.ndarray, width: int, height: int) -> np.ndarray:
    """[S, S] float map → [height, width] float32 (bilinear)."""
    import cv2

    if int(width) <= 0 or int(height) <= 0:
        raise ClipadError(f"cannot resize an anomaly map to {width}x{height}")
    m = _as_map(anomaly_map)
    if m.shape == (height, width):
        return m.copy()
    return cv2.resize(m, (int(width), int(height)), interpolation=cv2.INTER_LINEAR).astype(np.float32, copy=False)


def display_index(anomaly_map: np.ndarray, low: float, high: float) -> np.ndarray:
    """[H, W] map → uint8 colour indices: round(255 · (x − low) / (high − low)) clipped to [0, 255]; NaN → 0, all 0
    when high <= low."""
    import cv2

    m = _as_map(anomaly_map)
    if not (high > low):
        return np.zeros(m.shape, np.uint8)
    alpha = 255.0 / (high - low)
    if alpha * max(abs(low), abs(high), 1.0) < 1e6 and np.isfinite(m).all():
        # One OpenCV pass (saturating, rounding like rint; ±1 at exact halves); max() first so abs() flips nothing.
        # Non-finite maps and ranges too narrow for its double-precision offset take the NumPy path below.
        return cv2.convertScaleAbs(cv2.max(m, float(low)), alpha=alpha, beta=-float(low) * alpha)
    x = (m - np.float32(low)) * np.float32(255.0 / (high - low))
    np.nan_to_num(x, copy=False, nan=0.0, posinf=255.0, neginf=0.0)
    np.clip(x, 0.0, 255.0, out=x)
    return np.rint(x).astype(np.uint8)


def _as_bgr(frame: np.ndarray) -> np.ndarray:
    import cv2

    f = np.asarray(frame)
    if f.dtype != np.uint8:
        raise ClipadError(f"frame has dtype {f.dtype}; expected uint8 BGR")
    if f.ndim == 2 or (f.ndim == 3 and f.shape[2] == 1):
        return cv2.cvtColor(f.reshape(f.shape[:2]), cv2.COLOR_GRAY2BGR)
    if f.ndim == 3 and f.shape[2] == 4:
        return np.ascontiguousarray(f[:, :, :3])
    if f.ndim != 3 or f.shape[2] != 3 or 0 in f.shape:
        raise ClipadError(f"frame has shape {f.shape}; expected HxWx3 BGR")
    return np.ascontiguousarray(f)


def draw_text_block(image: np.ndarray, lines: Sequence[str], origin: tuple[int, int] = (0, 0),
                    label: str | None = None) -> np.ndarray:
    """Draw ``lines`` top-left on a darkened box (in place); a line containing the label word is drawn in its colour."""
    import cv2

    lines = [str(t) for t in lines if t is not None and str(t) != ""]
    if not lines:
        return image
    h, w = image.shape[:2]
    font = cv2.FONT_HERSHEY_SIMPLEX
    scale = max(0.4, min(h, w) / 640.0)
    while True:   # shrink the font until the widest line fits a narrow frame (down to 0.25), then wrap
        thick = max(1, int(round(scale * 1.6)))
        pad = max(3, int(round(6 * scale)))
        room = w - origin[0] - 2 * pad
        widest = max(cv2.getTextSize(t, font, scale, thick)[0][0] for t in lines)
        if widest <= room:
            break
        if scale <= 0.25:
            lines = [part for line in lines for part in _wrap(line, font, scale, thick, room)]
            break
        scale = max(0.25, min(0.9 * scale, scale * room / widest))
    sizes = [cv2.getTextSize(t, font, scale, thick) for t in lines]
    line_h = max(s[0][1] + s[1] for s in sizes) + pad
    x0, y0 = origin
    x1 = min(w, x0 + max(s[0][0] for s in sizes) + 2 * pad)
    y1 = min(h, y0 + line_h * len(lines) + pad)
    if x1 > x0 and y1 > y0:
        roi = image[y0:y1, x0:x1]
        roi[:] = cv2.convertScaleAbs(roi, alpha=0.3)  # dark translucent background
    for i, (text, ((_, th), base)) in enumerate(zip(lines, sizes)):
        color = {"NG": RED, "OK": GREEN}.get(label, WHITE) if label and label in text.split() else WHITE
        y = y0 + pad + i * line_h + th
        cv2.putText(image, text, (x0 + pad, y), font, scale, color, thick, cv2.LINE_AA)
    return image


def _wrap(line: str, font, scale: float, thick: int, room: int) -> list[str]:
    """``line`` broken at spaces into pieces at most ``room`` pixels wide (a single word wider than that is cut)."""
    import cv2

    def fits(text):
        return cv2.getTextSize(text, font, scale, thick)[0][0] <= room

    out, current = [], ""
    for word in line.split():
        candidate = f"{current} {word}".strip()
        if fits(candidate):
            current = candidate
            continue
        if current:
            out.append(current)
        while word and not fits(word):
            cut = max(1, next((i for i in range(len(word), 0, -1) if fits(word[:i])), 1))
            out.append(word[:cut])
            word = word[cut:]
        current = word
    return out + ([current] if current else [])


def find_regions(anomaly_map: np.ndarray, threshold: float, width: int, height: int, max_regions: int = 50,
                 ensure_peak: bool = False) -> tuple[np.ndarray, list[dict]]:
    """Defect regions where the map, resized to the frame, reaches ``threshold``: (mask uint8 [height, width], 255 =
    defect; regions, largest maximum first, at most ``max_regions``: {"bbox": [x, y, w, h], "area": pixels, "max":
    map maximum inside, "kind": "defect"}). Regions are 8-connected.

    ``ensure_peak`` (an NG part): when no pixel of the resized map reaches ``threshold`` (resizing lowers peaks, and
    the image-level rule can call a part NG whose map stays below the pixel threshold), the region around the map's
    peak is reported instead, with ``"kind": "peak"``, and drawn in the mask, so an NG part always shows where."""
    import cv2

    m = resize_map(anomaly_map, width, height)
    clean = np.nan_to_num(m, nan=-np.inf)
    mask = np.where(clean >= threshold, 255, 0).astype(np.uint8)
    kind = "defect"
    if ensure_peak and not mask.any() and np.isfinite(clean).any():
        peak = float(clean.max())
        mask = np.where(clean >= peak - 1e-6 * max(abs(peak), 1.0), 255, 0).astype(np.uint8)
        kind = "peak"
    count, labels, stats, _ = cv2.connectedComponentsWithStats(mask, connectivity=8)
    regions = []
    if count > 1:
        maxima = np.full(count, -np.inf)
        np.maximum.at(maxima, labels.ravel(), m.ravel())
        for i in range(1, count):
            x, y, w, h, area = (int(v) for v in stats[i])
            regions.append({"bbox": [x, y, w, h], "area": area, "max": float(maxima[i]), "kind": kind})
        regions.sort(key=lambda r: -r["max"])
    return mask, regions[:max_regions]


def scale_regions(regions: list[dict], factor: float) -> list[dict]:
    """Regions found on a reduced image, in the original image's pixels."""
    return [{**r, "bbox": [int(round(v * factor)) for v in r["bbox"]],
             "area": int(round(r["area"] * factor * factor))} for r in regions]


def resize_mask(mask: np.ndarray, size: tuple[int, int] | None) -> np.ndarray:
    """A 0/255 mask at ``size`` (width, height) with nearest neighbour; unchanged when size is None."""
    import cv2

    if size is None or (mask.shape[1], mask.shape[0]) == tuple(size):
        return mask
    return cv2.resize(mask, tuple(int(v) for v in size), interpolation=cv2.INTER_NEAREST)


def overlay(frame_bgr: np.ndarray, anomaly_map: np.ndarray, low: float, high: float, alpha: float = 0.5,
            text_lines: list[str] | None = None, label: str | None = None,
            region_mask: np.ndarray | None = None) -> np.ndarray:
    """Heat-map overlay on the frame (same size, BGR uint8), with text top-left, a red (NG) / green (OK) border and
    the contours of ``region_mask`` (the defect regions) in white."""
    import cv2

    frame = _as_bgr(frame_bgr)
    h, w = frame.shape[:2]
    # Scaled to 8-bit colour indices at the map's resolution, then resized: the full-resolution work is one
    # single-channel resize, one colour lookup and one blend (≈3x faster at 1080p than colouring the resized floats).
    index = display_index(anomaly_map, low, high)
    if index.shape != (h, w):
        index = cv2.resize(index, (w, h), interpolation=cv2.INTER_LINEAR)
    heat = cv2.applyColorMap(index, cv2.COLORMAP_JET)
    a = float(np.clip(alpha, 0.0, 1.0))
    out = cv2.addWeighted(frame, 1.0 - a, heat, a, 0.0)
    if region_mask is not None and region_mask.any():
        contours, _ = cv2.findContours(region_mask, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
        cv2.drawContours(out, contours, -1, WHITE, max(1, int(round(min(h, w) / 300))))
    border = max(2, int(round(min(h, w) / 80))) if label in ("OK", "NG") else 0
    if border:
        color = RED if label == "NG" else GREEN
        b = min(border, h, w)
        out[:b, :] = color
        out[-b:, :] = color
        out[:, :b] = color
        out[:, -b:] = color
    if text_lines:
        m = border + max(2, int(round(min(h, w) / 160)))
        draw_text_block(out, text_lines, origin=(min(m, w - 1), min(m, h - 1)), label=label)
    return out


def save_image_atomic(path: str, image_bgr: np.ndarray) -> str:
    """Encode by the path's extension (.png, .jpg, ...) and replace ``path`` atomically; returns the path."""
    import cv2

    path = os.fspath(path)
    ext = os.path.splitext(path)[1].lower()
    if not ext:
        raise ClipadError(f"{path}: output image needs an extension such as .png or .jpg")
    try:
        ok, buf = cv2.imencode(ext, np.ascontiguousarray(image_bgr))
    except cv2.error:
        ok, buf = False, None
    if not ok:
        raise ClipadError(f"{path}: could not encode the image as {ext}")
    return write_atomic(path, lambda f: f.write(buf.tobytes()))


def save_npy_atomic(path: str, array: np.ndarray) -> str:
    """np.save to a temp file beside ``path`` and replace ``path`` atomically; returns the path.

    np.save is given an open file, so it appends no ".npy" to the temp name; ``path`` is written exactly as given.
    """
    return write_atomic(os.fspath(path), lambda f: np.save(f, np.asarray(array), allow_pickle=False))
