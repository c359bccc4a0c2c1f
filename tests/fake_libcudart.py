"""FAKE libcudart for tests — C-callable ctypes callbacks over the SIMULATED CUDA runtime (tests/simulated_cuda.py).
NOT CUDA.

``FakeLibcudart(sim).symbol(name)`` returns the address of a callback with the C prototype of that CUDA runtime
function (written here from the CUDA headers, independently of clipad's binding), so ``cuda_ctypes.CtypesCudart``
marshals real pointers and out-parameters through ctypes exactly as with the real library; the semantics (memory,
streams, graphs, injected failures) are the simulated runtime's. ``v2=True`` exports the CUDA 12 symbol
``cudaGetDeviceProperties_v2`` next to a plain one that returns another layout's garbage, as CUDA 12 does.
"""
from __future__ import annotations

import ctypes

V, I, U, S = ctypes.c_void_p, ctypes.c_int, ctypes.c_uint, ctypes.c_size_t
PV, PI = ctypes.POINTER(ctypes.c_void_p), ctypes.POINTER(ctypes.c_int)


def _p(value) -> int:
    return int(value or 0)


class FakeLibcudart:
    def __init__(self, sim, v2: bool = False):
        self.sim, self.v2 = sim, v2
        self._callbacks, self._names = {}, {}
        f = self._define
        f("cudaGetDeviceCount", (PI,), self._out_int(sim.cudaGetDeviceCount))
        f("cudaDriverGetVersion", (PI,), self._out_int(sim.cudaDriverGetVersion))
        f("cudaRuntimeGetVersion", (PI,), self._out_int(sim.cudaRuntimeGetVersion))
        f("cudaDeviceGetAttribute", (PI, I, I), self._attribute)
        props = "cudaGetDeviceProperties_v2" if v2 else "cudaGetDeviceProperties"
        f(props, (V, I), self._properties)
        if v2:
            f("cudaGetDeviceProperties", (V, I), self._old_properties)
        f("cudaSetDevice", (I,), lambda d: int(sim.cudaSetDevice(d)[0]))
        f("cudaMalloc", (PV, S), self._out_ptr(sim.cudaMalloc))
        f("cudaFree", (V,), lambda p: int(sim.cudaFree(_p(p))[0]))
        f("cudaMallocHost", (PV, S), self._out_ptr(sim.cudaMallocHost))
        f("cudaFreeHost", (V,), lambda p: int(sim.cudaFreeHost(_p(p))[0]))
        f("cudaStreamCreateWithFlags", (PV, U), self._out_ptr(sim.cudaStreamCreateWithFlags))
        f("cudaStreamSynchronize", (V,), lambda s: int(sim.cudaStreamSynchronize(_p(s))[0]))
        f("cudaStreamDestroy", (V,), lambda s: int(sim.cudaStreamDestroy(_p(s))[0]))
        f("cudaMemcpyAsync", (V, V, S, I, V),
          lambda d, s, n, k, st: int(sim.cudaMemcpyAsync(_p(d), _p(s), n, k, _p(st))[0]))
        if hasattr(type(sim), "cudaStreamCaptureMode"):  # a test may strip capture from the simulation
            f("cudaStreamBeginCapture", (V, I), lambda s, m: int(sim.cudaStreamBeginCapture(_p(s), m)[0]))
        f("cudaStreamEndCapture", (V, PV), self._end_capture)
        f("cudaGraphInstantiateWithFlags", (PV, V, ctypes.c_ulonglong), self._instantiate)
        f("cudaGraphLaunch", (V, V), lambda g, s: int(sim.cudaGraphLaunch(_p(g), _p(s))[0]))
        f("cudaGraphExecDestroy", (V,), lambda g: int(sim.cudaGraphExecDestroy(_p(g))[0]))
        f("cudaGraphDestroy", (V,), lambda g: int(sim.cudaGraphDestroy(_p(g))[0]))
        self._error_name = ctypes.CFUNCTYPE(V, I)(self._name_of)
        self._callbacks["cudaGetErrorName"] = self._error_name

    def _define(self, name, argtypes, fn):
        self._callbacks[name] = ctypes.CFUNCTYPE(I, *argtypes)(fn)

    def symbol(self, name: str) -> int | None:
        cb = self._callbacks.get(name)
        return None if cb is None else ctypes.cast(cb, ctypes.c_void_p).value

    # ---- callback bodies ------------------------------------------------------------------------------------------
    @staticmethod
    def _out_int(call):
        def fn(out):
            err, value = call()
            if int(err) == 0:
                out[0] = int(value)
            return int(err)
        return fn

    @staticmethod
    def _out_ptr(call):
        def fn(out, arg):
            err, value = call(int(arg))
            if int(err) == 0:
                out[0] = int(value)
            return int(err)
        return fn

    def _attribute(self, out, attr, device):
        err, prop = self.sim.cudaGetDeviceProperties(device)
        if int(err) != 0:
            return int(err)
        if attr not in (75, 76):
            return 1  # cudaErrorInvalidValue: the fake knows only the compute-capability attributes
        out[0] = prop.major if attr == 75 else prop.minor
        return 0

    def _properties(self, address, device):
        err, prop = self.sim.cudaGetDeviceProperties(device)
        if int(err) != 0:
            return int(err)
        ctypes.memset(address, 0, 1024)
        ctypes.memmove(address, prop.name[:255], min(len(prop.name), 255))
        ctypes.c_size_t.from_address(address + 288).value = prop.totalGlobalMem
        return 0

    @staticmethod
    def _old_properties(address, device):
        ctypes.memmove(address, b"wrong struct layout", 19)
        return 0

    def _end_capture(self, stream, out):
        err, graph = self.sim.cudaStreamEndCapture(_p(stream))
        if int(err) == 0:
            out[0] = int(graph)
        return int(err)

    def _instantiate(self, out, graph, flags):
        err, graph_exec = self.sim.cudaGraphInstantiate(_p(graph), int(flags))
        if int(err) == 0:
            out[0] = int(graph_exec)
        return int(err)

    def _name_of(self, code):
        try:
            name = self.sim.cudaError_t(code).name
        except ValueError:
            name = "cudaErrorUnknown"
        buf = self._names.setdefault(name, ctypes.create_string_buffer(name.encode()))
        return ctypes.addressof(buf)
