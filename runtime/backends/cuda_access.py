"""Which Python route to the CUDA runtime the TensorRT backend uses: the one interface is a "cudart-like" object (the
``cuda.bindings.runtime`` convention: ``cudaMalloc(n) -> (error, ptr)``), with three implementations tried in order:

1. ``cuda-python`` (``cuda.bindings.runtime``, or the 12.x ``cuda.cudart``) — skipped with a warning when it was
   built for a newer CUDA major than the driver supports (cuda-python 13 needs driver 580+; JetPack 6 has CUDA 12.6);
2. ``pycuda`` when installed (never a dependency; see ``cuda_pycuda``) — JetPack users often have it;
3. ``ctypes`` over ``libcudart`` itself (``cuda_ctypes``), as Polygraphy does: nothing to install wherever TensorRT
   runs, since TensorRT needs the CUDA runtime library anyway.

``CLIPAD_CUDA_ACCESS=cuda-python|pycuda|ctypes`` forces one. The driver's CUDA version is read from ``libcuda``
through the driver API (``cuDriverGetVersion``), so no Python package is needed to learn it.
"""
from __future__ import annotations

import ctypes
import importlib
import importlib.metadata
import logging
import os
from dataclasses import dataclass, field

from ..errors import ClipadError

log = logging.getLogger("clipad")
ORDER = ("cuda-python", "pycuda", "ctypes")
ENV = "CLIPAD_CUDA_ACCESS"
LIBCUDA_NAMES = ("libcuda.so.1", "libcuda.so", "nvcuda.dll")


class Unavailable(Exception):
    """This implementation cannot be used here (the message says why)."""


class TooNewForDriver(Unavailable):
    """Installed, but built for a newer CUDA major than the driver supports: skipped with a warning."""


@dataclass
class Access:
    name: str                  # "cuda-python", "pycuda" or "ctypes"
    runtime: object            # the cudart-like object
    detail: str                # e.g. "cuda-python 12.6.2 (cuda.bindings.runtime)"


@dataclass
class Report:
    """What was tried, for logs and edge-doctor."""
    driver: int | None = None                            # e.g. 12060, None without a driver
    chosen: str | None = None
    detail: str | None = None
    tried: list[tuple[str, str]] = field(default_factory=list)  # (name, why not)
    usable: list[str] = field(default_factory=list)             # survey() only
    warnings: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        return {"driver_cuda_version": version_text(self.driver), "chosen": self.chosen, "detail": self.detail,
                "usable": list(self.usable),
                "unusable": [{"name": n, "why": w} for n, w in self.tried], "warnings": list(self.warnings)}


def version_text(v: int | None) -> str | None:
    return None if not v else f"{v // 1000}.{v % 1000 // 10}"


def driver_version() -> int | None:
    """The newest CUDA version the installed driver supports (e.g. 12060), None without a driver."""
    for name in LIBCUDA_NAMES:
        try:
            lib = ctypes.CDLL(name)
        except OSError:
            continue
        out = ctypes.c_int(0)
        try:
            if lib.cuDriverGetVersion(ctypes.byref(out)) == 0 and out.value > 0:
                return int(out.value)
        except AttributeError:
            continue
    return None


def cuda_python_version() -> str | None:
    for dist in ("cuda-bindings", "cuda-python"):
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def _major(version: str | None) -> int | None:
    try:
        return int(str(version).split(".")[0])
    except ValueError:
        return None


def load_cuda_python(driver: int | None) -> Access:
    version = cuda_python_version()
    major = _major(version)
    if driver and major and major > driver // 1000:
        raise TooNewForDriver(f"cuda-python {version} is built for CUDA {major}, but this driver supports CUDA "
                          f"{version_text(driver)} (cudaErrorInsufficientDriver): pip install "
                          f"'cuda-python>={driver // 1000},<{driver // 1000 + 1}' "
                          f"(clipad-edge[tensorrt-cu{driver // 1000}]), or update the driver")
    for module in ("cuda.bindings.runtime", "cuda.cudart"):
        try:
            return Access("cuda-python", importlib.import_module(module), f"cuda-python {version or '?'} ({module})")
        except ImportError:
            continue
    raise Unavailable("not installed")


def load_pycuda(driver: int | None) -> Access:
    try:
        drv = importlib.import_module("pycuda.driver")
    except ImportError:
        raise Unavailable("not installed") from None
    except Exception as exc:  # pycuda built against another CUDA: its import raises ImportError or OSError
        raise Unavailable(f"import fails: {str(exc).splitlines()[0][:160]}") from None
    from .cuda_pycuda import PycudaRuntime

    try:
        runtime = PycudaRuntime(drv)
    except Exception as exc:
        raise Unavailable(f"cuInit failed: {str(exc).splitlines()[0][:160]}") from None
    return Access("pycuda", runtime, f"pycuda {getattr(importlib.import_module('pycuda'), 'VERSION_TEXT', '?')} "
                                     "(primary context)")


def load_ctypes(driver: int | None) -> Access:
    from .cuda_ctypes import CtypesCudart, find_libcudart

    path, skipped = find_libcudart(driver)
    if path is None:
        raise Unavailable("no libcudart found" + (f" ({'; '.join(skipped)})" if skipped else "")
                          + ": it comes with TensorRT (nvidia-cuda-runtime), the CUDA toolkit or JetPack")
    try:
        runtime = CtypesCudart.open(path)
    except (OSError, AttributeError) as exc:
        raise Unavailable(f"{path}: {str(exc).splitlines()[0][:160]}") from None
    return Access("ctypes", runtime, f"ctypes over {path}")


LOADERS = {"cuda-python": load_cuda_python, "pycuda": load_pycuda, "ctypes": load_ctypes}


def _try(name: str, report: Report) -> Access | None:
    """One route: its Access, or None with why not recorded in ``report`` (a too-new build also as a warning)."""
    try:
        return LOADERS[name](report.driver)
    except Unavailable as exc:
        report.tried.append((name, str(exc)))
        if isinstance(exc, TooNewForDriver):
            report.warnings.append(f"skipping {name}: {exc}")
        return None


def choose(order: tuple[str, ...] | None = None) -> tuple[Access, Report]:
    """The first implementation that works here, and what was tried. ClipadError when none does."""
    forced = os.environ.get(ENV, "").strip()
    if forced and forced not in LOADERS:
        raise ClipadError(f"{ENV}={forced!r}: choose one of {', '.join(ORDER)}")
    report = Report(driver=driver_version())
    for name in (forced,) if forced else (order or ORDER):
        warned = len(report.warnings)
        access = _try(name, report)
        for warning in report.warnings[warned:]:
            log.warning("CUDA access: %s", warning)
        if access is not None:
            report.chosen, report.detail = access.name, access.detail
            log.debug("CUDA access: %s (driver supports CUDA %s)", access.detail, version_text(report.driver) or "?")
            return access, report
    raise ClipadError(no_access_message(report))


def no_access_message(report: Report) -> str:
    tried = "; ".join(f"{n}: {w}" for n, w in report.tried)
    return (f"no way to reach CUDA from Python ({tried}); install cuda-python for this CUDA major "
            "(pip install 'clipad-edge[tensorrt-cu12]' for CUDA 12 / JetPack 6, '[tensorrt-cu13]' for CUDA 13)")


def survey() -> Report:
    """Try every implementation (for edge-doctor): ``chosen`` is the one the backend would use."""
    report = Report(driver=driver_version())
    forced = os.environ.get(ENV, "").strip()
    for name in ORDER:
        access = _try(name, report)
        if access is None:
            continue
        report.usable.append(name)
        if report.chosen is None and (not forced or forced == name):
            report.chosen, report.detail = access.name, access.detail
        close = getattr(access.runtime, "close", None)
        if callable(close) and report.chosen != name:
            close()
    return report
