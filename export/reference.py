"""Torch reference pipeline: any image → the official preprocessing → raw map, raw image score and map maximum.

This is the executable ground truth every backend (ONNX Runtime, TensorRT) is compared against.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from clipad.runtime.preprocess import ImageLike, prepare

from .models.factory import BuiltDetector


@dataclass
class ReferenceOutput:
    anomaly_map: np.ndarray   # [K, S, S] float32, raw (before any dataset-level normalisation)
    image_score: np.ndarray   # [K] float32, raw as the official test path defines it
    map_max: np.ndarray       # [K] float32


class TorchReference:
    def __init__(self, built: BuiltDetector, threads: int | None = None):
        self.built = built
        if threads:
            torch.set_num_threads(threads)

    @torch.no_grad()
    def run_batch(self, batch_u8: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """uint8 [B, S, S, 3] RGB → (anomaly_map [B, K, S, S], image_score [B, K]) as float32 numpy."""
        maps, scores = self.built.module(torch.from_numpy(np.ascontiguousarray(batch_u8)))
        return maps.numpy(), scores.numpy()

    def predict(self, images: list[ImageLike] | ImageLike, color_order: str = "rgb") -> list[ReferenceOutput]:
        if not isinstance(images, list):
            images = [images]
        batch = np.stack([prepare(im, self.built.image_size, color_order) for im in images])
        maps, scores = self.run_batch(batch)
        return [ReferenceOutput(m, s, m.reshape(m.shape[0], -1).max(axis=1)) for m, s in zip(maps, scores)]
