"""Minimal CUDA runtime shim for the TensorRT backend: device/pinned buffers, a stream, async copies, CUDA graphs.

Imported lazily and only by the TensorRT backend. Every CUDA call goes through ``cudart()`` + ``_call`` so tests can
swap the whole runtime for ``tests/simulated_cuda.py`` (``cuda_buffers._rt = SimulatedCudaRuntime()``), and so that
any failure, including a runtime that lacks a call, is a one-line ClipadError. ``cudart()`` is whichever route to
CUDA ``cuda_access`` finds here: cuda-python that suits the driver, pycuda, or libcudart through ctypes.
"""
from __future__ import annotations

import ctypes
import logging

import numpy as np

from ..errors import ClipadError

log = logging.getLogger("clipad")
_rt = None  # the cudart-like module in use (cuda-bindings convention: every call returns (error, *values))
_report = None  # cuda_access.Report of the choice
NO_CUDA_PYTHON = ("no way to reach CUDA from Python: pip install 'clipad-edge[tensorrt-cu12]' (CUDA 12 / JetPack 6) "
                  "or '[tensorrt-cu13]' (CUDA 13)")


def cudart():
    global _rt
    if _rt is None:
        _rt = _load()
    return _rt


def _load():
    global _report
    from .cuda_access import choose

    access, _report = choose()
    return access.runtime


def access_report() -> dict | None:
    """Which CUDA access is in use and what else was tried (None before the first CUDA call, or when simulated)."""
    return _report.as_dict() if _report is not None else None


def _err_name(err) -> str:
    return getattr(err, "name", None) or f"cudaError {int(err)}"


def _call(name: str, *args):
    """Run one cudart call; a non-zero error code becomes a ClipadError naming the CUDA error."""
    try:
        out = getattr(cudart(), name)(*args)
    except ClipadError:
        raise
    except Exception as exc:  # a binding that lacks the call, or raises instead of returning a code
        raise ClipadError(f"CUDA {name} failed: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}") from None
    err, values = out[0], out[1:]
    if int(err) != 0:
        raise ClipadError(f"CUDA {name} failed: {_err_name(err)}")
    return values[0] if len(values) == 1 else values


def _version(v: int) -> str:
    return f"{v // 1000}.{v % 1000 // 10}"


def _constant(name: str, fallback: int):
    """A cudart enum/constant; ``fallback`` is its value in the CUDA headers (stable across CUDA 11-13)."""
    try:
        return getattr(cudart(), name)
    except AttributeError:
        return fallback


def device_count() -> int:
    """Number of CUDA GPUs; 0 without a GPU, driver or route to CUDA."""
    try:
        err, count = cudart().cudaGetDeviceCount()
        return int(count or 0) if int(err) == 0 else 0
    except Exception:
        return 0


def set_device(device: int) -> None:
    """Make ``device`` current for this thread: buffers, streams and the TensorRT context are created on it."""
    _call("cudaSetDevice", int(device))


def gpu_info(device: int = 0) -> dict | None:
    """Name, compute capability ("8.6") and versions of one GPU; None when there is no GPU, driver or route to CUDA."""
    try:
        rt = cudart()
        err, count = rt.cudaGetDeviceCount()
        if int(err) != 0 or not count or device >= count:
            return None
        err, prop = rt.cudaGetDeviceProperties(device)
        if int(err) != 0:
            return None
        driver, runtime = rt.cudaDriverGetVersion()[1], rt.cudaRuntimeGetVersion()[1]
    except Exception:  # ClipadError (no cuda-python), DynamicLibNotFoundError (no libcuda)
        return None
    name = prop.name.split(b"\0")[0].decode(errors="replace") if isinstance(prop.name, bytes) else str(prop.name)
    return {"count": int(count), "device": device, "name": name.strip(),
            "compute_capability": f"{prop.major}.{prop.minor}",
            "total_memory": int(getattr(prop, "totalGlobalMem", 0) or 0),
            "driver_version": _version(int(driver or 0)), "runtime_version": _version(int(runtime or 0))}


def gpu_at(device: int) -> dict | None:
    """``gpu_info(device)``, None when this machine has no usable GPU at all; an index that is not a GPU here is a
    one-line error (``--device N`` of every command)."""
    if isinstance(device, bool) or not isinstance(device, int) or device < 0:
        raise ClipadError(f"--device {device!r}: a GPU index 0, 1, …")
    gpu = gpu_info(device)
    if gpu is None:
        count = device_count()
        if count and device >= count:
            raise ClipadError(f"--device {device}: this machine has {count} GPU(s) (0 … {count - 1})")
    return gpu


def no_gpu_reason() -> str:
    """Why gpu_info() is None, for error messages."""
    try:
        cudart()
    except ClipadError as exc:
        return str(exc)
    return "no CUDA GPU/driver found"


class DeviceBuffer:
    def __init__(self, nbytes: int):
        self.nbytes = int(nbytes)
        self.ptr = int(_call("cudaMalloc", max(self.nbytes, 1)))

    def close(self) -> None:
        ptr, self.ptr = self.ptr, 0
        if ptr:
            _call("cudaFree", ptr)


class PinnedHostArray:
    """Page-locked host memory (cudaMallocHost) seen as a numpy array; the view is invalid after close()."""

    def __init__(self, shape, dtype):
        dtype = np.dtype(dtype)
        self.shape = tuple(int(d) for d in shape)
        self.nbytes = int(np.prod(self.shape)) * dtype.itemsize
        self.ptr = int(_call("cudaMallocHost", max(self.nbytes, 1)))
        raw = (ctypes.c_ubyte * max(self.nbytes, 1)).from_address(self.ptr)
        self.array = np.frombuffer(raw, np.uint8, count=self.nbytes).view(dtype).reshape(self.shape)

    def close(self) -> None:
        ptr, self.ptr, self.array = self.ptr, 0, None
        if ptr:
            _call("cudaFreeHost", ptr)


class Stream:
    """A non-blocking stream: it does not synchronise with the legacy default stream, which other libraries in the
    process may use, and TensorRT needs a non-default stream for graph capture."""

    def __init__(self):
        self.stream = _call("cudaStreamCreateWithFlags", _constant("cudaStreamNonBlocking", 1))
        self.handle = int(self.stream)

    def synchronize(self) -> None:
        _call("cudaStreamSynchronize", self.stream)

    def close(self) -> None:
        stream, self.stream = self.stream, None
        if stream is not None:
            _call("cudaStreamDestroy", stream)


def _kind(name: str):
    try:
        return getattr(cudart().cudaMemcpyKind, name)
    except AttributeError:
        raise ClipadError(f"this CUDA binding has no {name}") from None


def memcpy_htod_async(dst_ptr: int, host_array: np.ndarray, stream: Stream) -> None:
    if not host_array.flags.c_contiguous:
        raise ClipadError("internal error: host→device copy from a non-contiguous array")
    _call("cudaMemcpyAsync", dst_ptr, host_array.ctypes.data, host_array.nbytes,
          _kind("cudaMemcpyHostToDevice"), stream.stream)


def memcpy_dtoh_async(host_array: np.ndarray, src_ptr: int, stream: Stream) -> None:
    if not host_array.flags.c_contiguous or not host_array.flags.writeable:
        raise ClipadError("internal error: device→host copy into a non-contiguous or read-only array")
    _call("cudaMemcpyAsync", host_array.ctypes.data, src_ptr, host_array.nbytes,
          _kind("cudaMemcpyDeviceToHost"), stream.stream)


class Graph:
    """An instantiated CUDA graph captured from a stream (begin_capture ... end_capture)."""

    def __init__(self, graph, graph_exec):
        self.graph, self.graph_exec = graph, graph_exec

    def launch(self, stream: Stream) -> None:
        _call("cudaGraphLaunch", self.graph_exec, stream.stream)

    def close(self) -> None:
        graph_exec, graph, self.graph_exec, self.graph = self.graph_exec, self.graph, None, None
        if graph_exec is not None:
            _call("cudaGraphExecDestroy", graph_exec)
        if graph is not None:
            _call("cudaGraphDestroy", graph)


def begin_capture(stream: Stream) -> None:
    try:
        mode = cudart().cudaStreamCaptureMode.cudaStreamCaptureModeGlobal
    except AttributeError:
        raise ClipadError("this CUDA binding has no stream capture (cudaStreamCaptureMode)") from None
    _call("cudaStreamBeginCapture", stream.stream, mode)


def end_capture(stream: Stream) -> Graph:
    graph = _call("cudaStreamEndCapture", stream.stream)
    try:
        graph_exec = _call("cudaGraphInstantiate", graph, 0)
    except ClipadError:
        _call("cudaGraphDestroy", graph)
        raise
    return Graph(graph, graph_exec)
