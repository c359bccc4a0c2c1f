"""Time the display post-processing of one frame: map resize to the frame + JET + blend + text.

``python -m clipad.benchmarks.overlay_timing [--width 1920 --height 1080 --map-size 518 --repeat 200 --threads 1]``
"""
from __future__ import annotations

import argparse
import sys
import time

import numpy as np

from clipad.runtime import render


def measure(width: int, height: int, map_size: int, repeat: int) -> dict:
    rng = np.random.default_rng(0)
    frame = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    amap = rng.random((map_size, map_size), dtype=np.float32)
    lines = ["bottle: score 0.5123  map max 1.9000", "OK", "12.0 FPS"]
    for _ in range(5):
        render.overlay(frame, amap, 0.0, 1.0, text_lines=lines, label="OK")
    times = {"resize_map": [], "overlay": []}
    for _ in range(repeat):
        t0 = time.perf_counter()
        render.resize_map(amap, width, height)
        t1 = time.perf_counter()
        render.overlay(frame, amap, float(amap.min()), float(amap.max()), text_lines=lines, label="OK")
        t2 = time.perf_counter()
        times["resize_map"].append(t1 - t0)
        times["overlay"].append(t2 - t1)
    return {k: {"p50_ms": 1e3 * float(np.median(v)), "p99_ms": 1e3 * float(np.percentile(v, 99))}
            for k, v in times.items()}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m clipad.benchmarks.overlay_timing", description=__doc__.splitlines()[0])
    ap.add_argument("--width", type=int, default=1920)
    ap.add_argument("--height", type=int, default=1080)
    ap.add_argument("--map-size", type=int, default=518)
    ap.add_argument("--repeat", type=int, default=200)
    ap.add_argument("--threads", type=int, default=1, help="OpenCV threads (default 1: one core)")
    args = ap.parse_args(argv)
    import cv2

    cv2.setNumThreads(args.threads)
    for name, r in measure(args.width, args.height, args.map_size, args.repeat).items():
        print(f"{name:10s} {args.width}x{args.height} from {args.map_size}²: p50 {r['p50_ms']:.2f} ms, "
              f"p99 {r['p99_ms']:.2f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
