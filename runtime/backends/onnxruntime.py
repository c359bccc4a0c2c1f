"""ONNX Runtime backend: TensorRT EP → CUDA EP → CPU, reporting the providers actually in use. On a CPU it runs a
precision's CPU file when the export has one (``int8`` → the dynamic INT8 file made for CPUs)."""
from __future__ import annotations

import logging

import numpy as np

from .. import precisions
from ..errors import ClipadError
from ..manifest import Manifest
from .base import Backend

log = logging.getLogger("clipad")
PREFERRED = ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")
CPU = "CPUExecutionProvider"
GPU_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider")


def _ort():
    from ..extras import MISSING, warn_if_two_onnxruntimes

    try:
        import onnxruntime as ort
    except ImportError:
        raise ClipadError(MISSING["onnxruntime"]) from None
    warn_if_two_onnxruntimes()
    return ort


class OnnxRuntimeBackend(Backend):
    name = "onnxruntime"

    def __init__(self, path: str, *, image_size: int, batch_range: tuple[int, int], precision: str,
                 input_name: str, output_names: list[str] | None, classes: int | None = None,
                 providers: list[str] | None = None, threads: int | None = None, device: int | None = None,
                 profile_prefix: str | None = None):
        ort = _ort()
        available = ort.get_available_providers()
        wanted = [p for p in (providers or PREFERRED) if p in available]
        if not wanted:
            raise ClipadError(f"none of the providers {providers} is available (have: {', '.join(available)})")
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        self.threads = threads
        if threads:
            opts.intra_op_num_threads = threads
        if profile_prefix:
            opts.enable_profiling = True
            opts.profile_file_prefix = profile_prefix
        chosen = [(p, {"device_id": int(device)}) if device is not None and p in GPU_PROVIDERS else p for p in wanted]
        try:
            self.session = ort.InferenceSession(path, opts, providers=chosen)
        except Exception as exc:  # onnxruntime raises its own exception types
            raise ClipadError(f"{path}: ONNX Runtime cannot load the model ({str(exc).splitlines()[0][:200]})") \
                from None
        self.path, self.precision, self.image_size = path, precision, image_size
        self.providers = self.session.get_providers()
        self.requested = wanted
        self.fell_back = [p for p in wanted if p not in self.providers]
        if self.fell_back:
            # onnxruntime-gpu lists GPU providers even when CUDA/cuDNN/TensorRT libraries are missing, then quietly
            # runs on the CPU: say it loudly.
            log.warning("ONNX Runtime could not start %s (missing CUDA/cuDNN/TensorRT libraries or no GPU); "
                        "running on %s", ", ".join(self.fell_back), ", ".join(self.providers))
        if output_names is None:   # a file without a manifest (the exporter's gates): its own, the two first
            output_names = [o.name for o in self.session.get_outputs()]
            if output_names[:2] != ["anomaly_map", "image_score"]:
                raise ClipadError(f"{path}: outputs {output_names} do not start with anomaly_map, image_score")
        self._check_io(input_name, output_names, classes)
        self.input_name, self.output_names = input_name, list(output_names)
        dim = self.session.get_inputs()[0].shape[0]
        self._range = (dim, dim) if isinstance(dim, int) else tuple(batch_range)

    @classmethod
    def open(cls, model_dir: str, manifest: Manifest, precision: str | None = None, model_file: str | None = None,
             providers: list[str] | None = None, threads: int | None = None, device: int | None = None,
             profile_prefix: str | None = None) -> "OnnxRuntimeBackend":
        """The precision's file of an export (default the FP32 reference), checked against the manifest's sha256."""
        wanted = precisions.get(precision)
        why = wanted.why_not(cls.name)
        if why:
            raise ClipadError(f"--precision {wanted.name}: {why}")
        cpu_only = [p for p in (providers or PREFERRED) if p in _ort().get_available_providers()] == [CPU]
        if model_file is None:
            model_file = wanted.file
            substitute = precisions.get(wanted.cpu_substitute) if wanted.cpu_substitute else None
            if cpu_only and substitute is not None and substitute.file in manifest.files:
                model_file = substitute.file   # the file made for CPUs, not the one made for TensorRT
        if model_file not in manifest.files:
            raise ClipadError(f"{model_dir}: no {model_file} in this export (has {', '.join(manifest.files)}); add "
                              f"it with: export-engine --from-onnx {model_dir} --precision {wanted.name}")
        backend = cls._from_export(model_dir, manifest, model_file, providers, threads, device, profile_prefix)
        if backend.providers == [CPU] and not cpu_only and wanted.cpu_substitute \
                and precisions.get(wanted.cpu_substitute).file in manifest.files and model_file == wanted.file:
            backend.close()   # the GPU providers did not start: the CPU file is the right one after all
            backend = cls._from_export(model_dir, manifest, precisions.get(wanted.cpu_substitute).file, [CPU],
                                       threads, None, profile_prefix)
        return backend

    @classmethod
    def _from_export(cls, model_dir, manifest: Manifest, model_file: str, providers, threads, device,
                     profile_prefix=None):
        path = manifest.verify_file(model_dir, model_file)
        return cls(path, image_size=manifest.image_size, batch_range=(manifest.batch.min, manifest.batch.max),
                   precision=manifest.files[model_file].precision, input_name=manifest.input.name,
                   output_names=[o.name for o in manifest.outputs], classes=len(manifest.class_names),
                   providers=providers, threads=threads, device=device, profile_prefix=profile_prefix)

    def _check_io(self, input_name: str, output_names: list[str], classes: int | None) -> None:
        """The file's inputs and outputs are the manifest's (name, element type, fixed dimensions, one map per class
        name), checked now rather than at the first image."""
        inputs, outputs = self.session.get_inputs(), self.session.get_outputs()
        s = self.image_size
        found = [(i.name, i.type, list(i.shape[1:])) for i in inputs]
        if found != [(input_name, "tensor(uint8)", [s, s, 3])]:
            raise ClipadError(f"{self.path}: inputs {found} differ from the manifest's {input_name!r} uint8 "
                              f"[B, {s}, {s}, 3]; the file does not belong to this manifest (re-export)")
        names = [o.name for o in outputs]
        if names != list(output_names) or any(o.type != "tensor(float)" for o in outputs):
            raise ClipadError(f"{self.path}: outputs {names} differ from the manifest's {list(output_names)} "
                              f"float32; re-export")
        channels = {o.shape[1] for o in outputs[:2] if len(o.shape) > 1 and isinstance(o.shape[1], int)}
        if classes is not None and channels and channels != {classes}:
            raise ClipadError(f"{self.path}: the model has {sorted(channels)[0]} output channel(s) but the manifest "
                              f"names {classes} class(es); the manifest does not belong to this file (re-export)")

    @property
    def description(self) -> str:
        return f"onnxruntime {self.precision} ({', '.join(self.providers)})"

    @property
    def batch_range(self) -> tuple[int, int]:
        return self._range

    def _infer(self, batch_u8: np.ndarray) -> tuple[np.ndarray, ...]:
        """(anomaly_map, image_score[, patch_features]) as the manifest lists them."""
        return tuple(self.session.run(self.output_names, {self.input_name: batch_u8}))

    def end_profiling(self) -> str:
        """The profile file of a backend opened with ``profile_prefix``."""
        return self.session.end_profiling()

    def _release(self) -> None:
        self.session = None
