"""pycuda (when a user already has it, e.g. on JetPack) in the cudart-like convention of ``cuda_access``.

pycuda speaks the driver API, TensorRT the runtime API, and the two share memory only inside one context: the
runtime API uses each device's *primary* context. So this adapter retains the primary context of the current device
and makes it current on whichever thread calls (never ``pycuda.autoinit``, which creates a second, private context
whose pointers TensorRT cannot use). pycuda has no CUDA-graph API: the capture calls are absent, and the TensorRT
backend then runs without graphs and says so. Tested only against a fake pycuda here (tests/fake_pycuda.py).
"""
from __future__ import annotations

import ctypes
import threading

import numpy as np

from .cuda_ctypes import CudaStatus

ERROR = CudaStatus(999, "pycuda")  # pycuda raises exceptions instead of returning codes; the message is kept below
OK = CudaStatus(0, "cudaSuccess")


class _Kinds:
    cudaMemcpyHostToDevice = 1
    cudaMemcpyDeviceToHost = 2


class PycudaRuntime:
    cudaMemcpyKind = _Kinds
    cudaStreamNonBlocking = 1  # CU_STREAM_NON_BLOCKING

    def __init__(self, driver_module):
        self.drv = driver_module
        self.drv.init()
        self.device = 0
        self._contexts: dict[int, object] = {}  # device -> retained primary context
        self._local = threading.local()
        self._device_allocations: dict[int, object] = {}
        self._host_arrays: dict[int, np.ndarray] = {}
        self._streams: dict[int, object] = {}

    # ---- plumbing ------------------------------------------------------------------------------------------------
    def _failure(self, exc: Exception):
        text = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
        return CudaStatus(int(ERROR), f"pycuda: {text}")

    def _current(self) -> None:
        """The primary context of ``self.device`` current on this thread (pushed once per thread and device)."""
        pushed = getattr(self._local, "device", None)
        if pushed == self.device:
            return
        if pushed is not None:
            self.drv.Context.pop()
        ctx = self._contexts.get(self.device)
        if ctx is None:
            ctx = self._contexts[self.device] = self.drv.Device(self.device).retain_primary_context()
        ctx.push()
        self._local.device = self.device

    def _call(self, fn, *args, current: bool = True):
        try:
            if current:
                self._current()
            return (OK, *(fn(*args) or ()))
        except self.drv.Error as exc:
            return (self._failure(exc), None)

    def close(self) -> None:
        if getattr(self._local, "device", None) is not None:
            try:
                self.drv.Context.pop()
            finally:
                self._local.device = None

    # ---- the calls cuda_buffers makes ----------------------------------------------------------------------------
    def cudaGetDeviceCount(self):
        return self._call(lambda: (self.drv.Device.count(),), current=False)

    def cudaGetDeviceProperties(self, device):
        def props():
            dev = self.drv.Device(int(device))
            major, minor = dev.compute_capability()
            return (_Props(dev.name().encode(), major, minor, int(dev.total_memory())),)
        if not 0 <= int(device) < self.drv.Device.count():
            return (CudaStatus(101, "cudaErrorInvalidDevice"), None)
        return self._call(props, current=False)

    def cudaDriverGetVersion(self):
        return self._call(lambda: (int(self.drv.get_driver_version()),), current=False)

    def cudaRuntimeGetVersion(self):
        def version():
            major, minor, *_ = self.drv.get_version()  # the CUDA pycuda was built against
            return (major * 1000 + minor * 10,)
        return self._call(version, current=False)

    def cudaSetDevice(self, device):
        if not 0 <= int(device) < self.drv.Device.count():
            return (CudaStatus(101, "cudaErrorInvalidDevice"),)
        self.device = int(device)
        return self._call(lambda: None)[:1]

    def cudaMalloc(self, nbytes):
        def alloc():
            allocation = self.drv.mem_alloc(int(nbytes))
            self._device_allocations[int(allocation)] = allocation
            return (int(allocation),)
        return self._call(alloc)

    def cudaFree(self, ptr):
        allocation = self._device_allocations.pop(int(ptr), None)
        if allocation is None:
            return (CudaStatus(1, "cudaErrorInvalidValue"),)
        return self._call(allocation.free)[:1]

    def cudaMallocHost(self, nbytes):
        def alloc():
            array = self.drv.pagelocked_empty(int(nbytes), np.uint8)
            self._host_arrays[array.ctypes.data] = array
            return (array.ctypes.data,)
        return self._call(alloc)

    def cudaFreeHost(self, ptr):
        array = self._host_arrays.pop(int(ptr), None)
        if array is None:
            return (CudaStatus(1, "cudaErrorInvalidValue"),)
        return self._call(array.base.free)[:1]

    def cudaStreamCreateWithFlags(self, flags):
        def create():
            stream = self.drv.Stream(int(flags))
            self._streams[int(stream.handle)] = stream
            return (int(stream.handle),)
        return self._call(create)

    def _stream(self, handle):
        stream = self._streams.get(int(handle))
        if stream is None:
            raise self.drv.LogicError(f"stream {int(handle):#x} was not created here")
        return stream

    def cudaStreamSynchronize(self, stream):
        return self._call(lambda: self._stream(stream).synchronize())[:1]

    def cudaStreamDestroy(self, stream):
        def destroy():
            self._stream(stream).synchronize()
            del self._streams[int(stream)]  # pycuda destroys the stream when its object goes
        return self._call(destroy)[:1]

    def cudaMemcpyAsync(self, dst, src, count, kind, stream):
        def copy():
            s = self._stream(stream)
            if int(kind) == 1:
                self.drv.memcpy_htod_async(int(dst), (ctypes.c_ubyte * int(count)).from_address(int(src)), s)
            elif int(kind) == 2:
                self.drv.memcpy_dtoh_async((ctypes.c_ubyte * int(count)).from_address(int(dst)), int(src), s)
            else:
                raise self.drv.LogicError(f"copy kind {int(kind)} is not used by clipad")
        return self._call(copy)[:1]


class _Props:
    def __init__(self, name: bytes, major: int, minor: int, total: int):
        self.name, self.major, self.minor, self.totalGlobalMem = name, major, minor, total

