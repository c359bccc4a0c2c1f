"""Installs as users make them, in fresh virtual environments from the package index (cached by pip):

* the base install has no ONNX Runtime or OpenCV and every command says which extra to add; ``[gpu]`` next to a
  preinstalled ``onnxruntime-gpu`` adds no CPU ``onnxruntime``; the CPU package on top is what edge-doctor flags;
* ``[tensorrt-cu12]`` / ``[tensorrt-cu13]`` resolve cuda-python of that CUDA major (pip's resolver report);
* the Jetson recipe rehearsed with Debian's OpenCV (built with GStreamer, numpy 1.x) in a ``--system-site-packages``
  venv: ``[jetson]``, an ONNX Runtime wheel standing in for NVIDIA's, edge-doctor, and edge-detect reading a
  GStreamer ``videotestsrc`` pipeline.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import REPO

TINY = REPO / "tests" / "data" / "schema2-aaclip-tiny"
SYSTEM_PYTHON = "/usr/bin/python3"


def run(cmd, timeout=600, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=timeout, **kw)


def pip(venv: Path, *args, timeout=600):
    proc = run([venv / "bin" / "python", "-m", "pip", "-q", "--disable-pip-version-check", *args], timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc


def distributions(venv: Path) -> dict[str, str]:
    out = run([venv / "bin" / "python", "-m", "pip", "list", "--format=json", "--disable-pip-version-check"]).stdout
    return {d["name"].lower(): d["version"] for d in json.loads(out)}


def doctor(venv: Path, *args) -> tuple[int, dict]:
    proc = run([venv / "bin" / "edge-doctor", "--json", *args], timeout=300)
    assert proc.stdout.strip(), proc.stderr
    return proc.returncode, json.loads(proc.stdout)


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    proc = run([sys.executable, "-m", "pip", "wheel", REPO, "--no-deps", "--no-build-isolation", "-q", "-w", out])
    assert proc.returncode == 0, proc.stderr
    return next(out.glob("clipad_edge-*.whl"))


@pytest.fixture
def model(tmp_path) -> Path:
    copy = tmp_path / "model"
    shutil.copytree(TINY, copy)
    return copy


def test_base_then_gpu_then_the_cpu_package_on_top(tmp_path, wheel, model):
    venv = tmp_path / "venv"
    assert run([sys.executable, "-m", "venv", venv]).returncode == 0
    pip(venv, "install", wheel)
    dists = distributions(venv)
    assert "onnxruntime" not in dists and not any(d.startswith("opencv") for d in dists) and "torch" not in dists
    image = tmp_path / "part.png"
    Image.fromarray(np.full((40, 40, 3), 128, np.uint8)).save(image)
    proc = run([venv / "bin" / "edge-detect", "--model", model, "--source", image], cwd=tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    line = proc.stderr.strip().splitlines()[-1]
    assert line.startswith("edge-detect: error: ") and "pip install 'clipad-edge[cpu]'" in line
    code, report = doctor(venv)
    assert code == 1 and {p["what"].split(" (")[0] for p in report["problems"]} == \
        {"ONNX Runtime does not import", "OpenCV does not import"}

    pip(venv, "install", "onnxruntime-gpu")  # as a GPU box has it before our install
    pip(venv, "install", f"{wheel}[gpu]")
    dists = distributions(venv)
    assert "onnxruntime-gpu" in dists and "onnxruntime" not in dists and "opencv-python-headless" in dists
    code, report = doctor(venv)
    assert report["onnxruntime"]["distributions"] == {"onnxruntime-gpu": dists["onnxruntime-gpu"]}
    providers = {p["name"]: p for p in report["onnxruntime"]["providers"]}
    assert "CUDAExecutionProvider" in providers and providers["CPUExecutionProvider"]["works"]
    assert not providers["CUDAExecutionProvider"]["works"]  # no GPU here: listed, not working, and said so
    assert code == 0 and report["ok"], report["problems"]
    proc = run([venv / "bin" / "edge-detect", "--model", model, "--source", image, "--quiet"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr

    pip(venv, "install", "onnxruntime")  # the trap: the CPU package overwrites the GPU build's files
    code, report = doctor(venv)
    assert code == 1 and not report["ok"]
    problem = next(p for p in report["problems"] if "ONNX Runtime distributions" in p["what"])
    assert "onnxruntime-gpu" in problem["what"] and "onnxruntime," in problem["what"] + ","
    assert problem["fix"].startswith("pip uninstall -y ") and \
        f"pip install onnxruntime-gpu=={dists['onnxruntime-gpu']}" in problem["fix"]


@pytest.mark.parametrize("extra, major", [("tensorrt-cu12", "12"), ("tensorrt-cu13", "13"), ("tensorrt", "12")])
def test_tensorrt_extras_pin_the_cuda_major(tmp_path, wheel, extra, major):
    """pip's resolver report for a fresh install of the extra (nothing is installed)."""
    report = tmp_path / "report.json"
    proc = run([sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "-q",
                "--disable-pip-version-check", "--report", report, f"{wheel}[{extra}]"])
    assert proc.returncode == 0, proc.stderr
    installs = json.loads(report.read_text())["install"]
    chosen = {i["metadata"]["name"].lower(): i["metadata"]["version"] for i in installs}
    assert chosen["cuda-python"].split(".")[0] == major, chosen
    assert chosen.get("cuda-bindings", major).split(".")[0] == major, chosen
    assert not {"torch", "onnxruntime", "opencv-python-headless"} & set(chosen)


def system_opencv_with_gstreamer() -> str | None:
    """Why the Jetson rehearsal cannot run here, None when it can."""
    if not os.path.exists(SYSTEM_PYTHON):
        return f"no {SYSTEM_PYTHON}"
    code = "import cv2; from cv2 import videoio_registry as r; print(r.hasBackend(cv2.CAP_GSTREAMER))"
    proc = run([SYSTEM_PYTHON, "-c", code], timeout=60)
    if proc.stdout.strip() != "True":
        return "Debian's python3-opencv with GStreamer is not installed (scripts/setup_env.sh --test installs it)"
    return None


def test_jetson_recipe_rehearsed_with_debian_opencv_and_gstreamer(tmp_path, wheel, model):
    why = system_opencv_with_gstreamer()
    if why:
        pytest.fail(why)
    venv = tmp_path / "jetson-like"
    proc = run([SYSTEM_PYTHON, "-m", "venv", "--system-site-packages", venv])
    assert proc.returncode == 0, proc.stderr
    system_numpy = run([venv / "bin" / "python", "-c", "import numpy; print(numpy.__version__)"]).stdout.strip()
    pip(venv, "install", f"{wheel}[jetson]", "onnxruntime")  # onnxruntime: stand-in for NVIDIA's Jetson wheel
    local = json.loads(run([venv / "bin" / "python", "-m", "pip", "list", "--local", "--format=json"]).stdout)
    assert not [d["name"] for d in local if d["name"].lower().startswith("opencv")]  # JetPack's cv2 stays in use
    numpy_now = run([venv / "bin" / "python", "-c", "import numpy; print(numpy.__version__)"]).stdout.strip()
    assert numpy_now.split(".")[0] == "1" and numpy_now == system_numpy  # JetPack's cv2 is built for numpy 1.x
    code, report = doctor(venv)
    assert report["opencv"]["gstreamer"] is True and "GSTREAMER" in report["opencv"]["video_backends"]
    assert report["python"]["system_site_packages"] is True
    assert code == 0, report["problems"]
    out = tmp_path / "gst.jsonl"
    # is-live: frames at the caps' rate, as a camera delivers them (a live source hands out the newest frame only)
    pipeline = ("gst:videotestsrc is-live=true num-buffers=150 pattern=ball ! "
                "video/x-raw,width=96,height=72,framerate=30/1")
    proc = run([venv / "bin" / "edge-detect", "--model", model, "--source", pipeline, "--max-frames", "3",
                "--jsonl", out, "--quiet"], cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(records) == 3 and all(r["error"] is None and np.isfinite(r["score"]) for r in records)
    assert records[0]["source"].startswith("gst:videotestsrc") and records[0]["source"].endswith("sync=false")
    proc = run([venv / "bin" / "edge-detect", "--model", model, "--source", "gst:nosuchelement ! fakesink2",
                "--quiet"], cwd=tmp_path, timeout=120)
    assert proc.returncode == 2 and "GStreamer could not start this pipeline" in proc.stderr.splitlines()[-1]
