"""edge-doctor: the real checks on this machine, and the situations this machine does not have (two ONNX Runtimes,
a provider built for another GPU, a Jetson, a driver older than cuda-python, an engine for this GPU) with the
library in question replaced by a FAKE (named so below) or the SIMULATED CUDA/TensorRT of the plumbing tests."""
from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from types import SimpleNamespace

import numpy as np
import pytest

import simulated_cuda
import simulated_tensorrt as simtrt
from clipad.runtime import extras, platform_info
from clipad.runtime.backends import cuda_access, cuda_ctypes
from clipad.runtime.backends import cuda_buffers as cb
from clipad.runtime.doctor import checks
from clipad.runtime.doctor.cli import diagnose, main, render
from conftest import REPO
from test_tensorrt_plumbing import RTX_VERSION, write_model

DOCTOR = [sys.executable, "-m", "clipad.runtime.doctor.cli"]


def test_probe_model_is_one_add_node():
    import onnxruntime as ort
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("Add", ["x", "x"], ["y"])], "clipad_doctor_probe",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], producer_name="clipad-doctor")
    model.ir_version = 7
    assert model.SerializeToString() == checks.PROBE_MODEL
    session = ort.InferenceSession(checks.PROBE_MODEL, providers=["CPUExecutionProvider"])
    assert session.run(None, {"x": np.ones((1, 4), np.float32)})[0].tolist() == [[2, 2, 2, 2]]


def test_this_machine_as_json():
    proc = subprocess.run([*DOCTOR, "--json"], capture_output=True, text=True, timeout=180, cwd=REPO)
    report = json.loads(proc.stdout)
    assert proc.returncode == (0 if report["ok"] else 1), proc.stderr
    assert report["ok"] and report["problems"] == [], report["problems"]
    assert set(report["onnxruntime"]["distributions"]) == {"onnxruntime"}
    cpu = next(p for p in report["onnxruntime"]["providers"] if p["name"] == "CPUExecutionProvider")
    assert cpu["works"] and cpu["error"] is None
    assert report["cuda"]["gpu"] is None and report["platform"]["jetson"] is None
    assert isinstance(report["opencv"]["gstreamer"], bool) and "V4L2" in report["opencv"]["video_backends"]
    assert report["platform"]["cpu"]["flags"] == platform_info.cpu_info()["flags"]
    text = subprocess.run(DOCTOR, capture_output=True, text=True, timeout=180, cwd=REPO).stdout
    assert "no problems found" in text and "CPUExecutionProvider" in text


def test_two_onnxruntime_distributions_is_a_problem(monkeypatch, capsys):
    monkeypatch.setattr(extras, "onnxruntime_distributions",
                        lambda: {"onnxruntime-gpu": "1.31.1", "onnxruntime": "1.32.0"})
    monkeypatch.setattr("platform.machine", lambda: "x86_64")
    assert main(["--json"]) == 1
    report = json.loads(capsys.readouterr().out)
    assert not report["ok"]
    problem = next(p for p in report["problems"] if "ONNX Runtime distributions" in p["what"])
    assert "onnxruntime-gpu, onnxruntime" in problem["what"]
    assert problem["fix"].startswith(
        "pip uninstall -y onnxruntime-gpu onnxruntime && pip install onnxruntime-gpu==1.31.1")
    monkeypatch.setattr("platform.machine", lambda: "aarch64")  # a Jetson: NVIDIA's wheel, not the index
    assert "install NVIDIA's onnxruntime-gpu wheel" in extras.two_onnxruntimes_fix({"onnxruntime-gpu": "1.20.0",
                                                                                    "onnxruntime": "1.20.0"})


class FakeOrt:
    """FAKE onnxruntime: lists CPU and CUDA; CUDA either cannot start (falls back) or fails at the first run."""

    def __init__(self, cuda: str):
        self.cuda, self.__version__ = cuda, "1.20.0-fake"

    def get_available_providers(self):
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]

    def SessionOptions(self):
        return SimpleNamespace()

    def InferenceSession(self, model, sess_options=None, providers=()):
        fake = self

        class Session:
            def get_providers(self):
                return ["CPUExecutionProvider"] if providers[0] == "CUDAExecutionProvider" and \
                    fake.cuda == "cannot start" else list(providers)

            def run(self, names, feeds):
                if providers[0] == "CUDAExecutionProvider":
                    raise RuntimeError("CUDA failure 209: no kernel image is available for execution on the device")
                return [feeds["x"] * 2]
        return Session()


@pytest.mark.parametrize("cuda, gpu, problem", [("fails at run", None, True), ("cannot start", None, False),
                                                ("cannot start", {"name": "RTX"}, True)])
def test_a_listed_provider_is_not_proof(monkeypatch, cuda, gpu, problem):
    monkeypatch.setitem(sys.modules, "onnxruntime", FakeOrt(cuda))
    monkeypatch.setattr(extras, "onnxruntime_distributions", lambda: {"onnxruntime-gpu": "1.20.0"})
    report = checks.Report()
    checks.check_onnxruntime(report, gpu)
    providers = {p["name"]: p for p in report.sections["onnxruntime"]["providers"]}
    assert providers["CPUExecutionProvider"]["works"] and not providers["CUDAExecutionProvider"]["works"]
    text = json.dumps(report.as_dict())
    assert ("no kernel image" in text) == (cuda == "fails at run")
    assert bool(report.problems) == problem
    if not problem:
        assert "falls back" in report.notes[0]


def test_jetson_facts_and_venv_advice(tmp_path, monkeypatch):
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc" / "nv_tegra_release").write_text(
        "# R36 (release), REVISION: 4.0, GCID: 37537400, BOARD: generic, EABI: aarch64, DATE: Fri Sep 13 2024\n")
    (tmp_path / "proc" / "device-tree").mkdir(parents=True)
    (tmp_path / "proc" / "device-tree" / "model").write_bytes(b"NVIDIA Jetson Orin Nano Developer Kit\0")
    assert platform_info.jetson_info(str(tmp_path)) == {"model": "NVIDIA Jetson Orin Nano Developer Kit",
                                                        "l4t": "36.4.0", "jetpack": "6.1"}
    assert platform_info.jetson_info(str(tmp_path / "nothing")) is None
    monkeypatch.setattr(checks, "in_venv_without_system_packages", lambda: True)
    report = checks.Report()
    checks.check_platform(report, str(tmp_path))
    assert "--system-site-packages" in report.problems[0]["fix"]
    monkeypatch.setattr("clipad.runtime.sources.opencv_has_gstreamer", lambda: False)
    checks.check_opencv(report, jetson=True)
    assert any("nvarguscamerasrc" in p["what"] for p in report.problems)
    cpu = tmp_path / "cpuinfo"
    cpu.write_text("processor : 0\nBogoMIPS : 62.50\nFeatures : fp asimd evtstrm aes crc32 asimddp\n"
                   "CPU part : 0xd42\n")
    assert platform_info.cpu_info(str(cpu)) == {"model": "0xd42", "flags": ["asimd", "asimddp"]}


def test_driver_without_a_python_route_to_cuda(monkeypatch):
    monkeypatch.setattr(cuda_access, "driver_version", lambda: 12060)
    monkeypatch.setattr(cuda_access, "cuda_python_version", lambda: "13.5.0")
    monkeypatch.setitem(sys.modules, "pycuda", None)
    monkeypatch.setitem(sys.modules, "pycuda.driver", None)
    monkeypatch.setattr(cuda_ctypes, "candidates", lambda: [])
    monkeypatch.delenv(cuda_access.ENV, raising=False)
    report = checks.Report()
    assert checks.check_cuda(report) is None
    assert "no Python route to CUDA" in report.problems[0]["what"]
    assert "[tensorrt-cu12]" in report.problems[0]["fix"]
    assert report.notes[0].startswith("skipping cuda-python: cuda-python 13.5.0 is built for CUDA 13")


def test_model_auto_choice_with_an_engine_for_this_gpu(monkeypatch, tmp_path):
    """SIMULATED CUDA (an RTX A2000, sm 8.6) and TensorRT-RTX: the listed sm 8.6 engine fits and auto picks it; a
    TensorRT version change or another GPU makes auto fall back to ONNX Runtime, saying why, with the build line."""
    sim = simulated_cuda.SimulatedCudaRuntime()
    monkeypatch.setattr(cb, "_rt", sim)
    simtrt.reset(sim, RTX_VERSION)
    monkeypatch.setattr(simtrt, "__version__", RTX_VERSION)
    monkeypatch.setitem(sys.modules, "tensorrt_rtx", simtrt)
    model_dir, _ = write_model(tmp_path / "m")
    report = diagnose(model_dir)
    model = report.sections["model"]
    assert model["auto"]["backend"] == "tensorrt" and model["auto"]["precision"] == "fp16"
    assert model["engines"][0]["fits"] and "NVIDIA RTX A2000" in model["auto"]["why"]
    assert "--backend auto → tensorrt fp16" in render(report)
    monkeypatch.setattr(simtrt, "__version__", "1.8.0.1")
    model = diagnose(model_dir).sections["model"]
    assert model["auto"]["backend"] == "onnxruntime"
    assert "built with tensorrt_rtx 1.7.1.116 but 1.8.0.1 is installed" in model["auto"]["why"]
    assert model["build"] == f"export-engine --from-onnx {model_dir} --precision fp16"
    monkeypatch.setattr(cb, "_rt", simulated_cuda.SimulatedCudaRuntime(compute_capability=(8, 9)))
    model = diagnose(model_dir).sections["model"]
    assert model["engines"][0]["why_not"] == "built for sm 8.6, this GPU is sm 8.9"
    simtrt.CALLS.clear()


def test_usage_errors_are_one_line_exit_2(tmp_path):
    for args, text in ((["--model", str(tmp_path / "missing")], "no such folder"),
                       (["--cameras", "x"], "camera indices like 0, 0-3 or 0,2"),
                       (["--cameras", "0", "--camera-timeout", "0"], "more than 0 seconds")):
        proc = subprocess.run([*DOCTOR, *args], capture_output=True, text=True, timeout=180, cwd=REPO)
        assert proc.returncode == 2, (args, proc.stderr)
        assert text in proc.stderr and "Traceback" not in proc.stderr


def test_cameras_are_probed_with_a_timeout(monkeypatch):
    class Cap:
        def __init__(self, index):
            self.index = index

        def isOpened(self):
            return self.index != 2

        def read(self):
            if self.index == 1:
                time.sleep(3)  # a camera held by a running station, or a hung driver
            return True, np.zeros((480, 640, 3), np.uint8)

        def release(self):
            pass

    monkeypatch.setattr("clipad.runtime.sources._quiet_videocapture", lambda i, api=None: Cap(i))
    report = checks.Report()
    started = time.monotonic()
    checks.check_cameras(report, [0, 1, 2], timeout=0.5)
    assert time.monotonic() - started < 2.5
    cams = report.sections["cameras"]
    assert cams[0]["frame"] == [640, 480] and cams[0]["error"] is None
    assert "no answer in 0.5 s" in cams[1]["error"]
    assert cams[2]["opened"] is False and cams[2]["frame"] is None
    assert not [t for t in threading.enumerate() if t.name == "doctor-camera-0"]
