"""FAKE ``pycuda.driver`` for tests — the subset clipad's pycuda adapter uses, over the SIMULATED CUDA runtime
(tests/simulated_cuda.py). NOT pycuda, NOT CUDA.

Like the real one it keeps a per-thread context stack and refuses memory, stream and copy calls when no context is
current ("invalid device context - no currently active context?"), so a test can tell that the adapter made the
device's *primary* context current on each thread. ``made_contexts`` counts ``Device.make_context()`` calls (a
private context whose pointers TensorRT could not use): the adapter must never make one.
"""
from __future__ import annotations

import ctypes
import threading
from types import SimpleNamespace

import numpy as np

MESSAGES = {"cudaErrorMemoryAllocation": "out of memory", "cudaErrorIllegalAddress":
            "an illegal memory access was encountered", "cudaErrorInvalidValue": "invalid argument"}


def make_fake_pycuda(sim) -> SimpleNamespace:
    local = threading.local()
    state = SimpleNamespace(made_contexts=0, retained=[], initialised=False)

    class Error(Exception):
        pass

    class LogicError(Error):
        pass

    def stack() -> list:
        if not hasattr(local, "stack"):
            local.stack = []
        return local.stack

    def check(call: str, out):
        err = out[0]
        if int(err) != 0:
            raise Error(f"{call} failed: {MESSAGES.get(err.name, err.name)}")
        return out[1] if len(out) > 1 else None

    def current_device(what: str) -> int:
        if not state.initialised:
            raise LogicError("cuInit has not been called")
        if not stack():
            raise LogicError(f"{what} failed: explicit_context_dependent failed: invalid device context - no "
                             "currently active context?")
        device = stack()[-1].device
        check("cuCtxSetCurrent", sim.cudaSetDevice(device))
        return device

    class Context:
        def __init__(self, device: int):
            self.device = device

        def push(self):
            stack().append(self)

        @staticmethod
        def pop():
            if not stack():
                raise LogicError("cuCtxPopCurrent failed: context stack is empty")
            stack().pop()

        @staticmethod
        def get_current():
            return stack()[-1] if stack() else None

    class Device:
        def __init__(self, n: int):
            if not 0 <= int(n) < sim.devices:
                raise LogicError("cuDeviceGet failed: invalid device ordinal")
            self.n = int(n)

        @staticmethod
        def count() -> int:
            return check("cuDeviceGetCount", sim.cudaGetDeviceCount())

        def name(self) -> str:
            return sim.gpus[self.n][0]

        def compute_capability(self) -> tuple[int, int]:
            return sim.gpus[self.n][1]

        def total_memory(self) -> int:
            return check("cuDeviceGetProperties", sim.cudaGetDeviceProperties(self.n)).totalGlobalMem

        def retain_primary_context(self) -> Context:
            state.retained.append(self.n)
            return Context(self.n)

        def make_context(self) -> Context:
            state.made_contexts += 1
            ctx = Context(self.n)
            ctx.push()
            return ctx

    class DeviceAllocation:
        def __init__(self, ptr: int):
            self.ptr = ptr

        def __int__(self):
            return self.ptr

        def free(self):
            current_device("cuMemFree")
            check("cuMemFree", sim.cudaFree(self.ptr))

    class Stream:
        def __init__(self, flags: int = 0):
            current_device("cuStreamCreate")
            self.handle = check("cuStreamCreate", sim.cudaStreamCreateWithFlags(int(flags)))

        def synchronize(self):
            check("cuStreamSynchronize", sim.cudaStreamSynchronize(self.handle))

        def __del__(self):  # pycuda destroys the stream with its object
            if self.handle in sim.streams:
                sim.cudaStreamDestroy(self.handle)

    def init():
        if "cuInit" in sim.fail:
            raise Error("cuInit failed: no CUDA-capable device is detected")
        state.initialised = True

    def mem_alloc(nbytes: int) -> DeviceAllocation:
        current_device("cuMemAlloc")
        return DeviceAllocation(check("cuMemAlloc", sim.cudaMalloc(int(nbytes))))

    def pagelocked_empty(shape, dtype):
        current_device("cuMemHostAlloc")
        dtype = np.dtype(dtype)
        nbytes = int(np.prod(shape)) * dtype.itemsize
        ptr = check("cuMemHostAlloc", sim.cudaMallocHost(nbytes))
        cls = type("PagelockedHostAllocation", (ctypes.c_ubyte * max(nbytes, 1),),
                   {"free": lambda self: check("cuMemFreeHost", sim.cudaFreeHost(ctypes.addressof(self)))})
        return np.ndarray(shape, dtype, buffer=cls.from_address(ptr))

    def _address(buffer) -> int:
        return np.frombuffer(buffer, np.uint8).ctypes.data

    def memcpy_htod_async(dest, src, stream):
        current_device("cuMemcpyHtoDAsync")
        check("cuMemcpyHtoDAsync", sim.cudaMemcpyAsync(int(dest), _address(src), len(memoryview(src).cast("B")),
                                                       1, stream.handle))

    def memcpy_dtoh_async(dest, src, stream):
        current_device("cuMemcpyDtoHAsync")
        check("cuMemcpyDtoHAsync", sim.cudaMemcpyAsync(_address(dest), int(src), len(memoryview(dest).cast("B")),
                                                       2, stream.handle))

    return SimpleNamespace(Error=Error, LogicError=LogicError, Context=Context, Device=Device, Stream=Stream,
                           init=init, mem_alloc=mem_alloc, pagelocked_empty=pagelocked_empty,
                           memcpy_htod_async=memcpy_htod_async, memcpy_dtoh_async=memcpy_dtoh_async,
                           get_driver_version=lambda: sim.driver,
                           get_version=lambda: (sim.runtime // 1000, sim.runtime % 1000 // 10, 0), state=state)
