"""edge-doctor's checks. Each fills one section of the report and adds problems (exit 1) or notes; nothing here
imports torch, and every library is imported inside its check so a broken one is reported, not fatal."""
from __future__ import annotations

import base64
import contextlib
import io
import os
import platform
import sys
import threading
from dataclasses import dataclass, field

import numpy as np

from .. import extras
from ..platform_info import cpu_info, jetson_info

# One Add node, float32 [1,4] (ir 7, opset 13): a real session per provider proves the provider runs, which a
# provider list does not (an ONNX Runtime built for another GPU lists CUDA, then fails at the first run).
PROBE_MODEL = base64.b64decode(
    "CAcSDWNsaXBhZC1kb2N0b3I6TwoOCgF4CgF4EgF5IgNBZGQSE2NsaXBhZF9kb2N0b3JfcHJvYmVaEwoBeBIOCgwIARIICgIIAQoCCARiEwoBeRIO"
    "CgwIARIICgIIAQoCCARCBAoAEA0=")


@dataclass
class Report:
    sections: dict = field(default_factory=dict)
    problems: list[dict] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def problem(self, what: str, fix: str) -> None:
        self.problems.append({"what": what, "fix": fix})

    def as_dict(self) -> dict:
        return {"ok": not self.problems, "problems": self.problems, "notes": self.notes, **self.sections}


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0][:240]}" if text else type(exc).__name__


def in_venv_without_system_packages() -> bool:
    if sys.prefix == sys.base_prefix:
        return False
    try:
        with open(os.path.join(sys.prefix, "pyvenv.cfg")) as fh:
            return "include-system-site-packages = true" not in fh.read().replace("True", "true")
    except OSError:
        return True


def check_platform(report: Report, root: str = "/") -> None:
    jetson = jetson_info(root)
    report.sections["platform"] = {"system": platform.system(), "machine": platform.machine(), "cpu": cpu_info(),
                                   "jetson": jetson}
    report.sections["python"] = {"version": platform.python_version(), "executable": sys.executable,
                                 "venv": sys.prefix != sys.base_prefix,
                                 "system_site_packages": not in_venv_without_system_packages()}
    report.sections["numpy"] = {"version": np.__version__}
    if sys.version_info < (3, 10):
        report.problem(f"Python {platform.python_version()} is older than 3.10", "use Python 3.10 or newer")
    if jetson and in_venv_without_system_packages():
        report.problem("a Jetson venv without --system-site-packages cannot import JetPack's TensorRT and OpenCV",
                       f"python3 -m venv --system-site-packages {sys.prefix} (then pip install 'clipad-edge[jetson]')")


def check_onnxruntime(report: Report, gpu: dict | None) -> None:
    dists = extras.onnxruntime_distributions()
    section = {"distributions": dists, "version": None, "providers": []}
    report.sections["onnxruntime"] = section
    if len(dists) > 1:
        report.problem(f"{len(dists)} ONNX Runtime distributions are installed ({', '.join(dists)}): they share one "
                       "onnxruntime folder, so whichever pip wrote last runs, while pip lists both",
                       extras.two_onnxruntimes_fix(dists))
    try:
        import onnxruntime as ort
    except Exception as exc:
        report.problem(f"ONNX Runtime does not import ({_first_line(exc)})", extras.MISSING["onnxruntime"])
        return
    section["version"] = getattr(ort, "__version__", None)
    section["file"] = getattr(ort, "__file__", None)
    for name in ort.get_available_providers():
        section["providers"].append(_probe_provider(ort, name))
    gpu_fix = ("install the onnxruntime-gpu build for this CUDA major and GPU (desktop: pip install "
               "'clipad-edge[gpu]'; Jetson: NVIDIA's wheel for your JetPack)")
    for p in section["providers"]:
        if p["works"]:
            continue
        failure = "a session on it fails" if p["stage"] == "run" else "it cannot start"
        what = f"ONNX Runtime lists {p['name']} but {failure} ({p['error']})"
        if p["name"] == "CPUExecutionProvider":
            report.problem(what, "reinstall ONNX Runtime")
        elif p["name"] == "CUDAExecutionProvider" and (p["stage"] == "run" or gpu is not None):
            # Starts but fails at the first run (built for another GPU or CUDA): every run would fail. Cannot start
            # with a GPU present: the GPU would never be used.
            report.problem(what, gpu_fix)
        else:
            report.notes.append(f"{what}; ONNX Runtime falls back to the next provider")


def _probe_provider(ort, name: str) -> dict:
    """{"name", "works", "stage" ("start" or "run": where it failed), "error"}."""
    stage = "start"
    try:
        opts = ort.SessionOptions()
        opts.log_severity_level = 4  # our line says what failed; ORT's own is noise here
        printed = io.StringIO()
        with contextlib.redirect_stdout(printed):  # ORT prints "EP Error …" on stdout when a provider cannot start
            session = ort.InferenceSession(PROBE_MODEL, sess_options=opts, providers=[name])
        used = session.get_providers()[0]
        if used != name:
            said = next((line.strip() for line in printed.getvalue().splitlines() if line.startswith("EP Error")), "")
            return {"name": name, "works": False, "stage": stage,
                    "error": f"the session fell back to {used}" + (f" ({said[:240]})" if said else "")}
        stage = "run"
        x = np.arange(4, dtype=np.float32).reshape(1, 4)
        y = session.run(None, {"x": x})[0]
        if not np.array_equal(y, x + x):
            return {"name": name, "works": False, "stage": stage, "error": f"wrong result {y.tolist()}"}
        return {"name": name, "works": True, "stage": None, "error": None}
    except Exception as exc:
        return {"name": name, "works": False, "stage": stage, "error": _first_line(exc)}


def check_cuda(report: Report) -> dict | None:
    from ..backends import cuda_access
    from ..backends import cuda_buffers as cb

    survey = cuda_access.survey().as_dict()
    gpu = cb.gpu_info() if survey["chosen"] else None
    report.sections["cuda"] = {"driver_cuda_version": survey["driver_cuda_version"], "access": survey,
                               "gpu": gpu}
    report.notes.extend(survey["warnings"])
    if survey["driver_cuda_version"] and not survey["chosen"]:
        report.problem("a CUDA driver is installed but no Python route to CUDA works (TensorRT backend unusable)",
                       cuda_access.no_access_message(cuda_access.Report(tried=[(u["name"], u["why"])
                                                                               for u in survey["unusable"]])))
    return gpu


def check_tensorrt(report: Report, jetson: bool) -> None:
    import importlib

    modules = {}
    for name in ("tensorrt", "tensorrt_lean", "tensorrt_rtx"):
        try:
            module = importlib.import_module(name)
            modules[name] = {"version": str(getattr(module, "__version__", "?")), "error": None}
        except ImportError:
            continue
        except Exception as exc:  # a wheel whose libraries are stubs or missing raises OSError/RuntimeError
            modules[name] = {"version": None, "error": _first_line(exc)}
    report.sections["tensorrt"] = {"modules": modules}
    if not any(m["version"] for m in modules.values()):
        if jetson and in_venv_without_system_packages():
            report.notes.append("TensorRT does not import: JetPack's TensorRT (python3-libnvinfer) is only visible "
                                "from a venv made with --system-site-packages")
        else:
            report.notes.append("TensorRT does not import here: --backend auto uses ONNX Runtime")


def check_openvino(report: Report) -> None:
    try:
        import openvino as ov

        devices = list(ov.Core().available_devices)
        report.sections["openvino"] = {"version": ov.get_version(), "devices": devices}
    except ImportError:
        report.sections["openvino"] = None
    except Exception as exc:
        report.sections["openvino"] = {"error": _first_line(exc)}


def check_opencv(report: Report, jetson: bool) -> None:
    dists = extras.installed(extras.OPENCV_DISTRIBUTIONS)
    section = {"distributions": dists}
    report.sections["opencv"] = section
    if len(dists) > 1:
        report.problem(f"{len(dists)} OpenCV distributions are installed ({', '.join(dists)}): they overwrite each "
                       "other's cv2", f"pip uninstall -y {' '.join(dists)} && pip install opencv-python-headless")
    try:
        import cv2
    except Exception as exc:
        hint = extras.MISSING["cv2"]
        if "numpy" in str(exc).lower() and np.__version__.split(".")[0] != "1":
            hint = "this OpenCV is built for numpy 1.x: pip install 'numpy<2' (the [jetson] extra pins it)"
        report.problem(f"OpenCV does not import ({_first_line(exc)})", hint)
        return
    from ..sources import opencv_has_gstreamer

    build = cv2.getBuildInformation()
    backends = []
    try:
        from cv2 import videoio_registry

        backends = sorted({videoio_registry.getBackendName(b) for b in videoio_registry.getBackends()
                           if videoio_registry.hasBackend(b)})
    except Exception:
        pass
    section.update({"version": cv2.__version__, "file": getattr(cv2, "__file__", None),
                    "gstreamer": opencv_has_gstreamer(),
                    "cuda": any(line.strip().startswith("NVIDIA CUDA:") and "YES" in line
                                for line in build.splitlines()),
                    "video_backends": backends})
    if jetson and not section["gstreamer"]:
        report.problem("this OpenCV has no GStreamer, so a Jetson's CSI camera (gst:nvarguscamerasrc) cannot open "
                       f"({', '.join(dists) or cv2.__file__} shadows JetPack's)",
                       "pip uninstall -y opencv-python-headless opencv-python, in a venv made with "
                       "--system-site-packages (JetPack's cv2 is built with GStreamer)")


def check_cameras(report: Report, indices: list[int], timeout: float) -> None:
    """Open each camera index and read one frame, each within ``timeout`` seconds (a running station may hold one;
    a driver may hang: the probe thread is abandoned, never joined forever)."""
    results = []
    for index in indices:
        outcome: dict = {"index": index, "opened": False, "frame": None, "error": None}

        def probe(out=outcome, i=index):
            try:
                from ..sources import _quiet_videocapture

                cap = _quiet_videocapture(i)
                try:
                    out["opened"] = bool(cap.isOpened())
                    if out["opened"]:
                        ok, image = cap.read()
                        out["frame"] = list(image.shape[1::-1]) if ok and image is not None else None
                finally:
                    cap.release()
            except Exception as exc:
                out["error"] = _first_line(exc)

        worker = threading.Thread(target=probe, daemon=True, name=f"doctor-camera-{index}")
        worker.start()
        worker.join(timeout)
        if worker.is_alive():
            outcome["error"] = f"no answer in {timeout:g} s (held by another process, or a hung driver)"
        elif outcome["opened"] and outcome["frame"] is None and not outcome["error"]:
            outcome["error"] = "opened but gave no frame (busy?)"
        results.append(outcome)
    report.sections["cameras"] = results
