"""The one interface every runner implements: ONNX Runtime, OpenVINO, TensorRT, Triton, and the torch reference
(``clipad.export.reference``). Which backends exist, their options and how one is chosen: ``registry``."""
from __future__ import annotations

import abc

import numpy as np

from ..errors import ClipadError


class Backend(abc.ABC):
    """Runs the exported graph: uint8 [B, S, S, 3] RGB → (anomaly_map [B, K, S, S], image_score [B, K]) float32.

    ``run`` accepts exactly the batches in ``batch_range``; ``clipad.runtime.batching`` splits and pads any number
    of images to fit. After ``close`` every ``run`` is a one-line error.
    """

    name: str = "?"
    precision: str = ""       # of the model file or engine that runs
    image_size: int = 0
    closed: bool = False

    @classmethod
    def open(cls, model_dir: str | None, manifest, **options) -> "Backend":
        """The backend on an export (``manifest`` None for a remote backend, which brings its own)."""
        return cls(model_dir, manifest, **options)

    @classmethod
    def available(cls, manifest, device: int = 0, precision: str | None = None) -> bool:
        """Whether this machine can run ``manifest`` on this backend (``auto`` asks before opening)."""
        return True

    @property
    @abc.abstractmethod
    def description(self) -> str:
        """What actually runs (e.g. the execution providers in use), for logs and JSON records."""

    @property
    @abc.abstractmethod
    def batch_range(self) -> tuple[int, int]:
        """(min, max) batch the loaded model accepts."""

    def run(self, batch_u8: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if self.closed:
            raise ClipadError(f"the {self.name} backend is closed (the Detector was closed or left its with block)")
        self.check_batch(batch_u8)
        return self._infer(np.ascontiguousarray(batch_u8))

    @abc.abstractmethod
    def _infer(self, batch_u8: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Run one checked, contiguous batch."""

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self._release()

    def _release(self) -> None:
        """Free what the backend holds (sessions, engines, device memory)."""

    def check_batch(self, batch_u8: np.ndarray) -> None:
        """A batch this backend can run: uint8 [B, S, S, 3] with B inside the batch range."""
        lo, hi = self.batch_range
        s = self.image_size
        if not isinstance(batch_u8, np.ndarray) or batch_u8.dtype != np.uint8 or batch_u8.ndim != 4 \
                or batch_u8.shape[1:] != (s, s, 3):
            raise ClipadError(f"input batch must be uint8 [B, {s}, {s}, 3], got "
                              f"{getattr(batch_u8, 'dtype', type(batch_u8).__name__)} "
                              f"{list(getattr(batch_u8, 'shape', []))}")
        if not lo <= batch_u8.shape[0] <= hi:
            raise ClipadError(f"batch of {batch_u8.shape[0]} is outside the model's batch range [{lo}, {hi}]")
