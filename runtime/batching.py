"""The one split / pad / trim loop: run any number of images through a model whose batch range is [lo, hi].

Chunks of at most ``hi`` images; a chunk smaller than ``lo`` (a fixed-batch model, or the tail of a dynamic one) is
padded by repeating its last image, and the padded rows are dropped from the outputs.
"""
from __future__ import annotations

from typing import Callable, Iterator, Sequence

import numpy as np


def pad_batch(chunk: np.ndarray, size: int) -> np.ndarray:
    """Pad ``chunk`` to ``size`` rows by repeating its last row."""
    if len(chunk) >= size:
        return chunk
    return np.concatenate([chunk, np.repeat(chunk[-1:], size - len(chunk), axis=0)])


def chunks(data: np.ndarray, lo: int, hi: int) -> Iterator[tuple[np.ndarray, int]]:
    """(padded chunk, number of real rows in it) covering ``data`` in order."""
    if not 1 <= lo <= hi:
        raise ValueError(f"batch range [{lo}, {hi}]")
    for start in range(0, len(data), hi):
        chunk = data[start:start + hi]
        yield pad_batch(chunk, lo), len(chunk)


def run_batched(run: Callable[[np.ndarray], Sequence[np.ndarray]], data: np.ndarray, lo: int, hi: int,
                progress: Callable[[int], None] | None = None) -> tuple[np.ndarray, ...]:
    """``run(batch) -> outputs`` over every image of ``data``; each output concatenated over the real rows."""
    if len(data) == 0:
        raise ValueError("no images to run")
    parts: list[list[np.ndarray]] = []
    for chunk, real in chunks(data, lo, hi):
        outputs = run(chunk)
        if not parts:
            parts = [[] for _ in outputs]
        for store, out in zip(parts, outputs):
            store.append(np.asarray(out)[:real])
        if progress is not None:
            progress(real)
    return tuple(np.concatenate(store) for store in parts)
