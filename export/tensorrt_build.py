"""Strongly typed TensorRT engine builds from the precision's ONNX: TensorRT 10.3 … 11.x and TensorRT-RTX.

Only API present in every supported version is used: STRONGLY_TYPED network (opt-in on 10.x, implicit on 11.x),
OnnxParser.parse_from_file, set_memory_pool_limit, one optimization profile from the manifest's batch range,
build_serialized_network, timing caches. No precision builder flags, no calibrators. The output is a pure plan
(trtexec --loadEngine works); its metadata goes into manifest.json.
"""
from __future__ import annotations

import datetime
import importlib
import logging
import os
import time

from clipad.runtime import precisions
from clipad.runtime.atomic import write_bytes_atomic
from clipad.runtime.errors import ClipadError
from clipad.runtime.manifest import BatchRange, EngineEntry, EngineTarget, sha256_file

log = logging.getLogger("clipad")
FLAVORS = ("auto", "tensorrt", "rtx")
RTX_TARGETS = {"7.5": "SM75", "8.0": "SM80", "8.6": "SM86", "8.9": "SM89", "12.0": "SM120", "12.1": "SM121"}


def _import(flavor: str):
    try:
        return importlib.import_module("tensorrt_rtx" if flavor == "rtx" else "tensorrt")
    except ImportError:
        return None
    except OSError:  # stub wheels without their libraries
        return None


def _gpu_info(device: int):
    from clipad.runtime.backends.cuda_buffers import gpu_at

    return gpu_at(device)


def resolve_flavor(flavor: str, compute_capability: str | None, device: int = 0
                   ) -> tuple[str | None, object | None, dict | None]:
    """(flavor, module, gpu) to build with, or (None, None, None) when nothing here can build. ``gpu`` is GPU
    ``device``; an index that is not a GPU here is a one-line error."""
    if flavor not in FLAVORS:
        raise ClipadError(f"--trt-flavor {flavor!r}: choose one of {', '.join(FLAVORS)}")
    gpu = _gpu_info(device)
    if flavor in ("auto", "tensorrt"):
        trt = _import("tensorrt")
        if trt is not None and gpu is not None:
            return "tensorrt", trt, gpu
        if flavor == "tensorrt":
            why = "no GPU/driver found" if trt is not None else "the tensorrt Python package is not installed"
            raise ClipadError(f"--trt-flavor tensorrt: {why}; build on the target machine")
    trt = _import("rtx")
    if trt is not None and (compute_capability or gpu is not None):
        return "rtx", trt, gpu
    if flavor == "rtx":
        why = "tensorrt_rtx is not installed (pip install tensorrt-rtx-cu13)" if trt is None else \
            "no GPU here: pass --compute-capability X.Y for an ahead-of-time build"
        raise ClipadError(f"--trt-flavor rtx: {why}")
    return None, None, None


def build_command(model_dir: str, precision: str, flavor: str = "auto", cc: str | None = None) -> str:
    import shlex

    cmd = f"export-engine --from-onnx {shlex.quote(model_dir)} --precision {precision}"
    if flavor != "auto":
        cmd += f" --trt-flavor {flavor}"
    if cc:
        cmd += f" --compute-capability {cc}"
    return cmd


def engine_name(precision: str, flavor: str, cc: str) -> str:
    return f"model.{precision}.{flavor}-sm{cc.replace('.', '')}.engine"


def build_engine(onnx_path: str, out_dir: str, precision: str, batch: BatchRange, image_size: int, flavor: str, trt,
                 gpu: dict | None, compute_capability: str | None = None, workspace_gb: float = 4.0,
                 timing_cache: str | None = None, version_compatible: bool = False,
                 command_dir: str | None = None) -> EngineEntry:
    """Build, write the plan atomically into ``out_dir``, and return its manifest entry (whose rebuild command names
    ``command_dir``, the export folder, default ``out_dir``). With a ``gpu``, the build runs on that device (TensorRT
    builds on the current CUDA device, and tunes for it)."""
    if gpu is not None:
        from clipad.runtime.backends.cuda_buffers import set_device

        set_device(gpu["device"])
    logger = trt.Logger(trt.Logger.ERROR)
    builder = trt.Builder(logger)
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(onnx_path):
        errors = "; ".join(str(parser.get_error(i)).splitlines()[0] for i in range(min(parser.num_errors, 3)))
        raise ClipadError(f"{onnx_path}: TensorRT cannot parse it: {errors[:400]}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gb * (1 << 30)))
    profile = builder.create_optimization_profile()
    inp = network.get_input(0)
    shape = lambda n: (n, image_size, image_size, 3)  # noqa: E731
    profile.set_shape(inp.name, shape(batch.min), shape(batch.opt), shape(batch.max))
    config.add_optimization_profile(profile)

    if flavor == "rtx":
        cc = compute_capability or (gpu or {}).get("compute_capability")
        if cc not in RTX_TARGETS:
            raise ClipadError(f"--compute-capability {cc}: TensorRT-RTX builds for {', '.join(RTX_TARGETS)} only "
                              f"(not Jetson Orin 8.7, Hopper 9.0 or Thor); use full TensorRT on the target")
        config.num_compute_capabilities = 1
        config.set_compute_capability(getattr(trt.ComputeCapability, RTX_TARGETS[cc]), 0)
    else:
        cc = gpu["compute_capability"]
        if compute_capability and compute_capability != cc:
            raise ClipadError(f"--compute-capability {compute_capability}: full TensorRT builds for the GPU it runs "
                              f"on ({gpu['name']}, {cc}); build on the target")
        if version_compatible:
            config.set_flag(trt.BuilderFlag.VERSION_COMPATIBLE)
    needs = precisions.get(precision).min_compute_capability
    if needs and float(cc) < needs:
        raise ClipadError(f"--precision {precision}: GPUs of compute capability {cc} have no {precision} kernels "
                          f"(SM {needs:g} or newer)")
    if version_compatible and flavor == "rtx":
        raise ClipadError("--version-compatible is a full-TensorRT option; TensorRT-RTX engines are portable "
                          "across RTX GPUs by design")

    cache = None
    if timing_cache:
        blob = open(timing_cache, "rb").read() if os.path.isfile(timing_cache) else b""
        cache = config.create_timing_cache(blob)
        config.set_timing_cache(cache, ignore_mismatch=False)

    started = time.perf_counter()
    plan = builder.build_serialized_network(network, config)
    seconds = time.perf_counter() - started
    if plan is None or plan.nbytes == 0:
        raise ClipadError(f"TensorRT ({flavor} {trt.__version__}) failed to build an engine from {onnx_path}")
    name = engine_name(precision, flavor, cc)
    path = os.path.join(out_dir, name)
    write_bytes_atomic(path, bytes(plan), durable=True)
    if cache is not None:
        write_bytes_atomic(timing_cache, bytes(config.get_timing_cache().serialize()), durable=True)
    return EngineEntry(
        file=name, precision=precision, flavor=flavor, trt_version=str(trt.__version__),
        target=EngineTarget(compute_capability=cc, gpu_name=None if gpu is None else gpu.get("name"),
                            aot=flavor == "rtx" and gpu is None),
        onnx=os.path.basename(onnx_path), onnx_sha256=sha256_file(onnx_path), sha256=sha256_file(path),
        bytes=os.path.getsize(path), batch=BatchRange(batch.min, batch.max, batch.opt),
        version_compatible=bool(version_compatible), build_seconds=round(seconds, 2),
        built=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        build_command=build_command(command_dir or out_dir, precision, flavor, compute_capability))
