"""The one interface every inference backend implements (ONNX Runtime, TensorRT; more behind the same interface)."""
from __future__ import annotations

import abc

import numpy as np

from ..errors import ClipadError


class Backend(abc.ABC):
    """Runs the exported graph: uint8 [B, S, S, 3] RGB → (anomaly_map [B, K, S, S], image_score [B, K]) float32.

    ``run`` accepts exactly the batches in ``batch_range``; ``clipad.runtime.batching`` splits and pads any number
    of images to fit.
    """

    name: str = "?"
    precision: str = "fp32"   # of the model file or engine that runs

    @property
    @abc.abstractmethod
    def description(self) -> str:
        """What actually runs (e.g. the execution providers in use), for logs and JSON records."""

    @property
    @abc.abstractmethod
    def batch_range(self) -> tuple[int, int]:
        """(min, max) batch the loaded model accepts."""

    @abc.abstractmethod
    def run(self, batch_u8: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        ...

    def close(self) -> None:
        pass

    def check_batch(self, batch_u8: np.ndarray, image_size: int) -> None:
        """A batch this backend can run: uint8 [B, S, S, 3] with B inside the batch range."""
        lo, hi = self.batch_range
        if batch_u8.dtype != np.uint8 or batch_u8.shape[1:] != (image_size, image_size, 3):
            raise ClipadError(f"input batch must be uint8 [B, {image_size}, {image_size}, 3], got "
                              f"{batch_u8.dtype} {list(batch_u8.shape)}")
        if not lo <= batch_u8.shape[0] <= hi:
            raise ClipadError(f"batch of {batch_u8.shape[0]} is outside the model's batch range [{lo}, {hi}]")
