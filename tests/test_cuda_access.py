"""The three routes to CUDA (runtime/backends/cuda_access.py): cuda-python, pycuda and libcudart through ctypes.

The TensorRT backend runs over each against the SIMULATED CUDA runtime (tests/simulated_cuda.py) and SIMULATED
TensorRT: cuda-python's convention directly, pycuda through a FAKE pycuda.driver (tests/fake_pycuda.py), ctypes
through FAKE libcudart callbacks (tests/fake_libcudart.py). No GPU, driver, pycuda or TensorRT is used. The ctypes
binding also runs against the REAL libcudart that torch's wheels bring (no driver here: it must say so). The choice
between them (driver older than cuda-python, CLIPAD_CUDA_ACCESS) is tested with the driver version injected.
"""
from __future__ import annotations

import logging
import sys
import threading

import numpy as np
import pytest

import simulated_cuda
import simulated_tensorrt as simtrt
from clipad.runtime.backends import cuda_access, cuda_ctypes
from clipad.runtime.backends import cuda_buffers as cb
from clipad.runtime.backends.cuda_pycuda import PycudaRuntime
from clipad.runtime.backends.tensorrt import TensorRTBackend
from clipad.runtime.errors import ClipadError
from fake_libcudart import FakeLibcudart
from fake_pycuda import make_fake_pycuda
from test_tensorrt_plumbing import RTX_VERSION, images, reference, write_model

ACCESSES = ("cuda-python (simulated)", "pycuda (fake)", "ctypes (fake)")


def adapter(kind: str, sim):
    if kind.startswith("cuda-python"):
        return sim, None
    if kind.startswith("pycuda"):
        fake = make_fake_pycuda(sim)
        return PycudaRuntime(fake), fake
    return cuda_ctypes.CtypesCudart(FakeLibcudart(sim, v2=True).symbol, "fake libcudart"), None


@pytest.fixture(params=ACCESSES)
def access(request, monkeypatch):
    """(kind, simulated CUDA, fake pycuda or None): the backend's CUDA access set to that route."""
    sim = simulated_cuda.SimulatedCudaRuntime(gpus=[("NVIDIA RTX A2000", (8, 6)), ("NVIDIA GeForce RTX 4090", (8, 9))])
    runtime, fake = adapter(request.param, sim)
    monkeypatch.setattr(cb, "_rt", runtime)
    simtrt.reset(sim, RTX_VERSION)
    monkeypatch.setattr(simtrt, "__version__", RTX_VERSION)
    for name in ("tensorrt", "tensorrt_rtx"):
        monkeypatch.setitem(sys.modules, name, simtrt)
    yield request.param, sim, fake
    simtrt.CALLS.clear()


def test_backend_runs_and_frees_everything(access, tmp_path):
    kind, sim, fake = access
    assert cb.gpu_info(1) == {"count": 2, "device": 1, "name": "NVIDIA GeForce RTX 4090", "compute_capability": "8.9",
                              "total_memory": 4 << 30, "driver_version": "12.6", "runtime_version": "12.6"}
    model_dir, manifest = write_model(tmp_path / "m")
    backend = TensorRTBackend(model_dir, manifest, cuda_graph=True)
    for n in (1, 3, 3, 2):
        batch = images(n, seed=n)
        maps, scores = backend.run(batch)
        ref_maps, ref_scores = reference(model_dir, batch)
        np.testing.assert_allclose(maps, ref_maps, rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(scores, ref_scores, rtol=1e-6, atol=1e-6)
    assert sim.pageable_copies == 0 and set(sim.stream_flags.values()) == {sim.cudaStreamNonBlocking}
    if kind.startswith("pycuda"):  # pycuda has no graph API: plain enqueues, said once
        assert backend.graph_mode is None and "cudaGraphLaunch" not in sim.calls
        assert fake.state.made_contexts == 0 and set(fake.state.retained) == {0}
        assert "pycuda.autoinit" not in sys.modules
    else:
        assert backend.graph_mode == "stream capture" and sim.calls.count("cudaGraphLaunch") == 1
    backend.close()
    assert sim.live() == {"device": 0, "pinned": 0, "streams": 0, "graphs": 0, "graph_execs": 0}


def test_device_one_gets_everything(access, tmp_path):
    kind, sim, _ = access
    from clipad.runtime.manifest import EngineTarget

    model_dir, manifest = write_model(tmp_path / "m", file="model.fp16.rtx-sm89.engine",
                                      target=EngineTarget("8.9", "NVIDIA GeForce RTX 4090", aot=True))
    cb.set_device(0)
    first = cb.DeviceBuffer(16)  # on device 0; then the backend switches this thread to device 1
    backend = TensorRTBackend(model_dir, manifest, device=1)
    batch = images(2)
    np.testing.assert_allclose(backend.run(batch)[1], reference(model_dir, batch)[1], rtol=1e-6)
    assert sim.allocated_on.pop(first.ptr) == 0 and set(sim.allocated_on.values()) == {1}
    backend.close()
    first.close()


def test_cuda_failure_is_one_line_naming_the_call(access, tmp_path):
    kind, sim, _ = access
    model_dir, manifest = write_model(tmp_path / "m")
    backend = TensorRTBackend(model_dir, manifest)
    sim.fail["cudaStreamSynchronize"] = simulated_cuda.cudaError_t.cudaErrorIllegalAddress
    detail = "an illegal memory access" if kind.startswith("pycuda") else "cudaErrorIllegalAddress"
    with pytest.raises(ClipadError, match=f"CUDA cudaStreamSynchronize failed: .*{detail}"):
        backend.run(images(1))
    del sim.fail["cudaStreamSynchronize"]
    backend.close()
    sim.fail["cudaMalloc"] = simulated_cuda.cudaError_t.cudaErrorMemoryAllocation
    detail = "out of memory" if kind.startswith("pycuda") else "cudaErrorMemoryAllocation"
    with pytest.raises(ClipadError, match=f"CUDA cudaMalloc failed: .*{detail}"):
        TensorRTBackend(model_dir, manifest)
    assert sim.live() == {"device": 0, "pinned": 0, "streams": 0, "graphs": 0, "graph_execs": 0}


def test_pycuda_primary_context_on_every_thread(monkeypatch, tmp_path):
    """The backend is built on one thread and run on another (as a station's camera worker does): the adapter makes
    the primary context current there too, where the fake (like pycuda) refuses calls without a context."""
    sim = simulated_cuda.SimulatedCudaRuntime()
    fake = make_fake_pycuda(sim)
    runtime = PycudaRuntime(fake)
    monkeypatch.setattr(cb, "_rt", runtime)
    simtrt.reset(sim, RTX_VERSION)
    monkeypatch.setattr(simtrt, "__version__", RTX_VERSION)
    monkeypatch.setitem(sys.modules, "tensorrt_rtx", simtrt)
    model_dir, manifest = write_model(tmp_path / "m")
    backend = TensorRTBackend(model_dir, manifest)
    results = []
    worker = threading.Thread(target=lambda: results.append(backend.run(images(2))[1]))
    worker.start()
    worker.join()
    np.testing.assert_allclose(results[0], reference(model_dir, images(2))[1], rtol=1e-6)
    backend.close()
    errors = []  # the fake does refuse a thread without a current context
    bare = threading.Thread(target=lambda: errors.append(_raises(fake.mem_alloc, 16)))
    bare.start()
    bare.join()
    assert isinstance(errors[0], fake.LogicError) and "no currently active context" in str(errors[0])
    simtrt.CALLS.clear()


def _raises(fn, *args):
    try:
        fn(*args)
    except Exception as exc:
        return exc
    return AssertionError("no error")


def test_ctypes_binding_against_the_real_libcudart(monkeypatch):
    """The real CUDA runtime library (from the nvidia-cuda-runtime wheel torch brings; no driver here): every
    prototype binds, versions are read, and the missing driver is a named CUDA error, not a crash."""
    path, _ = cuda_ctypes.find_libcudart(None)
    if path is None:
        pytest.skip("no libcudart on this machine (it comes with torch's CUDA wheels in the export extra)")
    runtime = cuda_ctypes.CtypesCudart.open(path)
    for name in cuda_ctypes.PROTOTYPES:
        runtime._fn(name)  # every symbol exists with our prototype
    err, version = runtime.cudaRuntimeGetVersion()
    assert int(err) == 0 and version >= 11000
    err, count = runtime.cudaGetDeviceCount()
    if int(err) == 0 and count:
        pytest.skip("this machine has a CUDA GPU: the no-driver path cannot be checked")
    assert err.name in ("cudaErrorInsufficientDriver", "cudaErrorNoDevice") and count is None
    monkeypatch.setattr(cb, "_rt", runtime)
    assert cb.gpu_info() is None and cb.device_count() == 0
    with pytest.raises(ClipadError, match="CUDA cudaMalloc failed: cudaError(InsufficientDriver|NoDevice)"):
        cb.DeviceBuffer(16)


def test_ctypes_picks_the_cuda12_properties_symbol(monkeypatch):
    sim = simulated_cuda.SimulatedCudaRuntime(name="NVIDIA Jetson AGX Orin", compute_capability=(8, 7))
    for v2 in (True, False):
        runtime = cuda_ctypes.CtypesCudart(FakeLibcudart(sim, v2=v2).symbol, "fake")
        monkeypatch.setattr(cb, "_rt", runtime)
        assert cb.gpu_info()["name"] == "NVIDIA Jetson AGX Orin"


def test_ctypes_refuses_a_library_that_is_not_cudart():
    with pytest.raises(AttributeError, match="not a CUDA runtime library"):
        cuda_ctypes.CtypesCudart(lambda name: None, "libfoo.so")


# ---- choosing ----------------------------------------------------------------------------------------------------

@pytest.fixture
def no_pycuda(monkeypatch):
    monkeypatch.setitem(sys.modules, "pycuda", None)  # import pycuda.driver → ImportError
    monkeypatch.setitem(sys.modules, "pycuda.driver", None)
    monkeypatch.delenv(cuda_access.ENV, raising=False)


def test_cuda_python_too_new_for_the_driver_is_skipped_with_a_warning(monkeypatch, caplog, no_pycuda, tmp_path):
    """JetPack 6: driver for CUDA 12.6, cuda-python 13 installed. cuda-python is skipped with the exact fix, so is a
    libcudart.so.13; with nothing else the error lists every route and why."""
    monkeypatch.setattr(cuda_access, "driver_version", lambda: 12060)
    monkeypatch.setattr(cuda_access, "cuda_python_version", lambda: "13.5.0")
    so13 = tmp_path / "libcudart.so.13"
    so13.write_bytes(b"")
    monkeypatch.setattr(cuda_ctypes, "candidates", lambda: [str(so13)])
    with caplog.at_level(logging.WARNING, logger="clipad"), pytest.raises(ClipadError) as err:
        cuda_access.choose()
    text = str(err.value)
    assert "cuda-python 13.5.0 is built for CUDA 13, but this driver supports CUDA 12.6" in text
    assert "pip install 'cuda-python>=12,<13' (clipad-edge[tensorrt-cu12])" in text
    assert "pycuda: not installed" in text and "libcudart.so.13 is CUDA 13, newer than the driver" in text
    assert "skipping cuda-python" in caplog.text


def test_skipped_cuda_python_falls_through_to_pycuda(monkeypatch, caplog):
    sim = simulated_cuda.SimulatedCudaRuntime(driver=12060)
    fake = make_fake_pycuda(sim)
    package = type(sys)("pycuda")
    package.driver, package.VERSION_TEXT = fake, "2025.1"
    monkeypatch.setitem(sys.modules, "pycuda", package)
    monkeypatch.setitem(sys.modules, "pycuda.driver", fake)
    monkeypatch.delenv(cuda_access.ENV, raising=False)
    monkeypatch.setattr(cuda_access, "driver_version", lambda: 12060)
    monkeypatch.setattr(cuda_access, "cuda_python_version", lambda: "13.0.1")
    with caplog.at_level(logging.DEBUG, logger="clipad"):
        access, report = cuda_access.choose()
    assert access.name == "pycuda" and isinstance(access.runtime, PycudaRuntime)
    assert report.as_dict()["driver_cuda_version"] == "12.6" and report.warnings
    assert "CUDA access: pycuda 2025.1 (primary context)" in caplog.text
    sim.fail["cuInit"] = simulated_cuda.cudaError_t.cudaErrorInsufficientDriver  # pycuda present, no usable driver
    monkeypatch.setattr(cuda_ctypes, "candidates", lambda: [])
    with pytest.raises(ClipadError, match="pycuda: cuInit failed: cuInit failed: no CUDA-capable device"):
        cuda_access.choose()


def test_matching_cuda_python_is_chosen_first(monkeypatch, no_pycuda):
    monkeypatch.setattr(cuda_access, "driver_version", lambda: 13000)
    try:
        access, report = cuda_access.choose()
    except ClipadError:
        pytest.skip("cuda-python is not installed here")
    assert access.name == "cuda-python" and report.tried == [] and report.warnings == []
    monkeypatch.setattr(cuda_access, "cuda_python_version", lambda: "12.6.2")
    monkeypatch.setattr(cuda_access, "driver_version", lambda: 12080)  # an older cuda-python on a newer driver: fine
    assert cuda_access.choose()[0].name == "cuda-python"


def test_forced_access_and_a_wrong_name(monkeypatch, no_pycuda):
    monkeypatch.setenv(cuda_access.ENV, "pycuda")
    with pytest.raises(ClipadError, match="pycuda: not installed"):
        cuda_access.choose()
    monkeypatch.setenv(cuda_access.ENV, "cupy")
    with pytest.raises(ClipadError, match="CLIPAD_CUDA_ACCESS='cupy': choose one of cuda-python, pycuda, ctypes"):
        cuda_access.choose()


def test_survey_lists_every_route(monkeypatch, no_pycuda):
    monkeypatch.setattr(cuda_access, "driver_version", lambda: 12060)
    monkeypatch.setattr(cuda_access, "cuda_python_version", lambda: "13.5.0")
    report = cuda_access.survey().as_dict()
    assert [u["name"] for u in report["unusable"]][:2] == ["cuda-python", "pycuda"]
    assert report["warnings"] and report["warnings"][0].startswith("skipping cuda-python")
    assert report["chosen"] in (None, "ctypes")


def test_libcudart_candidates_and_majors(monkeypatch, tmp_path):
    lib = tmp_path / "cuda" / "lib64"
    lib.mkdir(parents=True)
    for name in ("libcudart.so.12.6.77", "libcudart.so.13"):
        (lib / name).write_bytes(b"")
    monkeypatch.setenv("CUDA_HOME", str(tmp_path / "cuda"))
    monkeypatch.delenv("CLIPAD_LIBCUDART", raising=False)
    found = cuda_ctypes.candidates()
    assert str(lib / "libcudart.so.13") in found and str(lib / "libcudart.so.12.6.77") in found
    assert cuda_ctypes._major("/x/libcudart.so.12.6.77") == 12 and cuda_ctypes._major("libcudart.so") is None
    path, skipped = cuda_ctypes.find_libcudart(12060)  # empty files do not load; 13 is skipped by version
    assert any("libcudart.so.13 is CUDA 13" in s for s in skipped)
    assert path is None or "libcudart.so.13" not in path
