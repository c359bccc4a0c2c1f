"""SIMULATED CUDA runtime for tests — no GPU, no driver, NOT CUDA.

A stand-in for the few ``cuda.bindings.runtime`` calls that ``clipad.runtime.backends.cuda_buffers`` makes, with the
same convention (every call returns ``(cudaError_t, *values)``). Install it with
``monkeypatch.setattr(cuda_buffers, "_rt", SimulatedCudaRuntime())``.

* "Device memory" is a dict from fake integer addresses (never dereferenced) to numpy byte arrays.
* Pinned host memory (cudaMallocHost) is real host memory (a numpy array kept alive here), so the shim's ctypes view
  over it works exactly as with real CUDA.
* Streams are asynchronous like the real thing: copies and kernels (the simulated TensorRT's ``execute_async_v3``)
  are queued and only run at ``cudaStreamSynchronize``/``cudaStreamDestroy``; a fault inside queued work is reported
  by that call, as CUDA reports asynchronous errors.
* Stream capture records the queued work instead of running it; a launched graph re-queues it.
* ``fail[name] = cudaError_t.X`` makes a call fail; ``calls`` records every call by name.
"""
from __future__ import annotations

import ctypes
import enum
from types import SimpleNamespace

import numpy as np


class cudaError_t(enum.IntEnum):
    cudaSuccess = 0
    cudaErrorInvalidValue = 1
    cudaErrorMemoryAllocation = 2
    cudaErrorInsufficientDriver = 35
    cudaErrorInvalidDevice = 101
    cudaErrorInvalidResourceHandle = 400
    cudaErrorIllegalAddress = 700
    cudaErrorStreamCaptureUnsupported = 900
    cudaErrorStreamCaptureInvalidated = 901


class cudaMemcpyKind(enum.IntEnum):
    cudaMemcpyHostToHost = 0
    cudaMemcpyHostToDevice = 1
    cudaMemcpyDeviceToHost = 2
    cudaMemcpyDeviceToDevice = 3


class cudaStreamCaptureMode(enum.IntEnum):
    cudaStreamCaptureModeGlobal = 0
    cudaStreamCaptureModeThreadLocal = 1
    cudaStreamCaptureModeRelaxed = 2


class SimulatedFault(Exception):
    """Raised by queued work that touches memory it must not (reported as cudaErrorIllegalAddress)."""


OK = cudaError_t.cudaSuccess
DEVICE_BASE = 0x7E00_0000_0000  # fake device addresses: far from anything the host allocates


def _recorded(fn):
    def wrapper(self, *args):
        self.calls.append(fn.__name__)
        if fn.__name__ in self.fail:
            return (self.fail[fn.__name__], None)
        return fn(self, *args)
    wrapper.__name__ = fn.__name__
    return wrapper


class SimulatedCudaRuntime:
    cudaError_t = cudaError_t
    cudaMemcpyKind = cudaMemcpyKind
    cudaStreamCaptureMode = cudaStreamCaptureMode
    cudaStreamNonBlocking = 1

    def __init__(self, name: str = "NVIDIA RTX A2000", compute_capability: tuple[int, int] = (8, 6),
                 devices: int = 1, driver: int = 12060, runtime: int = 12060,
                 gpus: list[tuple[str, tuple[int, int]]] | None = None):
        self.gpus = list(gpus) if gpus else [(name, compute_capability)] * devices
        self.devices, self.driver, self.runtime = len(self.gpus), driver, runtime
        self.current_device = 0
        self.stream_flags: dict[int, int] = {}        # handle -> flags given at creation
        self.allocated_on: dict[int, int] = {}       # device pointer -> device that was current
        self.device: dict[int, np.ndarray] = {}      # fake address -> bytes
        self.pinned: dict[int, np.ndarray] = {}      # real host address -> bytes
        self.freed_pinned: list[np.ndarray] = []     # kept so a use-after-free cannot crash the test process
        self.streams: dict[int, list] = {0: []}      # handle -> queued work (0 = legacy default stream)
        self.capturing: dict[int, list] = {}         # handle -> work recorded since BeginCapture
        self.graphs: dict[int, list] = {}
        self.graph_execs: dict[int, list] = {}
        self.calls: list[str] = []
        self.fail: dict[str, cudaError_t] = {}
        self.pageable_copies = 0
        self.executed: list[str] = []                # names of queued work, in the order it ran
        self._next_ptr, self._next_handle = DEVICE_BASE, 1

    # ---- bookkeeping helpers for tests and for the simulated TensorRT --------------------------------------------
    def live(self) -> dict:
        return {"device": len(self.device), "pinned": len(self.pinned), "streams": len(self.streams) - 1,
                "graphs": len(self.graphs), "graph_execs": len(self.graph_execs)}

    def _handle(self) -> int:
        self._next_handle += 1
        return self._next_handle

    def _device_view(self, ptr: int, nbytes: int) -> np.ndarray:
        for base, buf in self.device.items():
            if base <= ptr and ptr + nbytes <= base + buf.size:
                return buf[ptr - base:ptr - base + nbytes]
        raise SimulatedFault(f"device range {ptr:#x}+{nbytes} is not inside one allocation")

    def read(self, ptr: int, nbytes: int) -> bytes:
        return self._device_view(ptr, nbytes).tobytes()

    def write(self, ptr: int, data: bytes) -> None:
        self._device_view(ptr, len(data))[:] = np.frombuffer(data, np.uint8)

    def enqueue(self, stream, what: str, fn) -> None:
        """Queue work on a stream (or record it into the capture in progress)."""
        handle = int(stream)
        if handle not in self.streams:
            raise SimulatedFault(f"stream {handle} does not exist")
        (self.capturing[handle] if handle in self.capturing else self.streams[handle]).append((what, fn))

    def _drain(self, handle: int):
        work, self.streams[handle] = self.streams[handle], []
        try:
            for what, fn in work:
                fn()
                self.executed.append(what)
        except SimulatedFault:
            return (cudaError_t.cudaErrorIllegalAddress,)
        return (OK,)

    # ---- the cudart surface ---------------------------------------------------------------------------------------
    @_recorded
    def cudaGetDeviceCount(self):
        return OK, self.devices

    @_recorded
    def cudaGetDeviceProperties(self, device):
        if not 0 <= device < self.devices:
            return cudaError_t.cudaErrorInvalidValue, None
        name, cc = self.gpus[device]
        return OK, SimpleNamespace(name=name.encode(), major=cc[0], minor=cc[1], totalGlobalMem=4 << 30)

    @_recorded
    def cudaSetDevice(self, device):
        if not 0 <= int(device) < self.devices:
            return (cudaError_t.cudaErrorInvalidDevice,)
        self.current_device = int(device)
        return (OK,)

    @_recorded
    def cudaDriverGetVersion(self):
        return OK, self.driver

    @_recorded
    def cudaRuntimeGetVersion(self):
        return OK, self.runtime

    @_recorded
    def cudaMalloc(self, nbytes):
        ptr = self._next_ptr
        self._next_ptr += (int(nbytes) + 0xFFFF) & ~0xFFFF  # 64 KiB apart, like a real allocator's granularity
        self.device[ptr] = np.zeros(int(nbytes), np.uint8)
        self.allocated_on[ptr] = self.current_device
        return OK, ptr

    @_recorded
    def cudaFree(self, ptr):
        if self.device.pop(int(ptr), None) is None:
            return (cudaError_t.cudaErrorInvalidValue,)
        return (OK,)

    @_recorded
    def cudaMallocHost(self, nbytes):
        buf = np.zeros(int(nbytes), np.uint8)
        self.pinned[buf.ctypes.data] = buf
        return OK, buf.ctypes.data

    @_recorded
    def cudaFreeHost(self, ptr):
        buf = self.pinned.pop(int(ptr), None)
        if buf is None:
            return (cudaError_t.cudaErrorInvalidValue,)
        self.freed_pinned.append(buf)
        return (OK,)

    @_recorded
    def cudaStreamCreateWithFlags(self, flags):
        handle = self._handle()
        self.streams[handle] = []
        self.stream_flags[handle] = int(flags)
        return OK, handle

    @_recorded
    def cudaStreamSynchronize(self, stream):
        handle = int(stream)
        if handle not in self.streams:
            return (cudaError_t.cudaErrorInvalidResourceHandle,)
        if handle in self.capturing:
            return (cudaError_t.cudaErrorStreamCaptureUnsupported,)
        return self._drain(handle)

    @_recorded
    def cudaStreamDestroy(self, stream):
        handle = int(stream)
        if handle not in self.streams or handle == 0:
            return (cudaError_t.cudaErrorInvalidResourceHandle,)
        self._drain(handle)
        del self.streams[handle]
        self.capturing.pop(handle, None)
        return (OK,)

    def _host(self, ptr: int, nbytes: int) -> None:
        if not any(base <= ptr and ptr + nbytes <= base + buf.size for base, buf in self.pinned.items()):
            self.pageable_copies += 1

    @_recorded
    def cudaMemcpyAsync(self, dst, src, count, kind, stream):
        dst, src, count = int(dst), int(src), int(count)
        if kind == cudaMemcpyKind.cudaMemcpyHostToDevice:
            self._host(src, count)
            self.enqueue(stream, "memcpy_htod", lambda: self.write(dst, ctypes.string_at(src, count)))
        elif kind == cudaMemcpyKind.cudaMemcpyDeviceToHost:
            self._host(dst, count)
            self.enqueue(stream, "memcpy_dtoh", lambda: ctypes.memmove(dst, self.read(src, count), count))
        else:
            return (cudaError_t.cudaErrorInvalidValue,)
        return (OK,)

    @_recorded
    def cudaStreamBeginCapture(self, stream, mode):
        handle = int(stream)
        if handle not in self.streams or handle == 0 or handle in self.capturing:
            return (cudaError_t.cudaErrorStreamCaptureUnsupported,)
        self.capturing[handle] = []
        return (OK,)

    @_recorded
    def cudaStreamEndCapture(self, stream):
        work = self.capturing.pop(int(stream), None)
        if work is None:
            return cudaError_t.cudaErrorStreamCaptureInvalidated, None
        handle = self._handle()
        self.graphs[handle] = work
        return OK, handle

    @_recorded
    def cudaGraphInstantiate(self, graph, flags):
        if int(graph) not in self.graphs:
            return cudaError_t.cudaErrorInvalidValue, None
        handle = self._handle()
        self.graph_execs[handle] = list(self.graphs[int(graph)])
        return OK, handle

    @_recorded
    def cudaGraphLaunch(self, graph_exec, stream):
        work = self.graph_execs.get(int(graph_exec))
        if work is None:
            return (cudaError_t.cudaErrorInvalidValue,)
        for what, fn in work:
            self.enqueue(stream, "graph:" + what, fn)
        return (OK,)

    @_recorded
    def cudaGraphExecDestroy(self, graph_exec):
        return (OK,) if self.graph_execs.pop(int(graph_exec), None) is not None else \
            (cudaError_t.cudaErrorInvalidValue,)

    @_recorded
    def cudaGraphDestroy(self, graph):
        return (OK,) if self.graphs.pop(int(graph), None) is not None else (cudaError_t.cudaErrorInvalidValue,)
