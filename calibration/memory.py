"""A few-shot memory from normal images (``edge-calibrate --memory K``): their patch features through the same
backend and precision as ``edge-detect``, optionally thinned by PatchCore's greedy coreset, stored FP16 beside the
model (``clipad.runtime.fewshot``)."""
from __future__ import annotations

import datetime
import hashlib
import logging
import math
import os
import sys

import numpy as np

from clipad.runtime.errors import ClipadError

log = logging.getLogger("clipad")
PROJECTION_DIM = 128   # PatchCore's sparse random projection before the greedy search (Johnson–Lindenstrauss)


def file_sha256(path: str) -> str:
    with open(path, "rb") as fh:
        return hashlib.sha256(fh.read()).hexdigest()


def check_images(count: int, flag: str = "--memory") -> None:
    if count < 1:
        raise ClipadError(f"{flag} {count}: must be at least 1 image")


def check_coreset(share: float | None) -> None:
    """--coreset, wherever a memory is built: a share in (0, 1] (NaN fails the comparison too)."""
    if share is not None and not 0 < share <= 1:
        raise ClipadError(f"--coreset {share}: a share in (0, 1], e.g. 0.1")


def pick(files: list[str], count: int, seed: int) -> list[str]:
    """``count`` of ``files``, a seeded draw (in listing order)."""
    check_images(count)
    if count > len(files):
        raise ClipadError(f"--memory {count}: only {len(files)} normal image(s) listed")
    chosen = np.random.default_rng(seed).choice(len(files), size=count, replace=False)
    return [files[i] for i in sorted(chosen)]


def check_size(images: int, taps: int, patches: int, channels: int, coreset: float | None) -> None:
    """Refuse a memory whose features would not fit in RAM while it is built (all K images' features are held before
    the coreset thins them); warn when the memory makes each image's comparison large."""
    need = images * taps * patches * channels * 4
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    if need > total // 4:
        raise ClipadError(f"--memory {images}: the features of {images} images take {need / 1e9:.1f} GB while the "
                          f"memory is built, over a quarter of this machine's {total / 1e9:.0f} GB; use fewer images")
    rows = math.ceil((coreset or 1.0) * images * patches)
    per_image = patches * rows * 4
    if per_image > 256e6:
        log.warning("WARNING: a memory of %d rows per tap makes every image compare %.0f MB of similarities per tap; "
                    "--coreset 0.1 keeps a tenth (PatchCore's usual share)", rows, per_image / 1e6)


def features_of(detector, files: list[str], quiet: bool) -> tuple[np.ndarray, list[str]]:
    """[N, T, P, C] patch features of the readable ``files`` (the model's own outputs, no memory) and their
    content sha256s; an unreadable image is an error here (the user named these images for the memory)."""
    from tqdm import tqdm

    from clipad.runtime.preprocess import prepare

    rows, hashes = [], []
    for path in tqdm(files, desc="memory images", unit="img", disable=quiet, file=sys.stderr):
        outputs = detector.run_raw(prepare(path, detector.image_size)[None])
        if len(outputs) < 3:
            raise ClipadError(f"the {detector.backend.name} backend gives no patch_features; a few-shot memory "
                              f"runs on onnxruntime, openvino or tensorrt")
        features = np.asarray(outputs[2], np.float32)
        if not np.isfinite(features).all():
            raise ClipadError(f"{path}: the model gives non-finite patch features; no memory made")
        rows.append(features[0])
        hashes.append(file_sha256(path))
    return np.stack(rows), hashes


def greedy_coreset(points: np.ndarray, count: int, seed: int) -> np.ndarray:
    """Indices of ``count`` rows of ``points`` [M, C] by PatchCore's greedy k-center search on a random projection:
    each step takes the row farthest from everything taken so far."""
    rng = np.random.default_rng(seed)
    dim = min(PROJECTION_DIM, points.shape[1])
    z = points @ (rng.standard_normal((points.shape[1], dim)).astype(np.float32) / math.sqrt(dim))
    first = int(rng.integers(len(z)))
    chosen = [first]
    nearest = np.linalg.norm(z - z[first], axis=1)
    for _ in range(count - 1):
        i = int(np.argmax(nearest))
        chosen.append(i)
        np.minimum(nearest, np.linalg.norm(z - z[i], axis=1), out=nearest)
    return np.array(chosen)


def make_bank(features: np.ndarray, coreset: float | None, seed: int, quiet: bool) -> np.ndarray:
    """[N, T, P, C] → [T, M, C]: every patch of every image per tap (M = N·P), or a ``coreset`` share of them
    chosen per tap."""
    n, taps, patches, channels = features.shape
    bank = features.transpose(1, 0, 2, 3).reshape(taps, n * patches, channels)
    if coreset is None or coreset >= 1:
        return bank
    count = max(1, int(math.ceil(coreset * n * patches)))
    if not quiet:
        log.info("greedy coreset: %d of %d patches per tap", count, n * patches)
    return np.stack([bank[t, greedy_coreset(bank[t], count, seed + t)] for t in range(taps)])


def record(name: str, digest: str, bank: np.ndarray, model_file: str, model_sha256: str, hashes: list[str],
           coreset: float | None, seed: int, source: str) -> dict:
    """The manifest's description of a stored memory (``clipad.runtime.manifest_calibration.MEMORY_KEYS``)."""
    taps, rows, channels = bank.shape
    return {"file": name, "sha256": digest, "model_file": model_file, "model_sha256": model_sha256, "rows": rows,
            "taps": taps, "channels": channels, "images": len(hashes), "image_sha256s": sorted(hashes),
            "coreset": coreset, "seed": seed, "source": source,
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
