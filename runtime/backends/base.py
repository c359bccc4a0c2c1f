"""One interface for every inference backend (ONNX Runtime now; TensorRT behind the same interface later)."""
from __future__ import annotations

import abc

import numpy as np

from ..errors import ClipadError


class Backend(abc.ABC):
    """Runs the exported graph: uint8 [B, S, S, 3] RGB → (anomaly_map [B, K, S, S], image_score [B, K]) float32."""

    name: str = "?"

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
        lo, hi = self.batch_range
        if batch_u8.dtype != np.uint8 or batch_u8.shape[1:] != (image_size, image_size, 3):
            raise ClipadError(f"input batch must be uint8 [B, {image_size}, {image_size}, 3], got "
                              f"{batch_u8.dtype} {list(batch_u8.shape)}")
        if not lo <= batch_u8.shape[0] <= hi:
            raise ClipadError(f"batch of {batch_u8.shape[0]} is outside the model's batch range [{lo}, {hi}]")


BACKENDS = ("auto", "onnxruntime", "tensorrt")
ORT_OPTIONS = ("providers", "threads", "model_file")
TRT_OPTIONS = ("engine_file", "cuda_graph")


def open_backend(name: str, model_dir: str, manifest: dict, **options) -> Backend:
    """``auto``: TensorRT when an engine for this GPU is listed and its TensorRT imports, else ONNX Runtime."""
    import logging

    if name not in BACKENDS:
        raise ClipadError(f"unknown backend {name!r}; choose one of {', '.join(BACKENDS)}")
    trt_options = {k: v for k, v in options.items() if k in TRT_OPTIONS and v is not None}
    ort_options = {k: v for k, v in options.items() if k in ORT_OPTIONS and v is not None}
    if name in ("auto", "tensorrt"):
        from .tensorrt import TensorRTBackend, tensorrt_available

        if name == "tensorrt":
            return TensorRTBackend(model_dir, manifest, **trt_options)
        if tensorrt_available(manifest):
            try:
                return TensorRTBackend(model_dir, manifest, **trt_options)
            except ClipadError as exc:
                logging.getLogger("clipad").warning("WARNING: TensorRT engine not usable (%s); using ONNX Runtime",
                                                    exc)
    from .onnxruntime import OnnxRuntimeBackend

    return OnnxRuntimeBackend(model_dir, manifest, **ort_options)
