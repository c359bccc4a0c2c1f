"""SIMULATED stand-in for the ``tensorrt`` module (simulated backend: runs ONNX Runtime underneath; not TensorRT).

Only the TensorRT 10/11 name-based API surface that ``clipad.runtime.backends.tensorrt`` uses is implemented:
``__version__``, ``Logger``, ``Runtime(logger).deserialize_cuda_engine(data)``, ``TensorIOMode``, ``DataType`` +
``nptype``, an ``ICudaEngine`` (``num_io_tensors``, ``get_tensor_name/mode/dtype/shape``,
``get_tensor_profile_shape``, ``create_execution_context``) and an ``IExecutionContext`` (``set_input_shape``,
``get_tensor_shape``, ``set_tensor_address``, ``execute_async_v3``). APIs that TensorRT 10/11 removed or that the
toolkit must not use (``num_bindings``, ``get_binding_*``, ``execute_v2`` ...) raise AttributeError and are recorded.

A simulated "engine file" is ``MAGIC`` + one JSON line (the optimization profile's batch range and flags) + the ONNX
model bytes (see ``engine_bytes``); anything else, or a truncated file, makes ``deserialize_cuda_engine`` return None
like the real one. Execution reads the inputs from, and writes the outputs to, the simulated device memory of
``tests/simulated_cuda.py`` (module attribute ``cuda``) through its stream queue, so forgotten copies, missing
synchronization or too-small buffers show up as wrong numbers or CUDA errors.

Tests set the state with ``reset(cuda, version, rtx=False)``; ``CALLS`` records ``(object, method, detail)`` in call
order. With ``rtx=True`` the module also has TensorRT-RTX's ``CudaGraphStrategy`` (built-in CUDA graphs, set on the
runtime config an execution context is created with); such contexts tag their work "trt.execute(rtx graph)".
"""
from __future__ import annotations

import enum
import json

import numpy as np

__version__ = "10.3.0.30"
MAGIC = b"SIMTRT1\n"
cuda = None           # the SimulatedCudaRuntime holding "device memory"
CALLS: list = []
FORBIDDEN = frozenset({
    "num_bindings", "get_binding_index", "get_binding_name", "get_binding_shape", "get_binding_dtype",
    "binding_is_input", "set_binding_shape", "get_binding_profile_shape", "max_batch_size", "execute",
    "execute_v2", "execute_async", "execute_async_v2", "device_memory_size", "max_workspace_size",
})


RTX = False


class _CudaGraphStrategy(enum.Enum):
    DISABLED = 0
    WHOLE_GRAPH_CAPTURE = 1


def reset(cuda_runtime, version: str = "10.3.0.30", rtx: bool = False) -> None:
    global cuda, __version__, RTX
    cuda, __version__, RTX = cuda_runtime, version, rtx
    if rtx:
        globals()["CudaGraphStrategy"] = _CudaGraphStrategy
    else:
        globals().pop("CudaGraphStrategy", None)
    CALLS.clear()


def engine_bytes(onnx_bytes: bytes, batch: tuple[int, int, int] = (1, 1, 4), version_compatible: bool = False,
                 fail_in_capture: bool = False) -> bytes:
    header = {"batch": list(batch), "version_compatible": version_compatible, "fail_in_capture": fail_in_capture}
    return MAGIC + json.dumps(header).encode() + b"\n" + onnx_bytes


def forbidden_calls() -> list:
    return [c for c in CALLS if c[2] == "FORBIDDEN"]


class Logger:
    INTERNAL_ERROR, ERROR, WARNING, INFO, VERBOSE = range(5)

    def __init__(self, min_severity: int = 2):
        self.min_severity = min_severity


class TensorIOMode(enum.Enum):
    NONE = 0
    INPUT = 1
    OUTPUT = 2


class DataType(enum.Enum):
    FLOAT = 0
    HALF = 1
    INT8 = 2
    INT32 = 3
    BOOL = 4
    UINT8 = 5
    INT64 = 7


_NP = {DataType.FLOAT: np.float32, DataType.HALF: np.float16, DataType.INT8: np.int8, DataType.INT32: np.int32,
       DataType.BOOL: np.bool_, DataType.UINT8: np.uint8, DataType.INT64: np.int64}
_ORT = {"tensor(float)": DataType.FLOAT, "tensor(float16)": DataType.HALF, "tensor(int8)": DataType.INT8,
        "tensor(int32)": DataType.INT32, "tensor(bool)": DataType.BOOL, "tensor(uint8)": DataType.UINT8,
        "tensor(int64)": DataType.INT64}


def nptype(trt_type: DataType):
    return _NP[trt_type]


class _Recorded:
    _kind = "?"

    def _rec(self, method, detail=None):
        CALLS.append((self._kind, method, detail))

    def __getattr__(self, name):
        if name in FORBIDDEN:
            CALLS.append((self._kind, name, "FORBIDDEN"))
        raise AttributeError(f"'tensorrt.{self._kind}' object has no attribute '{name}'")


class Runtime(_Recorded):
    _kind = "Runtime"

    def __init__(self, logger: Logger):
        if not isinstance(logger, Logger):
            raise TypeError("Runtime(logger): a tensorrt.Logger is required")
        self.logger = logger
        self.engine_host_code_allowed = False
        self._rec("__init__")

    def deserialize_cuda_engine(self, data) -> "ICudaEngine | None":
        self._rec("deserialize_cuda_engine", len(data))
        data = bytes(data)
        if not data.startswith(MAGIC) or b"\n" not in data[len(MAGIC):]:
            return None  # real TensorRT logs "magicTag" / serialization errors and returns None
        head, onnx_bytes = data[len(MAGIC):].split(b"\n", 1)
        try:
            header = json.loads(head)
            import onnxruntime as ort

            opts = ort.SessionOptions()
            opts.log_severity_level = 4
            session = ort.InferenceSession(onnx_bytes, opts, providers=["CPUExecutionProvider"])
        except Exception:
            return None
        if header.get("version_compatible") and not self.engine_host_code_allowed:
            return None  # TensorRT refuses version-compatible plans unless host code is allowed
        return ICudaEngine(session, header)


class ICudaEngine(_Recorded):
    _kind = "ICudaEngine"

    def __init__(self, session, header: dict):
        self.session, self.header = session, header
        self.io = {}
        for mode, args in ((TensorIOMode.INPUT, session.get_inputs()), (TensorIOMode.OUTPUT, session.get_outputs())):
            for a in args:
                self.io[a.name] = (mode, _ORT[a.type], list(a.shape))
        self.names = list(self.io)

    @property
    def num_io_tensors(self) -> int:
        self._rec("num_io_tensors")
        return len(self.names)

    def get_tensor_name(self, index: int) -> str:
        self._rec("get_tensor_name", index)
        return self.names[index]

    def get_tensor_mode(self, name: str) -> TensorIOMode:
        self._rec("get_tensor_mode", name)
        return self.io[name][0] if name in self.io else TensorIOMode.NONE

    def get_tensor_dtype(self, name: str) -> DataType:
        self._rec("get_tensor_dtype", name)
        return self.io[name][1]

    def get_tensor_shape(self, name: str) -> tuple:
        self._rec("get_tensor_shape", name)
        return tuple(d if isinstance(d, int) else -1 for d in self.io[name][2])

    def get_tensor_profile_shape(self, name: str, profile_index: int) -> list:
        self._rec("get_tensor_profile_shape", (name, profile_index))
        if profile_index != 0 or self.io[name][0] is not TensorIOMode.INPUT:
            raise RuntimeError("get_tensor_profile_shape: only profile 0 of an input tensor exists")
        shape = self.io[name][2]
        return [tuple(b if not isinstance(d, int) else d for d in shape) for b in self.header["batch"]]

    def create_runtime_config(self) -> "IRuntimeConfig":
        """Full TensorRT 10.11+ has runtime configs too, but only TensorRT-RTX has ``CudaGraphStrategy``."""
        self._rec("create_runtime_config")
        return IRuntimeConfig()

    def create_execution_context(self, runtime_config: "IRuntimeConfig | None" = None) -> "IExecutionContext":
        self._rec("create_execution_context", None if runtime_config is None else
                  runtime_config.cuda_graph_strategy.name)
        return IExecutionContext(self, runtime_config)


class IRuntimeConfig:
    def __init__(self):
        self.cuda_graph_strategy = _CudaGraphStrategy.DISABLED


class IExecutionContext(_Recorded):
    _kind = "IExecutionContext"

    def __init__(self, engine: ICudaEngine, runtime_config: IRuntimeConfig | None = None):
        self.engine = engine
        self.rtx_graph = runtime_config is not None and \
            runtime_config.cuda_graph_strategy is _CudaGraphStrategy.WHOLE_GRAPH_CAPTURE
        self.shapes: dict[str, tuple] = {}
        self.addresses: dict[str, int] = {}

    def set_input_shape(self, name: str, shape) -> bool:
        shape = tuple(int(d) for d in shape)
        self._rec("set_input_shape", (name, shape))
        mode, _, declared = self.engine.io.get(name, (None, None, None))
        if mode is not TensorIOMode.INPUT or len(shape) != len(declared):
            return False
        lo, _, hi = self.engine.header["batch"]
        for d, want in zip(shape, declared):
            if (isinstance(want, int) and d != want) or (not isinstance(want, int) and not lo <= d <= hi):
                return False
        self.shapes[name] = shape
        return True

    def _symbols(self) -> dict:
        values = {}
        for name, shape in self.shapes.items():
            values.update({d: v for d, v in zip(self.engine.io[name][2], shape) if not isinstance(d, int)})
        return values

    def get_tensor_shape(self, name: str) -> tuple:
        self._rec("get_tensor_shape", name)
        if name in self.shapes:
            return self.shapes[name]
        values = self._symbols()
        return tuple(d if isinstance(d, int) else values.get(d, -1) for d in self.engine.io[name][2])

    def set_tensor_address(self, name: str, ptr: int) -> bool:
        self._rec("set_tensor_address", (name, int(ptr)))
        if name not in self.engine.io:
            return False
        self.addresses[name] = int(ptr)
        return True

    def execute_async_v3(self, stream_handle: int) -> bool:
        self._rec("execute_async_v3", int(stream_handle))
        io = self.engine.io
        if any(io[n][0] is TensorIOMode.INPUT and n not in self.shapes for n in io):
            return False  # "not all input dimensions are specified"
        if any(n not in self.addresses for n in io):
            return False  # "Neither address or allocator is set for output tensor"
        if self.engine.header.get("fail_in_capture") and int(stream_handle) in cuda.capturing:
            return False  # like an engine with layers that cannot be captured
        shapes = {n: self.get_tensor_shape(n) for n in io}
        addresses = dict(self.addresses)
        what = "trt.execute(rtx graph)" if self.rtx_graph else "trt.execute"
        cuda.enqueue(stream_handle, what, lambda: self._run(shapes, addresses))
        return True

    def _run(self, shapes: dict, addresses: dict) -> None:
        io, feeds = self.engine.io, {}
        for name, (mode, dtype, _) in io.items():
            if mode is TensorIOMode.INPUT:
                dt = np.dtype(_NP[dtype])
                nbytes = int(np.prod(shapes[name])) * dt.itemsize
                feeds[name] = np.frombuffer(cuda.read(addresses[name], nbytes), dt).reshape(shapes[name])
        outputs = [n for n in io if io[n][0] is TensorIOMode.OUTPUT]
        for name, value in zip(outputs, self.engine.session.run(outputs, feeds)):
            value = np.ascontiguousarray(value, _NP[io[name][1]])
            assert value.shape == tuple(shapes[name]), (name, value.shape, shapes[name])
            cuda.write(addresses[name], value.tobytes())
