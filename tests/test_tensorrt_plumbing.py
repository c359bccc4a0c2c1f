"""PLUMBING tests of the TensorRT backend against SIMULATED tensorrt + CUDA modules (tests/simulated_*.py). ONNX
Runtime runs underneath, so "outputs match" here compares ONNX Runtime with ONNX Runtime: these tests check the
backend's bookkeeping (engine choice, checks, name-based I/O, buffers, devices, streams, CUDA graphs, cleanup), not
TensorRT's numbers. A real engine is compared with the FP32 ONNX in test_tensorrt_engine.py (needs TensorRT + GPU).
Nothing here needs a GPU."""
from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
import sys

import numpy as np
import pytest

import simulated_cuda
import simulated_tensorrt as simtrt
from clipad.runtime.backends import cuda_buffers as cb
from clipad.runtime.backends.tensorrt import TensorRTBackend, select_engine, tensorrt_available
from clipad.runtime.detector import Detector
from clipad.runtime.errors import ClipadError
from clipad.runtime.manifest import (
    SCHEMA_VERSION,
    BatchRange,
    EngineEntry,
    EngineTarget,
    FileEntry,
    InputSpec,
    Manifest,
    ModelInfo,
    TensorSpec,
)

S, K = 8, 2
ENGINE = "model.fp16.rtx-sm86.engine"
RTX_VERSION = "1.7.1.116"
IO_NAMES = {"images", "anomaly_map", "image_score"}


def make_onnx(score_dtype: int | None = None) -> bytes:
    """uint8 [B,S,S,3] → Cast, /255, NHWC→NCHW, 1x1 Conv → anomaly_map [B,K,S,S]; ReduceMax → image_score."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    score_dtype = TensorProto.FLOAT if score_dtype is None else score_dtype
    w = np.array([[0.2, -0.5, 0.9], [1.0, 0.3, -0.7]], np.float32).reshape(K, 3, 1, 1)
    nodes = [helper.make_node("Cast", ["images"], ["xf"], to=TensorProto.FLOAT),
             helper.make_node("Mul", ["xf", "scale"], ["xs"]),
             helper.make_node("Transpose", ["xs"], ["xt"], perm=[0, 3, 1, 2]),
             helper.make_node("Conv", ["xt", "w", "bias"], ["anomaly_map"]),
             helper.make_node("ReduceMax", ["anomaly_map"], ["score_f"], axes=[2, 3], keepdims=0),
             helper.make_node("Cast", ["score_f"], ["image_score"], to=score_dtype)]
    graph = helper.make_graph(
        nodes, "tiny_clipad",
        [helper.make_tensor_value_info("images", TensorProto.UINT8, ["batch", S, S, 3])],
        [helper.make_tensor_value_info("anomaly_map", TensorProto.FLOAT, ["batch", K, S, S]),
         helper.make_tensor_value_info("image_score", score_dtype, ["batch", K])],
        [numpy_helper.from_array(np.array(1 / 255, np.float32), "scale"), numpy_helper.from_array(w, "w"),
         numpy_helper.from_array(np.array([0.1, -0.2], np.float32), "bias")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model.SerializeToString()


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def engine_entry(data: bytes, onnx_bytes: bytes, **overrides) -> EngineEntry:
    fields = dict(file=ENGINE, precision="fp16", flavor="rtx", trt_version=RTX_VERSION,
                  target=EngineTarget("8.6", "NVIDIA RTX A2000", aot=True), onnx="model.onnx",
                  onnx_sha256=sha(onnx_bytes), sha256=sha(data), bytes=len(data), batch=BatchRange(1, 4, 1),
                  build_command="export-engine --from-onnx DIR --precision fp16 --flavor rtx")
    fields.update(overrides)
    return EngineEntry(**fields)


def write_model(root, onnx_bytes: bytes | None = None, engine_data: bytes | None = None, **overrides):
    """A model directory like export-engine writes (manifest.json + model.onnx) plus one simulated engine."""
    onnx_bytes = onnx_bytes or make_onnx()
    engine_data = simtrt.engine_bytes(onnx_bytes) if engine_data is None else engine_data
    os.makedirs(root, exist_ok=True)
    (root / "model.onnx").write_bytes(onnx_bytes)
    entry = engine_entry(engine_data, onnx_bytes, **overrides)
    (root / entry.file).write_bytes(engine_data)
    manifest = Manifest(
        schema_version=SCHEMA_VERSION,
        model=ModelInfo(kind="clip", arch="tiny", image_size=S, class_names=["tile", "screw"], decision_score="map_max"),
        input=InputSpec("images", "uint8", ["batch", S, S, 3]),
        outputs=[TensorSpec("anomaly_map", "float32", ["batch", K, S, S]),
                 TensorSpec("image_score", "float32", ["batch", K])],
        batch=BatchRange(1, 4, 1),
        files={"model.onnx": FileEntry(sha(onnx_bytes), len(onnx_bytes), "fp32", opset=17)},
        engines=[entry])
    manifest.write(str(root))
    return str(root), Manifest.read(str(root))


def reference(model_dir: str, batch: np.ndarray):
    import onnxruntime as ort

    session = ort.InferenceSession(os.path.join(model_dir, "model.onnx"), providers=["CPUExecutionProvider"])
    return session.run(["anomaly_map", "image_score"], {"images": batch})


def images(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(n, S, S, 3), dtype=np.uint8)


@pytest.fixture
def sim(monkeypatch):
    """Simulated CUDA (an RTX A2000, sm 8.6) in the shim, and the simulated TensorRT as tensorrt / tensorrt_rtx
    (without TensorRT-RTX's built-in CUDA graphs; ``rtx_sim`` has them)."""
    cuda = simulated_cuda.SimulatedCudaRuntime()
    monkeypatch.setattr(cb, "_rt", cuda)
    simtrt.reset(cuda, RTX_VERSION)
    monkeypatch.setattr(simtrt, "__version__", RTX_VERSION)  # restored after the test
    for name in ("tensorrt", "tensorrt_rtx", "tensorrt_lean", "tensorrt_dispatch"):
        monkeypatch.setitem(sys.modules, name, simtrt)
    yield cuda
    simtrt.CALLS.clear()


@pytest.fixture
def model(tmp_path):
    return write_model(tmp_path / "model")


def calls(method: str) -> list:
    return [c for c in simtrt.CALLS if c[1] == method]


def test_outputs_match_onnxruntime_and_bookkeeping(sim, model):
    model_dir, manifest = model
    backend = TensorRTBackend(model_dir, manifest)
    assert backend.batch_range == (1, 4)
    assert backend.description == "tensorrt-rtx 1.7.1.116 fp16 on NVIDIA RTX A2000 (sm 8.6, device 0)"
    # One device buffer and one pinned host array per tensor, sized for the profile's max batch, allocated once.
    expected = {"images": 4 * S * S * 3, "anomaly_map": 4 * K * S * S * 4, "image_score": 4 * K * 4}
    assert {n: b.nbytes for n, b in backend.device_buffers.items()} == expected
    assert {n: h.nbytes for n, h in backend.host.items()} == expected
    assert backend.dtypes == {"images": np.uint8, "anomaly_map": np.float32, "image_score": np.float32}
    for n in (1, 3, 1):
        batch = images(n, seed=n)
        maps, scores = backend.run(batch)
        ref_maps, ref_scores = reference(model_dir, batch)
        assert maps.shape == (n, K, S, S) and maps.dtype == np.float32
        assert scores.shape == (n, K) and scores.dtype == np.float32
        np.testing.assert_allclose(maps, ref_maps, rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(scores, ref_scores, rtol=1e-6, atol=1e-6)
    assert sim.calls.count("cudaMalloc") == 3 and sim.calls.count("cudaMallocHost") == 3
    assert sim.pageable_copies == 0  # every copy went through pinned memory
    assert sim.executed.count("trt.execute") == 3
    backend.close()


def test_name_based_io_only_and_every_address_set_before_execute(sim, model):
    backend = TensorRTBackend(*model)
    for n in (2, 4, 1):
        backend.run(images(n))
    assert simtrt.forbidden_calls() == []
    for method in ("num_io_tensors", "get_tensor_name", "get_tensor_mode", "get_tensor_dtype",
                   "get_tensor_profile_shape", "create_execution_context"):
        assert calls(method), method
    assert len(calls("__init__")) == 1 and len(calls("deserialize_cuda_engine")) == 1
    addressed, shape_set, executions = set(), False, 0
    for _, method, detail in simtrt.CALLS:
        if method == "set_tensor_address":
            addressed.add(detail[0])
            assert detail[1] == backend.device_buffers[detail[0]].ptr
        elif method == "set_input_shape":
            shape_set = True
        elif method == "execute_async_v3":
            assert addressed == IO_NAMES, "execute_async_v3 before every tensor address was set"
            assert shape_set, "no set_input_shape before this run"
            assert detail == backend.stream.handle
            shape_set, executions = False, executions + 1
    assert executions == 3
    assert [c[2][1][0] for c in calls("set_input_shape")] == [4, 2, 4, 1]  # max at load, then once per run
    backend.close()


def test_batch_outside_profile_and_bad_input(sim, model):
    backend = TensorRTBackend(*model)
    with pytest.raises(ClipadError, match=r"batch of 5 is outside the model's batch range \[1, 4\]"):
        backend.run(images(5))
    with pytest.raises(ClipadError, match="uint8"):
        backend.run(images(2).astype(np.float32))
    assert calls("execute_async_v3") == []
    backend.close()


def test_no_gpu_never_creates_a_tensorrt_runtime(sim, model, monkeypatch):
    monkeypatch.setattr(cb, "gpu_info", lambda device=0: None)
    monkeypatch.setattr(cb, "device_count", lambda: 0)
    monkeypatch.setitem(sys.modules, "tensorrt_rtx", None)  # not even imported: the GPU is probed first
    with pytest.raises(ClipadError, match="no CUDA GPU/driver found; use --backend onnxruntime"):
        TensorRTBackend(*model)
    assert simtrt.CALLS == []
    assert "cudaMalloc" not in sim.calls
    assert not tensorrt_available(model[1])


def test_wrong_compute_capability(tmp_path, monkeypatch):
    cuda = simulated_cuda.SimulatedCudaRuntime(name="NVIDIA GeForce RTX 4090", compute_capability=(8, 9))
    monkeypatch.setattr(cb, "_rt", cuda)
    simtrt.reset(cuda, RTX_VERSION)
    monkeypatch.setattr(simtrt, "__version__", RTX_VERSION)
    monkeypatch.setitem(sys.modules, "tensorrt_rtx", simtrt)
    model_dir, manifest = write_model(tmp_path / "m")
    with pytest.raises(ClipadError) as err:
        TensorRTBackend(model_dir, manifest)
    assert "no engine for this GPU (NVIDIA GeForce RTX 4090, compute capability 8.9" in str(err.value)
    assert f"export-engine --from-onnx {model_dir} --precision fp16" in str(err.value)
    with pytest.raises(ClipadError) as err:
        TensorRTBackend(model_dir, manifest, engine=ENGINE)
    msg = str(err.value)
    assert "built for compute capability 8.6 (NVIDIA RTX A2000)" in msg and "compute capability 8.9" in msg
    assert f"rebuild on this machine: export-engine --from-onnx {model_dir} --precision fp16" in msg
    assert calls("__init__") == []


def test_wrong_tensorrt_version(sim, model, monkeypatch):
    monkeypatch.setattr(simtrt, "__version__", "1.8.0.40")
    with pytest.raises(ClipadError) as err:
        TensorRTBackend(*model)
    msg = str(err.value)
    assert "built with tensorrt_rtx 1.7.1.116 but 1.8.0.40 is installed" in msg
    assert f"export-engine --from-onnx {model[0]} --precision fp16" in msg
    assert calls("__init__") == []


def test_version_compatible_engine_loads_on_newer_tensorrt(sim, tmp_path, monkeypatch):
    onnx_bytes = make_onnx()
    model_dir, manifest = write_model(tmp_path / "vc", onnx_bytes,
                                      simtrt.engine_bytes(onnx_bytes, version_compatible=True),
                                      file="model.fp16.sm86.engine", flavor="tensorrt", trt_version="10.3.0.30",
                                      version_compatible=True)
    monkeypatch.setattr(simtrt, "__version__", "10.16.1.11")
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # only the lean runtime is installed
    backend = TensorRTBackend(model_dir, manifest)
    assert backend.runtime.engine_host_code_allowed is True
    assert backend.description.startswith("tensorrt-lean 10.16.1.11 fp16")
    np.testing.assert_allclose(backend.run(images(2))[1], reference(model_dir, images(2))[1], rtol=1e-6)
    backend.close()
    monkeypatch.setattr(simtrt, "__version__", "10.2.0.19")
    with pytest.raises(ClipadError, match=r"needs TensorRT >= 10.3.0.30, but tensorrt_lean 10.2.0.19"):
        TensorRTBackend(model_dir, manifest)


def test_missing_tensorrt_module_names_the_package(sim, model, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt_rtx", None)
    with pytest.raises(ClipadError, match="pip install tensorrt-rtx-cu13.*--backend onnxruntime"):
        TensorRTBackend(*model)
    assert not tensorrt_available(model[1])


def test_truncated_or_missing_engine_file(sim, model):
    model_dir, manifest = model
    path = os.path.join(model_dir, ENGINE)
    with open(path, "rb") as fh:
        data = fh.read()
    with open(path, "wb") as fh:
        fh.write(data[: len(data) // 2])
    with pytest.raises(ClipadError, match="does not match the manifest.*truncated.*rebuild: export-engine"):
        TensorRTBackend(model_dir, manifest)
    os.unlink(path)
    with pytest.raises(ClipadError, match="listed in the manifest but missing"):
        TensorRTBackend(model_dir, manifest)
    assert calls("deserialize_cuda_engine") == []


def test_engine_that_cannot_be_deserialized(sim, tmp_path):
    onnx_bytes = make_onnx()
    model_dir, manifest = write_model(tmp_path / "bad", onnx_bytes, b"ftrt\x00plan from another TensorRT")
    with pytest.raises(ClipadError, match="cannot deserialize the engine .*rebuild on this machine: export-engine"):
        TensorRTBackend(model_dir, manifest)
    assert len(calls("deserialize_cuda_engine")) == 1
    assert sim.live() == {"device": 0, "pinned": 0, "streams": 0, "graphs": 0, "graph_execs": 0}


def test_io_dtype_or_name_mismatch(sim, tmp_path):
    from onnx import TensorProto

    model_dir, manifest = write_model(tmp_path / "half", make_onnx(TensorProto.FLOAT16))
    with pytest.raises(ClipadError, match="'image_score' is TensorIOMode.OUTPUT HALF, the manifest expects .*float32"):
        TensorRTBackend(model_dir, manifest)
    model_dir, manifest = write_model(tmp_path / "names")
    manifest.outputs[1].name = "score"
    with pytest.raises(ClipadError, match="do not match the manifest"):
        TensorRTBackend(model_dir, manifest)
    assert sim.live()["device"] == 0


def test_close_frees_everything(sim, model):
    backend = TensorRTBackend(*model, cuda_graph=True)
    backend.run(images(2))
    assert sim.live() == {"device": 3, "pinned": 3, "streams": 1, "graphs": 1, "graph_execs": 1}
    backend.close()
    assert sim.live() == {"device": 0, "pinned": 0, "streams": 0, "graphs": 0, "graph_execs": 0}
    assert backend.context is None and backend.engine is None and backend.runtime is None
    backend.close()  # idempotent
    with pytest.raises(ClipadError, match="closed"):
        backend.run(images(1))


def test_cuda_graph_replay(sim, model):
    model_dir, manifest = model
    backend = TensorRTBackend(model_dir, manifest, cuda_graph=True)
    assert backend.description.endswith(", CUDA graph")
    for seed in range(3):  # new pixels each time: the replayed graph must copy the new input
        batch = images(2, seed)
        maps, scores = backend.run(batch)
        np.testing.assert_allclose(maps, reference(model_dir, batch)[0], rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(scores, reference(model_dir, batch)[1], rtol=1e-6, atol=1e-6)
    assert len(calls("execute_async_v3")) == 2  # one plain run + one captured; then replays
    assert sim.calls.count("cudaGraphLaunch") == 2
    assert sim.executed.count("graph:trt.execute") == 2 and sim.executed.count("trt.execute") == 1
    batch = images(3, 9)  # new shape: drop the graph, run plainly, capture again
    np.testing.assert_allclose(backend.run(batch)[1], reference(model_dir, batch)[1], rtol=1e-6, atol=1e-6)
    assert sim.calls.count("cudaGraphExecDestroy") == 1 and sim.live()["graph_execs"] == 1
    backend.close()


@pytest.mark.parametrize("failure", ["execute", "begin_capture"])
def test_cuda_graph_falls_back_with_a_warning(sim, tmp_path, caplog, failure):
    onnx_bytes = make_onnx()
    model_dir, manifest = write_model(tmp_path / "nograph", onnx_bytes,
                                      simtrt.engine_bytes(onnx_bytes, fail_in_capture=failure == "execute"))
    if failure == "begin_capture":
        sim.fail["cudaStreamBeginCapture"] = simulated_cuda.cudaError_t.cudaErrorStreamCaptureUnsupported
    backend = TensorRTBackend(model_dir, manifest, cuda_graph=True)
    with caplog.at_level(logging.WARNING, logger="clipad"):
        for seed in range(2):
            batch = images(2, seed)
            np.testing.assert_allclose(backend.run(batch)[1], reference(model_dir, batch)[1], rtol=1e-6)
    assert "CUDA graph capture failed" in caplog.text and "running without CUDA graphs" in caplog.text
    if failure == "begin_capture":
        assert "cudaErrorStreamCaptureUnsupported" in caplog.text
    assert backend.cuda_graph is False and not backend.description.endswith("CUDA graph")
    assert sim.live()["graphs"] == 0 and sim.capturing == {}
    backend.close()


def test_cuda_error_becomes_clipad_error(sim, model):
    backend = TensorRTBackend(*model)
    sim.fail["cudaStreamSynchronize"] = simulated_cuda.cudaError_t.cudaErrorIllegalAddress
    with pytest.raises(ClipadError, match="CUDA cudaStreamSynchronize failed: cudaErrorIllegalAddress"):
        backend.run(images(1))
    del sim.fail["cudaStreamSynchronize"]
    backend.close()
    sim.fail["cudaMalloc"] = simulated_cuda.cudaError_t.cudaErrorMemoryAllocation
    with pytest.raises(ClipadError, match="cudaMalloc failed: cudaErrorMemoryAllocation"):
        TensorRTBackend(*model)
    assert sim.live() == {"device": 0, "pinned": 0, "streams": 0, "graphs": 0, "graph_execs": 0}


def test_detector_end_to_end(sim, model):
    model_dir, manifest = model
    with Detector(model_dir, manifest, TensorRTBackend(model_dir, manifest)) as det:
        batch = images(6, 3)  # more than the max batch of 4: the detector splits it
        preds = det.predict_batch(list(batch), class_name="screw")
        ref_maps, ref_scores = reference(model_dir, batch)
        assert [p.class_name for p in preds] == ["screw"] * 6
        np.testing.assert_allclose([p.score for p in preds], ref_scores[:, 1], rtol=1e-6)
        np.testing.assert_allclose(preds[5].anomaly_map, ref_maps[5, 1], rtol=1e-6, atol=1e-6)


def test_engine_file_must_be_listed(sim, model):
    model_dir, manifest = model
    with pytest.raises(ClipadError, match="not listed"):
        TensorRTBackend(model_dir, manifest, engine="other.engine")
    backend = TensorRTBackend(model_dir, manifest, engine=os.path.join(model_dir, ENGINE))
    assert backend.entry.file == ENGINE
    backend.close()
    manifest.engines = []
    with pytest.raises(ClipadError, match=f"lists no TensorRT engine.*export-engine --from-onnx {model_dir}"):
        TensorRTBackend(model_dir, manifest)


def test_select_engine_by_compute_capability(model):
    def e(file, cc, precision):
        return engine_entry(b"", b"", file=file, precision=precision, target=EngineTarget(cc))

    manifest = model[1]
    manifest.engines = [e("a.fp32.sm86", "8.6", "fp32"), e("b.int8.sm86", "8.6", "int8"),
                        e("c.fp16.sm89", "8.9", "fp16"), e("d.fp16.sm86", "8.6", "fp16"),
                        e("e.fp32.sm87", "8.7", "fp32"), e("f.int8.sm87", "8.7", "int8")]
    assert select_engine(manifest, "8.6").file == "d.fp16.sm86"
    assert select_engine(manifest, "8.9").file == "c.fp16.sm89"
    assert select_engine(manifest, "8.7").file == "f.int8.sm87"
    assert select_engine(manifest, "7.5") is None
    assert select_engine(manifest, None) is None
    manifest.engines = []
    assert select_engine(manifest, "8.6") is None


def test_tensorrt_available(sim, model, monkeypatch):
    assert tensorrt_available() and tensorrt_available(model[1])
    other = copy.deepcopy(model[1])
    other.engines[0].target = EngineTarget("9.0")
    assert not tensorrt_available(other)
    monkeypatch.setattr(cb, "gpu_info", lambda device=0: None)
    assert not tensorrt_available() and not tensorrt_available(model[1])


def test_stream_is_non_blocking(sim, model):
    backend = TensorRTBackend(*model)
    assert sim.stream_flags == {backend.stream.handle: simulated_cuda.SimulatedCudaRuntime.cudaStreamNonBlocking}
    assert "cudaStreamCreate" not in sim.calls  # the legacy blocking creation is never used
    backend.close()


def test_device_selects_the_gpu_and_its_engine(tmp_path, monkeypatch):
    """Two GPUs: device 1 (sm 8.9) runs the sm 8.9 engine, everything is allocated on it."""
    cuda = simulated_cuda.SimulatedCudaRuntime(gpus=[("NVIDIA RTX A2000", (8, 6)), ("NVIDIA GeForce RTX 4090", (8, 9))])
    monkeypatch.setattr(cb, "_rt", cuda)
    simtrt.reset(cuda, RTX_VERSION)
    monkeypatch.setattr(simtrt, "__version__", RTX_VERSION)
    monkeypatch.setitem(sys.modules, "tensorrt_rtx", simtrt)
    onnx_bytes = make_onnx()
    model_dir, manifest = write_model(tmp_path / "m", onnx_bytes, file="model.fp16.rtx-sm89.engine",
                                      target=EngineTarget("8.9", "NVIDIA GeForce RTX 4090", aot=True))
    with pytest.raises(ClipadError, match="no engine for this GPU .NVIDIA RTX A2000, compute capability 8.6"):
        TensorRTBackend(model_dir, manifest)          # device 0 by default
    assert cuda.allocated_on == {}
    backend = TensorRTBackend(model_dir, manifest, device=1)
    assert backend.description.endswith("on NVIDIA GeForce RTX 4090 (sm 8.9, device 1)")
    assert cuda.current_device == 1 and set(cuda.allocated_on.values()) == {1}
    assert cuda.calls.index("cudaSetDevice") < cuda.calls.index("cudaMalloc")
    batch = images(3)
    np.testing.assert_allclose(backend.run(batch)[1], reference(model_dir, batch)[1], rtol=1e-6)
    backend.close()
    with pytest.raises(ClipadError, match=r"--device 5: this machine has 2 GPU\(s\) \(0 … 1\)"):
        TensorRTBackend(model_dir, manifest, device=5)
    with pytest.raises(ClipadError, match="--device -1"):
        TensorRTBackend(model_dir, manifest, device=-1)


def test_cuda_graph_with_a_binding_without_stream_capture(sim, model, caplog, monkeypatch):
    """A CUDA binding that lacks cudaStreamCaptureMode (as the removed pycuda fallback did) used to crash with a
    traceback inside begin_capture; now the backend warns once and runs without graphs."""
    monkeypatch.delattr(simulated_cuda.SimulatedCudaRuntime, "cudaStreamCaptureMode")
    backend = TensorRTBackend(*model, cuda_graph=True)
    with caplog.at_level(logging.WARNING, logger="clipad"):
        for seed in range(2):
            batch = images(2, seed)
            np.testing.assert_allclose(backend.run(batch)[1], reference(model[0], batch)[1], rtol=1e-6)
    assert "no stream capture (cudaStreamCaptureMode)" in caplog.text and caplog.text.count("running without") == 1
    assert backend.graph_mode is None and sim.live()["graphs"] == 0
    backend.close()


def test_tensorrt_rtx_uses_its_own_cuda_graphs(sim, model):
    simtrt.reset(sim, RTX_VERSION, rtx=True)
    backend = TensorRTBackend(*model, cuda_graph=True)
    assert backend.graph_mode == "tensorrt-rtx" and backend.description.endswith(", CUDA graph (TensorRT-RTX)")
    assert calls("create_execution_context") == [("ICudaEngine", "create_execution_context", "WHOLE_GRAPH_CAPTURE")]
    for n in (2, 3, 2):  # dynamic shapes are TensorRT-RTX's business: no capture or replay of ours
        batch = images(n, n)
        np.testing.assert_allclose(backend.run(batch)[0], reference(model[0], batch)[0], rtol=1e-6, atol=1e-6)
    assert "cudaStreamBeginCapture" not in sim.calls and "cudaGraphLaunch" not in sim.calls
    assert sim.executed.count("trt.execute(rtx graph)") == 3
    backend.close()
    plain = TensorRTBackend(*model)  # without --cuda-graph the context gets no graph strategy
    assert calls("create_execution_context")[-1][2] is None and plain.graph_mode is None
    plain.close()


# ---- the cuda-python shim itself ---------------------------------------------------------------------------------

def test_gpu_info_is_none_on_this_machine(monkeypatch):
    """Real cuda-bindings, no driver here: None, no exception (cudaErrorInsufficientDriver / driver not found)."""
    pytest.importorskip("cuda.bindings")
    monkeypatch.setattr(cb, "_rt", None)
    from cuda.bindings import runtime

    assert cb.cudart() is runtime
    if runtime.cudaGetDeviceCount()[0] == 0:
        pytest.skip("this machine has a CUDA GPU")
    assert cb.gpu_info() is None
    assert cb.no_gpu_reason() == "no CUDA GPU/driver found"
    assert not tensorrt_available()
    with pytest.raises(ClipadError, match=r"CUDA cudaMalloc failed: cudaError\w+"):  # real error code, named
        cb.DeviceBuffer(16)


def test_gpu_info_never_raises(monkeypatch):
    class DriverNotFound(RuntimeError):  # what cuda.pathfinder's DynamicLibNotFoundError derives from
        pass

    class Broken:
        def cudaGetDeviceCount(self):
            raise DriverNotFound('"cuda" is an NVIDIA driver library and can only be found via system search')

    monkeypatch.setattr(cb, "_rt", Broken())
    assert cb.gpu_info() is None

    def missing():
        raise ClipadError(cb.NO_CUDA_PYTHON)

    monkeypatch.setattr(cb, "_rt", None)
    monkeypatch.setattr(cb, "_load", missing)
    assert cb.gpu_info() is None
    assert "clipad-edge[tensorrt-cu12]" in cb.no_gpu_reason()


def test_shim_on_simulated_cuda(monkeypatch):
    cuda = simulated_cuda.SimulatedCudaRuntime(name="NVIDIA Jetson AGX Orin", compute_capability=(8, 7))
    monkeypatch.setattr(cb, "_rt", cuda)
    assert cb.gpu_info() == {"count": 1, "device": 0, "name": "NVIDIA Jetson AGX Orin", "compute_capability": "8.7",
                             "total_memory": 4 << 30, "driver_version": "12.6", "runtime_version": "12.6"}
    assert cb.device_count() == 1 and cb.gpu_info(1) is None
    src, dst = cb.PinnedHostArray((3, 5), np.float32), cb.PinnedHostArray((3, 5), np.float32)
    src.array[:] = np.arange(15, dtype=np.float32).reshape(3, 5)
    dev, stream = cb.DeviceBuffer(src.nbytes), cb.Stream()
    cb.memcpy_htod_async(dev.ptr, src.array, stream)
    cb.memcpy_dtoh_async(dst.array, dev.ptr, stream)
    assert not dst.array.any()  # asynchronous: nothing ran before the synchronize
    stream.synchronize()
    np.testing.assert_array_equal(dst.array, src.array)
    cuda.fail["cudaMemcpyAsync"] = simulated_cuda.cudaError_t.cudaErrorInvalidValue
    with pytest.raises(ClipadError, match="CUDA cudaMemcpyAsync failed: cudaErrorInvalidValue"):
        cb.memcpy_htod_async(dev.ptr, src.array, stream)
    with pytest.raises(ClipadError, match="non-contiguous"):
        cb.memcpy_dtoh_async(dst.array[:, ::2], dev.ptr, stream)
    for obj in (src, dst, dev, stream):
        obj.close()
        obj.close()
    assert cuda.live() == {"device": 0, "pinned": 0, "streams": 0, "graphs": 0, "graph_execs": 0}
    assert src.array is None


def test_simulated_engine_format_is_checked():
    """The simulation itself: a truncated or foreign blob deserializes to None, as real TensorRT returns."""
    onnx_bytes = make_onnx()
    runtime = simtrt.Runtime(simtrt.Logger())
    good = simtrt.engine_bytes(onnx_bytes)
    assert runtime.deserialize_cuda_engine(good) is not None
    assert runtime.deserialize_cuda_engine(good[: len(good) - 100]) is None
    assert runtime.deserialize_cuda_engine(onnx_bytes) is None
    engine = runtime.deserialize_cuda_engine(good)
    with pytest.raises(AttributeError):
        engine.num_bindings  # noqa: B018  (removed in TensorRT 10)
    assert simtrt.forbidden_calls() == [("ICudaEngine", "num_bindings", "FORBIDDEN")]
    assert json.loads(good[len(simtrt.MAGIC):].split(b"\n", 1)[0])["batch"] == [1, 1, 4]
    simtrt.CALLS.clear()
