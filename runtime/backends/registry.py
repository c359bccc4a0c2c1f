"""Every inference backend, as data, and the one place that opens one: ``open_backend(name, model_dir, manifest,
**options)``. Command-line choices, option checks, install hints and the ``auto`` policy derive from these records;
which precisions a backend runs comes from ``clipad.runtime.precisions``.

Adding a backend is one record here and its own module (a ``Backend`` subclass with an ``open`` classmethod).
Modules are imported only when their backend is opened, so a missing library costs nothing until it is asked for.
"""
from __future__ import annotations

import importlib
import logging
from dataclasses import dataclass

from .. import precisions
from ..errors import ClipadError
from ..manifest import Manifest
from .base import Backend

log = logging.getLogger("clipad")


@dataclass(frozen=True)
class BackendSpec:
    name: str
    module: str                    # the module holding the Backend subclass
    cls: str
    options: tuple[str, ...]       # keyword options its ``open`` takes
    summary: str                   # one line for --help
    install: str                   # what to install when its library is missing
    edge: bool = True              # offered by the edge commands' --backend (torch is the workstation's reference)
    remote: bool = False           # the model runs elsewhere; the manifest comes from there
    fewshot: str = "onnxruntime"   # what runs fewshot.onnx beside it (clipad.runtime.fewshot.GRAPH_RUNNERS)

    def load(self) -> type[Backend]:
        return getattr(importlib.import_module(self.module), self.cls)


BACKENDS: dict[str, BackendSpec] = {b.name: b for b in (
    BackendSpec("onnxruntime", "clipad.runtime.backends.onnxruntime", "OnnxRuntimeBackend",
                ("precision", "threads", "device", "providers", "model_file", "profile_prefix"),
                "ONNX Runtime (TensorRT / CUDA execution providers when present, else CPU)",
                "pip install 'clipad-edge[cpu]' (CPU) or 'clipad-edge[gpu]' (NVIDIA GPU); on a Jetson NVIDIA's "
                "onnxruntime-gpu wheel"),
    BackendSpec("tensorrt", "clipad.runtime.backends.tensorrt", "TensorRTBackend",
                ("precision", "device", "engine", "cuda_graph"),
                "a TensorRT engine listed in the manifest, built for this GPU",
                "TensorRT from JetPack / NVIDIA (tensorrt-cu12, tensorrt-cu13, tensorrt-rtx-cu13) and "
                "pip install 'clipad-edge[tensorrt-cu12]' (CUDA 12, JetPack 6) or '[tensorrt-cu13]'"),
    BackendSpec("openvino", "clipad.runtime.backends.openvino", "OpenVINOBackend", ("precision", "threads"),
                "OpenVINO on the CPU (Intel CPUs; BF16 where the CPU has it)", "pip install 'clipad-edge[openvino]'",
                fewshot="openvino"),
    BackendSpec("triton", "clipad.runtime.backends.triton", "TritonBackend", ("triton_url", "triton_model", "grpc"),
                "a model served by Triton Inference Server (pre/post-processing stay local)",
                "pip install 'clipad-edge[client]'", remote=True),
    BackendSpec("torch", "clipad.export.reference", "TorchBackend",
                ("precision", "threads", "device", "clip_weights", "ckpt", "dino_weights"),
                "the torch reference model, rebuilt from the files the manifest records",
                "pip install 'clipad-edge[export]'", edge=False),
)}
AUTO = "auto"
BEST = "best"   # edge-bench --save-choice's pick for this machine (clipad.runtime.best_choice)
EDGE_CHOICES = (AUTO, BEST, *(b.name for b in BACKENDS.values() if b.edge and not b.remote))
FLAGS = {"triton_url": "--triton", "providers": "providers=", "model_file": "model_file=",
         "profile_prefix": "profile_prefix="}


def flag(option: str) -> str:
    return FLAGS.get(option, "--" + option.replace("_", "-"))


def get(name: str) -> BackendSpec:
    if name not in BACKENDS:
        raise ClipadError(f"unknown backend {name!r}; choose one of {', '.join((AUTO, *BACKENDS))}")
    return BACKENDS[name]


def _split(spec: BackendSpec, options: dict) -> tuple[dict, list[str]]:
    """(the options ``spec`` takes, the names of those it does not)."""
    taken = {k: v for k, v in options.items() if k in spec.options}
    return taken, [k for k in options if k not in spec.options]


def _best(model_dir: str | None, manifest: Manifest | None, options: dict) -> tuple[str, dict]:
    """--backend best: the backend and precision edge-bench --save-choice recorded for this machine."""
    from .. import best_choice

    if model_dir is None or manifest is None:
        raise ClipadError("--backend best needs an export folder (--model)")
    choice = best_choice.load(model_dir, manifest)
    if choice["backend"] not in BACKENDS or not BACKENDS[choice["backend"]].edge:
        raise ClipadError(f"--backend best: {best_choice.CHOICES_FILE} names backend {choice['backend']!r}, which "
                          f"this clipad-edge does not run at the edge; run: edge-bench --model {model_dir} "
                          f"--save-choice")
    if options.get("precision") not in (None, choice["precision"]):
        raise ClipadError(f"--backend best runs {choice['backend']} {choice['precision']} (edge-bench's choice for "
                          f"this machine); drop --precision {options['precision']}, or name the backend")
    log.info("--backend best: %s %s, the fastest row whose gate passed when edge-bench measured this machine "
             "(%.0f ms/image, %s)", choice["backend"], choice["precision"], choice["p50_ms"] or float("nan"),
             choice.get("measured") or "date unknown")
    return choice["backend"], {**options, "precision": choice["precision"]}


def open_backend(name: str, model_dir: str | None, manifest: Manifest | None, **options) -> Backend:
    """Open backend ``name`` (or ``auto``) on an export. Options that are None mean "the default" and are dropped.

    A named backend refuses an option it does not take (one line naming it), instead of ignoring it. ``auto``: a
    TensorRT engine listed for this GPU when its TensorRT imports, else ONNX Runtime (or, for a precision ONNX Runtime
    does not run, the backend that runs it: OpenVINO for bf16); an option only the backend that did not win takes is
    a warning. ``best``: what ``edge-bench --save-choice`` recorded for this machine.
    """
    options = {k: v for k, v in options.items() if v is not None}
    if name == BEST:
        name, options = _best(model_dir, manifest, options)
    if name != AUTO:
        spec = get(name)
        taken, foreign = _split(spec, options)
        if foreign:
            raise ClipadError(f"{', '.join(flag(f) for f in foreign)}: not an option of the {name} backend "
                              f"(it takes {', '.join(flag(o) for o in spec.options) or 'none'})")
        return spec.load().open(model_dir, manifest, **taken)
    trt, ort = BACKENDS["tensorrt"], BACKENDS["onnxruntime"]
    unknown = [k for k in options if k not in trt.options and k not in ort.options]
    if unknown:
        raise ClipadError(f"{', '.join(flag(f) for f in unknown)}: not an option of --backend auto (onnxruntime or "
                          f"tensorrt)")
    trt_class = trt.load()
    if trt_class.available(manifest, options.get("device") or 0, options.get("precision")):
        taken, _ = _split(trt, options)
        try:
            return trt_class.open(model_dir, manifest, **taken)
        except ClipadError as exc:
            log.warning("WARNING: TensorRT engine not usable (%s); using ONNX Runtime", exc)
    wanted = precisions.get(options.get("precision"))
    if wanted.why_not(ort.name) and wanted.only_on:   # e.g. bf16: a precision only OpenVINO runs
        other = next((BACKENDS[b] for b in wanted.only_on if b in BACKENDS and BACKENDS[b].edge), None)
        if other is not None:
            taken, foreign = _split(other, options)
            if foreign:
                log.warning("WARNING: %s do not apply to %s, which runs %s; ignored",
                            ", ".join(flag(f) for f in foreign), other.name, wanted.name)
            return other.load().open(model_dir, manifest, **taken)
    taken, foreign = _split(ort, options)
    if foreign:
        log.warning("WARNING: %s only apply to TensorRT, which does not run here; ignored",
                    ", ".join(flag(f) for f in foreign))
    return ort.load().open(model_dir, manifest, **taken)
