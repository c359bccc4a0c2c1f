"""TensorRT backend: a prebuilt engine listed in ``manifest["engines"]``, run through the TensorRT 10/11 name-based API.

One code path for tensorrt 10.3 … 11.x, tensorrt_lean / tensorrt_dispatch (version-compatible plans) and
tensorrt_rtx: ``num_io_tensors`` / ``get_tensor_*`` / ``set_input_shape`` / ``set_tensor_address`` /
``execute_async_v3`` only (``num_bindings`` and ``get_binding_*`` were removed in TensorRT 10; the synchronous
``execute_v2`` still exists but is not used).
Device memory, a non-blocking stream and CUDA graphs come from ``cuda_buffers`` (over whichever CUDA route
``cuda_access`` chose), called through the module so tests can substitute a simulated CUDA runtime. ``cuda_graph``: TensorRT-RTX captures and replays the graph
itself (``IRuntimeConfig.cuda_graph_strategy``, which also handles dynamic shapes); with full TensorRT the backend
captures the enqueue on its stream and replays it while the input shape stays the same.
"""
from __future__ import annotations

import hashlib
import importlib
import logging
import os
import re

import numpy as np

from .. import precisions
from ..errors import ClipadError
from ..manifest import EngineEntry, Manifest
from . import cuda_buffers as cb
from .base import Backend

log = logging.getLogger("clipad")
MODULES = {"tensorrt": ("tensorrt",), "rtx": ("tensorrt_rtx",)}
VERSION_COMPATIBLE_MODULES = ("tensorrt", "tensorrt_lean", "tensorrt_dispatch")
INSTALL = {"tensorrt": "pip install tensorrt-cu12 (CUDA 12) or tensorrt-cu13 (CUDA 13); on Jetson use JetPack's "
                       "python3-libnvinfer",
           "rtx": "pip install tensorrt-rtx-cu13 (or tensorrt-rtx-cu12)"}
_NP = {"FLOAT": np.float32, "HALF": np.float16, "INT8": np.int8, "INT32": np.int32, "INT64": np.int64,
       "BOOL": np.bool_, "UINT8": np.uint8}


def rebuild_command(model_dir: str, entry: EngineEntry | None = None, precision: str | None = None) -> str:
    import shlex

    chosen = entry.precision if entry else precision or precisions.ENGINE_PRECISIONS[0]
    return f"export-engine --from-onnx {shlex.quote(model_dir)} --precision {chosen}"


def select_engine(manifest: Manifest, gpu_cc: str | None, precision: str | None = None) -> EngineEntry | None:
    """The listed engine built for this compute capability ("8.6") in ``precision``, or by default the one whose
    precision ranks first (``precisions.ENGINE_PRECISIONS``: fp16, then int8, then fp32)."""
    if not gpu_cc:
        return None
    fits = [e for e in manifest.engines if e.target.compute_capability == str(gpu_cc)
            and (precision is None or e.precision == precision)]
    order = precisions.ENGINE_PRECISIONS
    return min(fits, key=lambda e: order.index(e.precision) if e.precision in order else len(order), default=None)


def _module_names(entry: EngineEntry) -> tuple[str, ...]:
    if entry.flavor not in MODULES:
        raise ClipadError(f"engine {entry.file}: unknown flavor {entry.flavor!r} (expected tensorrt or rtx)")
    return VERSION_COMPATIBLE_MODULES if entry.flavor == "tensorrt" and entry.version_compatible \
        else MODULES[entry.flavor]


def import_tensorrt(entry: EngineEntry):
    """(module, import name) of the TensorRT flavor that runs this engine."""
    names, errors = _module_names(entry), []
    for name in names:
        try:
            return importlib.import_module(name), name
        except (ImportError, OSError) as exc:
            errors.append(f"{name}: {str(exc).splitlines()[0][:120]}" if str(exc) else name)
    hint = INSTALL[entry.flavor]
    if len(names) > 1:
        hint += ", or the runtime-only tensorrt-lean-cu12/cu13"
    raise ClipadError(f"engine {entry.file} needs the {names[0]} Python module, which cannot be imported "
                      f"({'; '.join(errors)}): {hint}; or use --backend onnxruntime")


def tensorrt_available(manifest: Manifest | None = None, device: int = 0, precision: str | None = None) -> bool:
    """A GPU is present and a TensorRT module imports (for ``manifest``: the module its engine for this GPU needs)."""
    gpu = cb.gpu_info(device)
    if gpu is None:
        return False
    if manifest is not None:
        entry = select_engine(manifest, gpu["compute_capability"], precision)
        if entry is None:
            return False
        modules = [_module_names(entry)]
    else:
        modules = [VERSION_COMPATIBLE_MODULES, MODULES["rtx"]]
    for names in modules:
        for name in names:
            try:
                importlib.import_module(name)
                return True
            except (ImportError, OSError):
                pass
    return False


def version_mismatch(entry: EngineEntry, module_name: str, installed: str) -> str | None:
    """Why ``entry`` cannot load on TensorRT ``installed``, None when it can."""
    built = entry.trt_version
    if not built:
        return None
    if entry.version_compatible and _version(installed) < _version(built):
        return (f"version-compatible engine built with TensorRT {built} needs TensorRT >= {built}, but {module_name} "
                f"{installed} is installed")
    if not entry.version_compatible and _version(installed) != _version(built):
        return (f"built with {module_name} {built} but {installed} is installed (an engine only loads on the TensorRT "
                "version that built it)")
    return None


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(m) for m in re.findall(r"\d+", str(text))[:3])


def _np_dtype(trt, dtype) -> np.dtype | None:
    name = getattr(dtype, "name", None) or str(dtype).rsplit(".", 1)[-1]
    if name in _NP:
        return np.dtype(_NP[name])
    try:
        return np.dtype(trt.nptype(dtype))
    except Exception:  # BF16, FP8 ... have no numpy type
        return None


def _dtype_name(dtype) -> str:
    return getattr(dtype, "name", None) or str(dtype).rsplit(".", 1)[-1]


def _probe_gpu(device: int) -> dict:
    """The GPU to run on, probed before anything touches TensorRT (the lean runtime segfaults without a GPU)."""
    gpu = cb.gpu_at(device)
    if gpu is None:
        raise ClipadError(f"{cb.no_gpu_reason()}; use --backend onnxruntime")
    return gpu


class TensorRTBackend(Backend):
    name = "tensorrt"

    @classmethod
    def available(cls, manifest, device: int = 0, precision: str | None = None) -> bool:
        return tensorrt_available(manifest, device, precision)

    def __init__(self, model_dir: str, manifest: Manifest, engine: str | None = None,
                 cuda_graph: bool = False, device: int | None = None, precision: str | None = None):
        engine_file, device = engine, device or 0
        self.runtime = self.engine = self.context = self.stream = self._graph = None
        self.device_buffers: dict[str, cb.DeviceBuffer] = {}
        self.host: dict[str, cb.PinnedHostArray] = {}
        self.model_dir, self.cuda_graph, self._graph_shape = model_dir, bool(cuda_graph), None
        self.graph_mode = None   # "tensorrt-rtx" (its own capture), "stream capture", or None
        engines = manifest.engines
        if not engines:
            raise ClipadError(f"{model_dir}: the manifest lists no TensorRT engine; build one on the target: "
                              f"{rebuild_command(model_dir)}")
        entry = None
        if engine_file is not None:
            entry = next((e for e in engines if e.file in (engine_file, os.path.basename(engine_file))), None)
            if entry is None:
                raise ClipadError(f"--engine {engine_file}: not listed in {model_dir}/manifest.json "
                                  f"(listed: {', '.join(e.file for e in engines)})")
        gpu = _probe_gpu(device)
        access = cb.access_report()
        if access:
            log.info("CUDA access: %s (driver supports CUDA %s)", access["detail"],
                     access["driver_cuda_version"] or "?")
        cc = gpu["compute_capability"]
        if entry is None:
            entry = select_engine(manifest, cc, precision)
            if entry is None:
                listed = ", ".join(f"{e.file} (sm {e.target.compute_capability})" for e in engines)
                what = f"no {precision} engine" if precision else "no engine"
                raise ClipadError(f"{model_dir}: {what} for this GPU ({gpu['name']}, compute capability {cc}; "
                                  f"listed: {listed}); build one on this machine: "
                                  f"{rebuild_command(model_dir, precision=precision)}")
        elif precision is not None and entry.precision != precision:
            raise ClipadError(f"--engine {entry.file} is {entry.precision}, not {precision}")
        self.entry, self.gpu, self.precision = entry, gpu, entry.precision
        cmd = rebuild_command(model_dir, entry)
        path = os.path.join(model_dir, entry.file)

        trt, self.module_name = import_tensorrt(entry)
        mismatch = version_mismatch(entry, self.module_name, str(getattr(trt, "__version__", "?")))
        if mismatch:
            raise ClipadError(f"{path}: {mismatch}; rebuild on this machine: {cmd}")
        target = entry.target
        if target.compute_capability != cc:
            raise ClipadError(f"{path}: built for compute capability {target.compute_capability}"
                              f"{' (' + target.gpu_name + ')' if target.gpu_name else ''} but this GPU is "
                              f"{gpu['name']} (compute capability {cc}); rebuild on this machine: {cmd}")
        if target.gpu_name and not target.aot and target.gpu_name != gpu["name"]:
            log.warning("%s was built on %s, running on %s (same compute capability); rebuild for best results: %s",
                        entry.file, target.gpu_name, gpu["name"], cmd)
        data = self._read_engine(path, entry, cmd)
        self.trt = trt
        try:
            cb.set_device(device)
            self._load(trt, data, manifest, path, cmd)
        except BaseException:
            self.close()
            raise

    @staticmethod
    def _read_engine(path: str, entry: EngineEntry, cmd: str) -> bytes:
        if not os.path.isfile(path):
            raise ClipadError(f"{path}: engine listed in the manifest but missing; rebuild: {cmd}")
        with open(path, "rb") as fh:
            data = fh.read()
        if len(data) != entry.bytes or hashlib.sha256(data).hexdigest() != entry.sha256:
            raise ClipadError(f"{path}: size/sha256 does not match the manifest (file changed or truncated); "
                              f"rebuild: {cmd}")
        return data

    def _load(self, trt, data: bytes, manifest: Manifest, path: str, cmd: str) -> None:
        self.logger = trt.Logger(trt.Logger.WARNING)
        self.runtime = trt.Runtime(self.logger)
        if self.entry.version_compatible:
            self.runtime.engine_host_code_allowed = True  # the plan carries its own lean runtime (trusted file)
        self.engine = self.runtime.deserialize_cuda_engine(data)
        if self.engine is None:
            raise ClipadError(f"{path}: {self.module_name} {trt.__version__} cannot deserialize the engine (built by "
                              f"another TensorRT version or for another GPU?); rebuild on this machine: {cmd}")
        spec = {manifest.input.name: (trt.TensorIOMode.INPUT, manifest.input)}
        spec.update({o.name: (trt.TensorIOMode.OUTPUT, o) for o in manifest.outputs})
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        if sorted(names) != sorted(spec):
            raise ClipadError(f"{path}: engine tensors {names} do not match the manifest's {list(spec)}; "
                              f"rebuild: {cmd}")
        self.dtypes, shapes = {}, {}
        for name in names:
            mode, want = spec[name]
            dtype = self.engine.get_tensor_dtype(name)
            shape = tuple(self.engine.get_tensor_shape(name))
            self.dtypes[name] = _np_dtype(trt, dtype)
            wanted_shape = list(want.shape)
            if self.engine.get_tensor_mode(name) != mode or self.dtypes[name] != np.dtype(want.dtype):
                raise ClipadError(f"{path}: engine tensor {name!r} is {self.engine.get_tensor_mode(name)} "
                                  f"{_dtype_name(dtype)}, the manifest expects {mode} {want.dtype}; "
                                  f"rebuild: {cmd}")
            if len(shape) != len(wanted_shape) or list(shape[1:]) != wanted_shape[1:]:
                raise ClipadError(f"{path}: engine tensor {name!r} has shape {list(shape)}, the manifest says "
                                  f"{wanted_shape}; rebuild: {cmd}")
            shapes[name] = shape
        self.input_name = next(iter(spec))
        self.output_names = [o.name for o in manifest.outputs]
        self.image_size = manifest.image_size
        in_shape = shapes[self.input_name]
        if in_shape[0] < 0:
            lo, _, hi = (tuple(s) for s in self.engine.get_tensor_profile_shape(self.input_name, 0))
            self._range = (int(lo[0]), int(hi[0]))
        else:
            self._range = (in_shape[0], in_shape[0])

        self.context = self._create_context(trt)
        if self.context is None:
            raise ClipadError(f"{path}: cannot create a TensorRT execution context (out of GPU memory?)")
        # Buffers are sized once for the largest batch of the profile and reused for every run.
        max_in = (self._range[1], *in_shape[1:])
        if not self.context.set_input_shape(self.input_name, max_in):
            raise ClipadError(f"{path}: TensorRT rejects input shape {list(max_in)}; rebuild: {cmd}")
        max_shapes = {self.input_name: max_in}
        max_shapes.update({o: tuple(self.context.get_tensor_shape(o)) for o in self.output_names})
        for name, shape in max_shapes.items():
            if min(shape) < 0:
                raise ClipadError(f"{path}: cannot resolve the shape of {name!r} ({list(shape)}); rebuild: {cmd}")
            self.device_buffers[name] = cb.DeviceBuffer(int(np.prod(shape)) * self.dtypes[name].itemsize)
            self.host[name] = cb.PinnedHostArray(shape, self.dtypes[name])
        self.stream = cb.Stream()

    def _create_context(self, trt):
        """With ``cuda_graph`` on TensorRT-RTX, its built-in whole-graph capture (one line, dynamic shapes included)
        instead of our stream capture, which RTX engines support only when built for user allocation."""
        if self.cuda_graph and hasattr(trt, "CudaGraphStrategy") and hasattr(self.engine, "create_runtime_config"):
            config = self.engine.create_runtime_config()
            config.cuda_graph_strategy = trt.CudaGraphStrategy.WHOLE_GRAPH_CAPTURE
            self.graph_mode = "tensorrt-rtx"
            return self.engine.create_execution_context(config)
        if self.cuda_graph:
            self.graph_mode = "stream capture"
        return self.engine.create_execution_context()

    @property
    def description(self) -> str:
        graph = {"tensorrt-rtx": ", CUDA graph (TensorRT-RTX)", "stream capture": ", CUDA graph"}
        return (f"{self.module_name.replace('_', '-')} {self.trt.__version__} {self.entry.precision} on "
                f"{self.gpu['name']} (sm {self.gpu['compute_capability']}, device {self.gpu['device']})"
                + graph.get(self.graph_mode, ""))

    @property
    def batch_range(self) -> tuple[int, int]:
        return self._range

    def _flat(self, name: str, shape: tuple) -> np.ndarray:
        return self.host[name].array.reshape(-1)[:int(np.prod(shape))]

    def _enqueue(self, shapes: dict) -> None:
        host = self._flat(self.input_name, shapes[self.input_name])
        cb.memcpy_htod_async(self.device_buffers[self.input_name].ptr, host, self.stream)
        if not self.context.execute_async_v3(self.stream.handle):
            raise ClipadError("TensorRT execute_async_v3 failed (see the TensorRT messages above)")
        for name in self.output_names:
            cb.memcpy_dtoh_async(self._flat(name, shapes[name]), self.device_buffers[name].ptr, self.stream)

    def _infer(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if self.context is None:
            raise ClipadError("the TensorRT backend is closed")
        if not self.context.set_input_shape(self.input_name, batch.shape):
            raise ClipadError(f"TensorRT rejects input shape {list(batch.shape)} (batch range {self._range})")
        for name, buf in self.device_buffers.items():
            if not self.context.set_tensor_address(name, buf.ptr):
                raise ClipadError(f"TensorRT rejects the address of tensor {name!r}")
        shapes = {self.input_name: batch.shape}
        shapes.update({o: tuple(self.context.get_tensor_shape(o)) for o in self.output_names})
        self._flat(self.input_name, batch.shape)[:] = batch.reshape(-1)
        if self.graph_mode == "stream capture":
            self._run_graph(shapes)
        else:
            self._enqueue(shapes)
        self.stream.synchronize()
        return tuple(self._flat(o, shapes[o]).reshape(shapes[o]).copy() for o in self.output_names)

    def _run_graph(self, shapes: dict) -> None:
        key = tuple(sorted(shapes.items()))
        if self._graph is not None and self._graph_shape == key:
            self._graph.launch(self.stream)
            return
        self._drop_graph()
        # This run executes normally (TensorRT finishes shape-dependent setup outside a capture); the graph is
        # captured afterwards and replayed while the shapes stay the same.
        self._enqueue(shapes)
        error = graph = None
        try:
            cb.begin_capture(self.stream)
        except ClipadError as exc:
            return self._no_graph(exc)
        try:
            self._enqueue(shapes)
        except ClipadError as exc:
            error = exc
        try:
            graph = cb.end_capture(self.stream)
        except ClipadError as exc:
            error = error or exc
        if error is not None:
            if graph is not None:
                graph.close()
            return self._no_graph(error)
        self._graph, self._graph_shape = graph, key

    def _no_graph(self, exc: Exception) -> None:
        log.warning("CUDA graph capture failed (%s); running without CUDA graphs", exc)
        self.cuda_graph, self.graph_mode = False, None

    def _drop_graph(self) -> None:
        graph, self._graph, self._graph_shape = self._graph, None, None
        if graph is not None:
            graph.close()

    def _release(self) -> None:
        def attempt(step):
            try:
                step()
            except ClipadError as exc:
                log.warning("TensorRT backend cleanup: %s", exc)

        if self.stream is not None:
            attempt(self.stream.synchronize)
        attempt(self._drop_graph)
        self.context = None  # TensorRT objects go in dependency order: context, engine, runtime
        self.engine = None
        self.runtime = None
        for buf in [*self.host.values(), *self.device_buffers.values()]:
            attempt(buf.close)
        self.host, self.device_buffers = {}, {}
        stream, self.stream = self.stream, None
        if stream is not None:
            attempt(stream.close)
