"""The CUDA runtime library (``libcudart``) through ``ctypes``, in the cudart-like convention of ``cuda_access``.

No Python package is needed: wherever TensorRT runs, libcudart is there (JetPack, the CUDA toolkit, or the
nvidia-cuda-runtime wheel that TensorRT's wheels pull). Only the calls ``cuda_buffers`` makes are bound, with the
C prototypes of the CUDA 11.4 … 13 headers (``cudaGraphInstantiateWithFlags`` because ``cudaGraphInstantiate``
changed its signature in CUDA 12). Symbols are looked up by address (``symbol(name)``) so tests can hand in
callbacks of the same prototypes (tests/fake_libcudart.py).
"""
from __future__ import annotations

import ctypes
import glob
import os
import re
import sys
from types import SimpleNamespace

P, INT, UINT, SIZE = ctypes.c_void_p, ctypes.c_int, ctypes.c_uint, ctypes.c_size_t
PP, PINT = ctypes.POINTER(ctypes.c_void_p), ctypes.POINTER(ctypes.c_int)
# name: argument types (every call returns cudaError_t, an int)
PROTOTYPES = {
    "cudaGetDeviceCount": (PINT,),
    "cudaGetDeviceProperties": (P, INT),
    "cudaDeviceGetAttribute": (PINT, INT, INT),
    "cudaSetDevice": (INT,),
    "cudaDriverGetVersion": (PINT,),
    "cudaRuntimeGetVersion": (PINT,),
    "cudaMalloc": (PP, SIZE),
    "cudaFree": (P,),
    "cudaMallocHost": (PP, SIZE),
    "cudaFreeHost": (P,),
    "cudaStreamCreateWithFlags": (PP, UINT),
    "cudaStreamSynchronize": (P,),
    "cudaStreamDestroy": (P,),
    "cudaMemcpyAsync": (P, P, SIZE, INT, P),
    "cudaStreamBeginCapture": (P, INT),
    "cudaStreamEndCapture": (P, PP),
    "cudaGraphInstantiateWithFlags": (PP, P, ctypes.c_ulonglong),
    "cudaGraphLaunch": (P, P),
    "cudaGraphExecDestroy": (P,),
    "cudaGraphDestroy": (P,),
}
PROPERTIES_SYMBOLS = ("cudaGetDeviceProperties_v2", "cudaGetDeviceProperties")  # CUDA 12 renamed it, 13 reverted
PROPERTIES_BYTES = 4096   # cudaDeviceProp is about 1 KB; name (char[256]) is first in every version
TOTAL_MEMORY_OFFSET = 288  # name[256], uuid[16], luid[8], luidDeviceNodeMask (uint), then size_t totalGlobalMem
ATTR_CC_MAJOR, ATTR_CC_MINOR = 75, 76
LIB_NAMES = ("libcudart.so.13", "libcudart.so.12", "libcudart.so.11.0", "libcudart.so")


class CudaStatus(int):
    """A cudaError_t value with its name (cudaGetErrorName), as cuda-python's enum has."""

    def __new__(cls, value: int, name: str):
        obj = super().__new__(cls, value)
        obj.name = name
        return obj


class CtypesCudart:
    cudaMemcpyKind = SimpleNamespace(cudaMemcpyHostToHost=0, cudaMemcpyHostToDevice=1, cudaMemcpyDeviceToHost=2,
                                     cudaMemcpyDeviceToDevice=3)
    cudaStreamCaptureMode = SimpleNamespace(cudaStreamCaptureModeGlobal=0, cudaStreamCaptureModeThreadLocal=1,
                                            cudaStreamCaptureModeRelaxed=2)
    cudaStreamNonBlocking = 1

    def __init__(self, symbol, origin: str):
        """``symbol(name)``: the address of a C function in the library, or None when it lacks one."""
        self.origin, self._symbol, self._fns = origin, symbol, {}
        for name in ("cudaGetDeviceCount", "cudaMalloc", "cudaGetErrorName"):  # fail early on a foreign library
            if symbol(name) is None:
                raise AttributeError(f"{origin} has no {name}: not a CUDA runtime library")

    @classmethod
    def open(cls, path: str) -> CtypesCudart:
        lib = ctypes.CDLL(path)

        def symbol(name):
            try:
                return ctypes.cast(getattr(lib, name), ctypes.c_void_p).value
            except AttributeError:
                return None

        runtime = cls(symbol, path)
        runtime.library = lib  # keep it loaded
        return runtime

    def _fn(self, name: str, restype=INT, argtypes=None):
        fn = self._fns.get(name)
        if fn is None:
            address = self._symbol(name)
            if address is None:
                raise AttributeError(f"{self.origin} has no {name}")
            fn = ctypes.CFUNCTYPE(restype, *(PROTOTYPES[name] if argtypes is None else argtypes))(address)
            self._fns[name] = fn
        return fn

    def _status(self, code: int) -> CudaStatus:
        if code == 0:
            return CudaStatus(0, "cudaSuccess")
        try:
            name = self._fn("cudaGetErrorName", ctypes.c_char_p, (INT,))(code)
        except Exception:
            name = None
        return CudaStatus(code, name.decode(errors="replace") if name else f"cudaError {code}")

    def _out(self, name: str, ctype, *args):
        out = ctype()
        err = self._fn(name)(ctypes.byref(out), *args)
        return self._status(err), (out.value if err == 0 else None)

    def _plain(self, name: str, *args):
        return (self._status(self._fn(name)(*args)),)

    # ---- the calls cuda_buffers makes, cuda.bindings.runtime style --------------------------------------------------
    def cudaGetDeviceCount(self):
        return self._out("cudaGetDeviceCount", ctypes.c_int)

    def cudaDriverGetVersion(self):
        return self._out("cudaDriverGetVersion", ctypes.c_int)

    def cudaRuntimeGetVersion(self):
        return self._out("cudaRuntimeGetVersion", ctypes.c_int)

    def cudaGetDeviceProperties(self, device):
        raw = (ctypes.c_ubyte * PROPERTIES_BYTES)()
        name = next((n for n in PROPERTIES_SYMBOLS if self._symbol(n) is not None), PROPERTIES_SYMBOLS[-1])
        err = self._fn(name, INT, PROTOTYPES["cudaGetDeviceProperties"])(ctypes.addressof(raw), int(device))
        if err != 0:
            return self._status(err), None
        major, minor = ctypes.c_int(), ctypes.c_int()
        for attr, out in ((ATTR_CC_MAJOR, major), (ATTR_CC_MINOR, minor)):
            err = self._fn("cudaDeviceGetAttribute")(ctypes.byref(out), attr, int(device))
            if err != 0:
                return self._status(err), None
        total = ctypes.c_size_t.from_buffer(raw, TOTAL_MEMORY_OFFSET).value
        return self._status(0), SimpleNamespace(name=bytes(raw[:256]), major=major.value, minor=minor.value,
                                                totalGlobalMem=total)

    def cudaSetDevice(self, device):
        return self._plain("cudaSetDevice", int(device))

    def cudaMalloc(self, nbytes):
        return self._out("cudaMalloc", ctypes.c_void_p, int(nbytes))

    def cudaFree(self, ptr):
        return self._plain("cudaFree", int(ptr))

    def cudaMallocHost(self, nbytes):
        return self._out("cudaMallocHost", ctypes.c_void_p, int(nbytes))

    def cudaFreeHost(self, ptr):
        return self._plain("cudaFreeHost", int(ptr))

    def cudaStreamCreateWithFlags(self, flags):
        return self._out("cudaStreamCreateWithFlags", ctypes.c_void_p, int(flags))

    def cudaStreamSynchronize(self, stream):
        return self._plain("cudaStreamSynchronize", int(stream))

    def cudaStreamDestroy(self, stream):
        return self._plain("cudaStreamDestroy", int(stream))

    def cudaMemcpyAsync(self, dst, src, count, kind, stream):
        return self._plain("cudaMemcpyAsync", int(dst), int(src), int(count), int(kind), int(stream))

    def cudaStreamBeginCapture(self, stream, mode):
        return self._plain("cudaStreamBeginCapture", int(stream), int(mode))

    def cudaStreamEndCapture(self, stream):
        out = ctypes.c_void_p()
        err = self._fn("cudaStreamEndCapture")(int(stream), ctypes.byref(out))
        return self._status(err), (out.value if err == 0 else None)

    def cudaGraphInstantiate(self, graph, flags):
        return self._out("cudaGraphInstantiateWithFlags", ctypes.c_void_p, int(graph), int(flags))

    def cudaGraphLaunch(self, graph_exec, stream):
        return self._plain("cudaGraphLaunch", int(graph_exec), int(stream))

    def cudaGraphExecDestroy(self, graph_exec):
        return self._plain("cudaGraphExecDestroy", int(graph_exec))

    def cudaGraphDestroy(self, graph):
        return self._plain("cudaGraphDestroy", int(graph))


def _major(path: str) -> int | None:
    match = re.search(r"libcudart[^/]*\.so\.(\d+)", os.path.basename(path))
    return int(match.group(1)) if match else None


def candidates() -> list[str]:
    """libcudart files and loader names, most specific first (CLIPAD_LIBCUDART, CUDA_HOME, wheels, the toolkit)."""
    found = [os.environ["CLIPAD_LIBCUDART"]] if os.environ.get("CLIPAD_LIBCUDART") else []
    roots = [os.environ.get(v) for v in ("CUDA_HOME", "CUDA_PATH")] + ["/usr/local/cuda"]
    for root in filter(None, roots):
        for sub in ("lib64", "lib", "targets/*/lib"):
            found += sorted(glob.glob(os.path.join(root, sub, "libcudart.so.*")), reverse=True)
    for entry in sys.path:  # pip wheels: nvidia-cuda-runtime-cu12 (nvidia/cuda_runtime/lib), 13 (nvidia/cu13/lib)
        if entry and os.path.isdir(os.path.join(entry, "nvidia")):
            found += sorted(glob.glob(os.path.join(entry, "nvidia", "*", "lib", "libcudart.so.*")), reverse=True)
    return found + list(LIB_NAMES)


def find_libcudart(driver: int | None) -> tuple[str | None, list[str]]:
    """The first loadable libcudart whose CUDA major this driver supports; and why others were skipped."""
    skipped, seen = [], set()
    for cand in candidates():
        if cand in seen:
            continue
        seen.add(cand)
        major = _major(cand)
        if driver and major and major > driver // 1000:
            skipped.append(f"{cand} is CUDA {major}, newer than the driver")
            continue
        try:
            ctypes.CDLL(cand)
        except OSError:
            continue
        return cand, skipped
    return None, skipped
