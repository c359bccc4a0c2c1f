"""Packaging: a regular (non-editable) wheel has every package, and the base install does not pull torch."""
from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

from conftest import REPO


def test_wheel_contents_and_lean_base_requirements(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", str(REPO), "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(tmp_path)], check=True, capture_output=True, timeout=300)
    wheel = next(tmp_path.glob("clipad_edge-*.whl"))
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
        metadata = zf.read(next(n for n in names if n.endswith("METADATA"))).decode()
        entry_points = zf.read(next(n for n in names if n.endswith("entry_points.txt"))).decode()
    for module in ("clipad/__init__.py", "clipad/runtime/detector.py", "clipad/runtime/backends/onnxruntime.py",
                   "clipad/export/models/aaclip.py", "clipad/export/cli.py", "clipad/calibration/__init__.py",
                   "clipad/benchmarks/__init__.py"):
        assert module in names, module
    assert not any(n.startswith("tests/") for n in names)
    requires = [line.split(":", 1)[1].strip() for line in metadata.splitlines() if line.startswith("Requires-Dist:")]
    base = [r for r in requires if "extra ==" not in r]
    assert base and not any(r.lower().startswith(("torch", "open-clip", "open_clip")) for r in base), base
    # an extra cannot remove a base dependency: neither ONNX Runtime nor OpenCV in the base (they fight the GPU /
    # JetPack builds); [cpu] and [gpu] add one each, [export] none of its own
    assert not any(r.lower().startswith(("onnxruntime", "opencv")) for r in base), base

    def extra(name: str) -> list[str]:
        return [r.split(";")[0].strip().lower() for r in requires if f'extra == "{name}"' in r]

    assert {r.split(">")[0].split("=")[0] for r in extra("cpu")} == {"onnxruntime", "opencv-python-headless"}
    assert {r.split(">")[0].split("=")[0] for r in extra("gpu")} == {"onnxruntime-gpu", "opencv-python-headless"}
    assert not any(r.startswith(("onnxruntime", "opencv")) for r in extra("export") + extra("jetson"))
    assert any(r.startswith("numpy") and "<2" in r for r in extra("jetson"))
    assert any(r.startswith("torch") and 'extra == "export"' in r for r in requires)
    assert "edge-doctor = clipad.runtime.doctor.cli:main" in entry_points
    assert "export-engine = clipad.export.cli:main" in entry_points
    assert "edge-detect = clipad.runtime.detect.cli:main" in entry_points
    for module in ("clipad/runtime/detect/cli.py", "clipad/runtime/serving/triton_models.py",
                   "clipad/runtime/triton_python.py", "clipad/runtime/precisions.py"):
        assert module in names, module


def test_regular_install_imports_and_runs(tmp_path):
    """A non-editable install (wheel unpacked with pip --target) provides every module and console entry point."""
    import os

    subprocess.run([sys.executable, "-m", "pip", "install", str(REPO), "--no-deps", "--no-build-isolation", "-q",
                    "--target", str(tmp_path / "site")], check=True, capture_output=True, timeout=300)
    code = ("import clipad, clipad.runtime.detect.cli, clipad.runtime.backends.tensorrt, clipad.export.cli, "
            "clipad.calibration.images, clipad.benchmarks.overlay_timing, clipad.runtime.serving.edge_serve; "
            "print(clipad.__file__)")
    env = dict(os.environ, PYTHONPATH=str(tmp_path / "site"))
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120,
                          cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().startswith(str(tmp_path / "site"))
    proc = subprocess.run([sys.executable, "-m", "clipad.runtime.detect.cli", "--help"], env=env, capture_output=True,
                          text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 0 and "--save-maps" in proc.stdout


def test_documented_and_old_import_paths_keep_working():
    """The README's API import and the module that Triton repositories written before the serving/ layout import."""
    from clipad.runtime import triton_python
    from clipad.runtime.detector import Detector, Prediction  # noqa: F401
    from clipad.runtime.serving import triton_models

    for name in ("Preprocess", "OnnxModel", "Postprocess"):
        assert getattr(triton_python, name) is getattr(triton_models, name)
    old_shim = "from clipad.runtime.triton_python import Postprocess as TritonPythonModel\n"
    namespace: dict = {}
    exec(old_shim, namespace)   # exactly what an older repository's model.py runs
    assert namespace["TritonPythonModel"] is triton_models.Postprocess


def test_runtime_code_runs_on_python_3_10():
    """JetPack 6's Python is 3.10: vermin reads every runtime-side module (the export side too: --from-onnx engine
    builds run on the device) and finds no construct newer than 3.10 (``tomllib`` is guarded by a fallback)."""
    folders = ["runtime", "calibration", "benchmarks", "clipad", "export"]
    vermin = Path(sys.executable).with_name("vermin")  # installed by the dev extra
    proc = subprocess.run([str(vermin), "-t=3.10-", "--violations", "--eval-annotations", "--no-tips",
                           *[str(REPO / f) for f in folders]], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-1000:]
    assert "Target versions not met" not in proc.stdout
