"""Image sets prepared with the runtime's own listing and preprocessing (``clipad.runtime.inputs``): INT8 calibration
sets (progress bar, cache of the prepared tensors, hold-out for the accuracy gate) and the verify sets of the
export's gates."""
from __future__ import annotations

import hashlib
import logging
import os

import numpy as np

from clipad.runtime.atomic import write_atomic
from clipad.runtime.errors import ClipadError
from clipad.runtime.inputs import list_images
from clipad.runtime.preprocess import prepare

log = logging.getLogger("clipad")
RECOMMENDED_IMAGES = 100


def _cache_key(files: list[str], size: int) -> str:
    h = hashlib.sha256(str(size).encode())
    for f in files:
        st = os.stat(f)
        h.update(f"{os.path.abspath(f)}|{st.st_size}|{st.st_mtime_ns}".encode())
    return h.hexdigest()[:24]


def load_set(folder: str, size: int, cache_dir: str | None = None, min_images: int = 2,
             flag: str = "--calib-data", purpose: str = "INT8") -> tuple[np.ndarray, list[str]]:
    """All images of ``folder`` as the model's uint8 input [N, S, S, 3]; unreadable images are an error. ``purpose``
    names what the images are for in the warning about too few of them."""
    from tqdm import tqdm

    files = list_images(folder, flag, single_file=False).paths
    if len(files) < min_images:
        raise ClipadError(f"{flag} {folder}: {len(files)} image(s); at least {min_images} needed")
    if len(files) < RECOMMENDED_IMAGES:
        log.warning("WARNING: %d calibration images in %s; at least %d normal images are recommended for %s",
                    len(files), folder, RECOMMENDED_IMAGES, purpose)
    cache = None
    if cache_dir:
        os.makedirs(cache_dir, exist_ok=True)
        cache = os.path.join(cache_dir, f"calib-{_cache_key(files, size)}.npy")
        if os.path.isfile(cache):
            data = np.load(cache)
            if data.shape == (len(files), size, size, 3):
                log.info("      calibration tensors from cache %s", cache)
                return data, files
    out = np.empty((len(files), size, size, 3), np.uint8)
    for i, f in enumerate(tqdm(files, desc="preparing images", unit="img", leave=False)):
        out[i] = prepare(f, size)
    if cache:
        write_atomic(cache, lambda fh: np.save(fh, out, allow_pickle=False))
    return out, files


def load_verify_set(folder: str | None, size: int) -> tuple[np.ndarray, list[str]]:
    """The gates' verify images: every file of ``folder`` (sorted), or three generated sample images."""
    from .samples import synthetic_image

    if folder is None:
        images = [synthetic_image(i, seed=7)[0] for i in range(3)]
        return np.stack([prepare(im, size) for im in images]), [f"generated:{i}" for i in range(3)]
    paths = list_images(folder, "--verify-images", single_file=False).paths
    return np.stack([prepare(p, size) for p in paths]), [os.path.basename(p) for p in paths]


def evenly_spaced(data: np.ndarray, count: int) -> np.ndarray:
    """At most ``count`` of ``data`` (first and last included), spread evenly over it."""
    return data[np.unique(np.linspace(0, len(data) - 1, min(count, len(data))).round().astype(int))]


def split_holdout(data: np.ndarray, names: list[str], every: int = 5, minimum: int = 3):
    """(calibration part, held-back part): every ``every``-th image — at least ``minimum`` while twice that many
    remain for calibration — is held back for the accuracy gate (a score rank correlation needs 3 or more)."""
    held = np.arange(len(data)) % every == every - 1
    spread = np.linspace(0, len(data) - 1, minimum).round().astype(int)
    if held.sum() < minimum and len(data) >= 3 * minimum:
        held[:] = False
        held[spread] = True
    if held.sum() == 0:
        held[-1] = True
    return data[~held], [n for n, h in zip(names, held) if not h], data[held], [n for n, h in zip(names, held) if h]
