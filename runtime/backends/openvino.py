"""OpenVINO backend (CPU): runs the exported ONNX files as they are, compiled once and cached.

Precisions: ``fp32`` (model.onnx, FP32 inference), ``bf16`` (model.onnx with OpenVINO's BF16 inference-precision
hint; only on CPUs with BF16), ``fp16`` (model.fp16.onnx), ``int8`` (the Q/DQ model.int8.onnx: OpenVINO runs its
quantized linear layers as INT8). Compiled models are cached in ``~/.cache/clipad/openvino/<file sha256>-<precision>``
(OpenVINO's model cache, one folder per model file and precision), so only the first start pays the compile time.
"""
from __future__ import annotations

import logging
import os

import numpy as np

from ..errors import ClipadError
from ..manifest import Manifest, precision_file
from .base import Backend

log = logging.getLogger("clipad")
FILES = {"fp32": "fp32", "bf16": "fp32", "fp16": "fp16", "int8": "int8"}


def cache_dir() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "clipad", "openvino")


class OpenVINOBackend(Backend):
    name = "openvino"

    def __init__(self, model_dir: str, manifest: Manifest, precision: str | None = None, threads: int | None = None,
                 device: str = "CPU", **_):
        try:
            import openvino as ov
        except ImportError:
            raise ClipadError("OpenVINO is not installed (pip install 'clipad-edge[openvino]')") from None
        precision = precision or "fp32"
        if precision not in FILES:
            raise ClipadError(f"--precision {precision}: OpenVINO runs {', '.join(FILES)}")
        name = precision_file(FILES[precision])
        if name not in manifest.files:
            raise ClipadError(f"{model_dir}: no {name} in this export; add it with: export-engine --from-onnx "
                              f"{model_dir} --precision {FILES[precision]}")
        path = manifest.verify_file(model_dir, name)
        core = ov.Core()
        if precision == "bf16" and "BF16" not in core.get_property(device, "OPTIMIZATION_CAPABILITIES"):
            raise ClipadError(f"--precision bf16: this {device} has no BF16 support; use fp32 or int8")
        # One cache folder per model file (its sha256) and precision: OpenVINO's own key is not unique enough; a
        # shared folder handed a BF16 compile the blob of another model and returned NaN maps (measured).
        folder = os.path.join(cache_dir(), f"{manifest.files[name].sha256[:16]}-{precision}")
        os.makedirs(folder, exist_ok=True)
        core.set_property({"CACHE_DIR": folder})
        config = {"INFERENCE_PRECISION_HINT": "bf16" if precision == "bf16" else "f32", "PERFORMANCE_HINT": "LATENCY"}
        if threads:
            config["INFERENCE_NUM_THREADS"] = int(threads)
        try:
            self.compiled = core.compile_model(path, device, config)
        except Exception as exc:  # OpenVINO raises RuntimeError subclasses with long texts
            raise ClipadError(f"{path}: OpenVINO cannot compile the model ({str(exc).strip().splitlines()[0][:200]})") \
                from None
        self.request = self.compiled.create_infer_request()
        self.precision, self.device = precision, device
        self.image_size = manifest.image_size
        self.input_name = manifest.input.name
        self.outputs = [self.compiled.output(o.name) for o in manifest.outputs]
        self._range = (manifest.batch.min, manifest.batch.max)
        self.version = ov.__version__

    @property
    def description(self) -> str:
        return f"openvino {self.version.split('-')[0]} {self.precision} ({self.device})"

    @property
    def batch_range(self) -> tuple[int, int]:
        return self._range

    def run(self, batch_u8: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        self.check_batch(batch_u8, self.image_size)
        results = self.request.infer({self.input_name: np.ascontiguousarray(batch_u8)})
        maps, scores = (np.array(results[port], np.float32, copy=True) for port in self.outputs)
        return maps, scores

    def close(self) -> None:
        self.request = self.compiled = None
