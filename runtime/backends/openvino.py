"""OpenVINO backend (CPU): runs the exported ONNX files as they are, compiled once and cached.

Precisions: those whose registry record lists OpenVINO (``clipad.runtime.precisions``), each on its file with its
``openvino_hint`` (f32 for all of them: the BF16 file's products are BF16 as written, the rest stays FP32, which
OpenVINO's own BF16 hint would not keep; the Q/DQ INT8 file runs its quantized linear layers as INT8), and for a
file with INT8 weights only (``int8-dyn-bf16``) the record's dynamic quantization group size. Compiled
models are cached in ``~/.cache/clipad/openvino/<file sha256>-<precision>`` (OpenVINO's model cache, one folder per
model file and precision), so only the first start pays the compile time.
"""
from __future__ import annotations

import logging
import os

import numpy as np

from .. import precisions
from ..errors import ClipadError
from ..manifest import Manifest
from .base import Backend

log = logging.getLogger("clipad")


def cache_dir() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "clipad", "openvino")


class OpenVINOBackend(Backend):
    name = "openvino"

    def __init__(self, model_dir: str, manifest: Manifest, precision: str | None = None, threads: int | None = None,
                 ov_device: str = "CPU"):
        wanted = precisions.get(precision)
        why = wanted.why_not(self.name)
        if why:
            raise ClipadError(f"--precision {wanted.name}: {why}")
        name = wanted.file
        if name not in manifest.files:
            maker = precisions.file_precision(name)
            raise ClipadError(f"{model_dir}: no {name} in this export; add it with: export-engine --from-onnx "
                              f"{model_dir} --precision {maker.name if maker else wanted.name}")
        path = manifest.verify_file(model_dir, name)
        made = manifest.precisions.get(wanted.name)
        remainder = (made.conversion or {}).get("high_precision") if made else None
        if wanted.int8_remainder and remainder and remainder != wanted.int8_remainder:
            log.warning("WARNING: %s in %s was made by an older clipad-edge (%s remainder, for OpenVINO's BF16 hint, "
                        "which it no longer uses): it runs as a plain INT8 file at f32, slower; make it again with: "
                        "export-engine --from-onnx %s --precision %s --calib-data DIR", name, model_dir, remainder,
                        model_dir, wanted.name)
        self._compile(path, wanted, manifest.files[name].sha256, threads, ov_device)
        self.image_size = manifest.image_size
        self.input_name = manifest.input.name
        self.outputs = [self.compiled.output(o.name) for o in manifest.outputs]
        self._range = (manifest.batch.min, manifest.batch.max)

    @classmethod
    def for_file(cls, path: str, precision: str, image_size: int, batch_range: tuple[int, int], input_name: str,
                 output_names: list[str], threads: int | None = None) -> "OpenVINOBackend":
        """An ONNX file that has no manifest yet: the export's gate of a precision only OpenVINO runs."""
        from ..manifest import sha256_file

        self = cls.__new__(cls)
        self._compile(path, precisions.get(precision), sha256_file(path), threads, "CPU")
        self.image_size, self.input_name, self._range = image_size, input_name, tuple(batch_range)
        self.outputs = [self.compiled.output(o) for o in output_names]
        return self

    def _compile(self, path: str, wanted: precisions.Precision, sha256: str, threads: int | None,
                 ov_device: str) -> None:
        try:
            import openvino as ov
        except ImportError:
            raise ClipadError("OpenVINO is not installed (pip install 'clipad-edge[openvino]')") from None
        core = ov.Core()
        hint, capabilities = wanted.openvino_hint, core.get_property(ov_device, "OPTIMIZATION_CAPABILITIES")
        needs = wanted.cpu_capability or (hint.upper() if hint != "f32" else None)
        if needs and needs not in capabilities:
            raise ClipadError(f"--precision {wanted.name}: this {ov_device} has no {needs} support (OpenVINO lists "
                              f"{', '.join(capabilities)}); use {precisions.REFERENCE.name}")
        # One cache folder per model file (its sha256) and precision: OpenVINO's own key is not unique enough; a
        # shared folder handed a BF16 compile the blob of another model and returned NaN maps (measured).
        folder = os.path.join(cache_dir(), f"{sha256[:16]}-{wanted.name}")
        os.makedirs(folder, exist_ok=True)
        core.set_property({"CACHE_DIR": folder})
        config = {"INFERENCE_PRECISION_HINT": hint, "PERFORMANCE_HINT": "LATENCY"}
        if threads:
            config["INFERENCE_NUM_THREADS"] = int(threads)
        if wanted.openvino_dynamic_quantization:
            config["DYNAMIC_QUANTIZATION_GROUP_SIZE"] = wanted.openvino_dynamic_quantization
        try:
            self.compiled = core.compile_model(path, ov_device, config)
        except Exception as exc:  # OpenVINO raises RuntimeError subclasses with long texts
            raise ClipadError(f"{path}: OpenVINO cannot compile the model ({str(exc).strip().splitlines()[0][:200]})") \
                from None
        self.request = self.compiled.create_infer_request()
        self.precision, self.device, self.threads = wanted.name, ov_device, threads
        self.version = ov.__version__

    @property
    def description(self) -> str:
        return f"openvino {self.version.split('-')[0]} {self.precision} ({self.device})"

    @property
    def batch_range(self) -> tuple[int, int]:
        return self._range

    def _infer(self, batch_u8: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        results = self.request.infer({self.input_name: batch_u8})
        return tuple(np.array(results[port], np.float32, copy=True) for port in self.outputs)

    def _release(self) -> None:
        self.request = self.compiled = None
