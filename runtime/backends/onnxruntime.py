"""ONNX Runtime backend: TensorRT EP → CUDA EP → CPU, reporting the providers actually in use."""
from __future__ import annotations

import logging

import numpy as np

from ..errors import ClipadError
from ..manifest import Manifest, precision_file
from .base import Backend

log = logging.getLogger("clipad")
PREFERRED = ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")


class OnnxRuntimeBackend(Backend):
    name = "onnxruntime"

    def __init__(self, model_dir: str, manifest: Manifest, precision: str = "fp32", model_file: str | None = None,
                 providers: list[str] | None = None, threads: int | None = None):
        try:
            import onnxruntime as ort
        except ImportError:
            raise ClipadError("onnxruntime is not installed (pip install onnxruntime or onnxruntime-gpu)") from None
        available = ort.get_available_providers()
        wanted = [p for p in (providers or PREFERRED) if p in available]
        if not wanted:
            raise ClipadError(f"none of the providers {providers} is available (have: {', '.join(available)})")
        if precision == "bf16":
            raise ClipadError("--precision bf16 runs on OpenVINO (--backend openvino); ONNX Runtime's CPU provider "
                              "has no BF16 path for these models")
        if model_file is None:
            model_file = precision_file(precision)
            cpu_variant = precision_file("int8-cpu")
            if precision == "int8" and wanted == ["CPUExecutionProvider"] and cpu_variant in manifest.files:
                model_file = cpu_variant   # the INT8 model made for CPUs, not the one made for TensorRT
        if model_file not in manifest.files:
            raise ClipadError(f"{model_dir}: no {model_file} in this export (has {', '.join(manifest.files)}); add "
                              f"it with: export-engine --from-onnx {model_dir} --precision {precision}")
        entry = manifest.files[model_file]
        self.precision = "int8-cpu" if entry.precision == "int8" and entry.target == "cpu" else entry.precision
        path = manifest.verify_file(model_dir, model_file)
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        if threads:
            opts.intra_op_num_threads = threads
        try:
            self.session = ort.InferenceSession(path, opts, providers=wanted)
        except Exception as exc:  # onnxruntime raises its own exception types
            raise ClipadError(f"{path}: ONNX Runtime cannot load the model ({str(exc).splitlines()[0][:200]})") \
                from None
        self.providers = self.session.get_providers()
        self.requested = wanted
        self.fell_back = [p for p in wanted if p not in self.providers]
        if self.fell_back:
            # onnxruntime-gpu lists GPU providers even when CUDA/cuDNN/TensorRT libraries are missing, then quietly
            # runs on the CPU: say it loudly.
            log.warning("ONNX Runtime could not start %s (missing CUDA/cuDNN/TensorRT libraries or no GPU); "
                        "running on %s", ", ".join(self.fell_back), ", ".join(self.providers))
        self._check_io(path, manifest)
        self.input_name = self.session.get_inputs()[0].name
        self.output_names = [o.name for o in self.session.get_outputs()]
        dim = self.session.get_inputs()[0].shape[0]
        self._range = (dim, dim) if isinstance(dim, int) else (manifest.batch.min, manifest.batch.max)
        self.image_size = manifest.image_size

    def _check_io(self, path: str, manifest: Manifest) -> None:
        """The file's inputs and outputs are the manifest's (name, element type, fixed dimensions), checked now
        rather than at the first image."""
        inputs, outputs = self.session.get_inputs(), self.session.get_outputs()
        s = manifest.image_size
        found = [(i.name, i.type, list(i.shape[1:])) for i in inputs]
        if found != [(manifest.input.name, "tensor(uint8)", [s, s, 3])]:
            raise ClipadError(f"{path}: inputs {found} differ from the manifest's {manifest.input.name!r} uint8 "
                              f"[B, {s}, {s}, 3]; the file does not belong to this manifest (re-export)")
        names = [o.name for o in outputs]
        if names != [o.name for o in manifest.outputs] or any(o.type != "tensor(float)" for o in outputs):
            raise ClipadError(f"{path}: outputs {names} differ from the manifest's "
                              f"{[o.name for o in manifest.outputs]} float32; re-export")

    @property
    def description(self) -> str:
        return f"onnxruntime {self.precision} ({', '.join(self.providers)})"

    @property
    def batch_range(self) -> tuple[int, int]:
        return self._range

    def run(self, batch_u8: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        self.check_batch(batch_u8, self.image_size)
        maps, scores = self.session.run(self.output_names, {self.input_name: np.ascontiguousarray(batch_u8)})
        return maps, scores
