"""Which backend runs a model: ``open_backend(name, model_dir, manifest, **options)`` and the ``auto`` policy."""
from __future__ import annotations

import logging

from ..errors import ClipadError
from ..manifest import Manifest
from .base import Backend

log = logging.getLogger("clipad")
BACKENDS = ("auto", "onnxruntime", "tensorrt", "openvino")
ORT_OPTIONS = ("providers", "threads", "model_file", "precision")
TRT_OPTIONS = ("engine_file", "cuda_graph", "device", "precision")
OPENVINO_OPTIONS = ("threads", "precision")


def open_backend(name: str, model_dir: str, manifest: Manifest, **options) -> Backend:
    """``auto``: a TensorRT engine listed for this GPU (of ``precision`` when given) when its TensorRT imports, else
    ONNX Runtime (on the ``precision``'s ONNX file; FP32 by default). ``openvino`` only when asked for.

    Options a backend does not take are ignored (``threads`` means nothing to TensorRT); None means "default".
    """
    if name not in BACKENDS:
        raise ClipadError(f"unknown backend {name!r}; choose one of {', '.join(BACKENDS)}")
    trt_options = {k: v for k, v in options.items() if k in TRT_OPTIONS and v is not None}
    ort_options = {k: v for k, v in options.items() if k in ORT_OPTIONS and v is not None}
    if name == "openvino":
        from .openvino import OpenVINOBackend

        return OpenVINOBackend(model_dir, manifest, **{k: v for k, v in options.items()
                                                       if k in OPENVINO_OPTIONS and v is not None})
    if name in ("auto", "tensorrt"):
        from .tensorrt import TensorRTBackend, tensorrt_available

        if name == "tensorrt":
            return TensorRTBackend(model_dir, manifest, **trt_options)
        if tensorrt_available(manifest, trt_options.get("device", 0), trt_options.get("precision")):
            try:
                return TensorRTBackend(model_dir, manifest, **trt_options)
            except ClipadError as exc:
                log.warning("WARNING: TensorRT engine not usable (%s); using ONNX Runtime", exc)
    from .onnxruntime import OnnxRuntimeBackend

    return OnnxRuntimeBackend(model_dir, manifest, **ort_options)
