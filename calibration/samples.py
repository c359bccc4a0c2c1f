"""Deterministic synthetic inspection images (textured surfaces, some with a scratch or a blob defect).

The default verify images of the export's parity gate and the README demo's inputs; not part of the edge runtime's
inference path. Usage: ``python -m clipad.calibration.samples OUT_DIR [--count N]``.
"""
from __future__ import annotations

import argparse
import os
import sys

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from clipad.runtime.atomic import write_atomic


def synthetic_image(index: int, seed: int = 0) -> tuple[Image.Image, bool]:
    """(image, has_defect). Sizes and modes vary (RGB / greyscale, landscape / portrait) like real line images."""
    rng = np.random.default_rng([seed, index])
    w, h = int(rng.integers(200, 640)), int(rng.integers(200, 640))
    base = rng.normal(128, 18, size=(h // 4 + 1, w // 4 + 1))
    tex = Image.fromarray(np.clip(base, 0, 255).astype(np.uint8)).resize((w, h), Image.Resampling.BICUBIC)
    tex = tex.filter(ImageFilter.GaussianBlur(1.5))
    arr = np.asarray(tex, dtype=np.float32) + rng.normal(0, 6, size=(h, w))
    tint = rng.uniform(0.8, 1.2, size=3)
    rgb = np.clip(arr[..., None] * tint, 0, 255).astype(np.uint8)
    im = Image.fromarray(rgb, "RGB")
    defect = index % 2 == 1
    if defect:
        draw = ImageDraw.Draw(im)
        x0, y0 = int(rng.integers(w // 5, w // 2)), int(rng.integers(h // 5, h // 2))
        if index % 4 == 1:
            draw.line([(x0, y0), (x0 + w // 3, y0 + h // 4)], fill=(25, 20, 20), width=max(3, w // 80))
        else:
            r = max(6, min(w, h) // 12)
            draw.ellipse([x0, y0, x0 + r, y0 + r], fill=(230, 225, 210))
    if index % 3 == 2:
        im = im.convert("L")
    return im, defect


def write_samples(folder: str, count: int = 6, seed: int = 0) -> list[str]:
    os.makedirs(folder, exist_ok=True)
    paths = []
    for i in range(count):
        im, defect = synthetic_image(i, seed)
        path = os.path.join(folder, f"sample_{i:02d}_{'defect' if defect else 'good'}.png")
        write_atomic(path, lambda fh: im.save(fh, format="PNG"))
        paths.append(path)
    return paths


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m clipad.calibration.samples", description=__doc__.splitlines()[0])
    ap.add_argument("out_dir")
    ap.add_argument("--count", type=int, default=6)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    for p in write_samples(args.out_dir, args.count, args.seed):
        print(p)
    return 0


if __name__ == "__main__":
    sys.exit(main())
