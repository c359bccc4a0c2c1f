"""What the base install leaves to an extra (ONNX Runtime, OpenCV), and the one-line messages when it is missing.

The base install carries neither: pip cannot let an extra remove a base dependency, and either package from the index
breaks a GPU box or a Jetson (the CPU ``onnxruntime`` overwrites ``onnxruntime-gpu``'s files; the index's OpenCV
shadows JetPack's GStreamer build). ``[cpu]``, ``[gpu]`` or JetPack provide them.
"""
from __future__ import annotations

import importlib.metadata
import logging
import platform

log = logging.getLogger("clipad")

# Every distribution that installs the ``onnxruntime`` package (two of them overwrite each other's files).
ONNXRUNTIME_DISTRIBUTIONS = ("onnxruntime", "onnxruntime-gpu", "onnxruntime-openvino", "onnxruntime-directml",
                             "onnxruntime-qnn", "onnxruntime-training", "ort-nightly", "ort-nightly-gpu")
OPENCV_DISTRIBUTIONS = ("opencv-python", "opencv-python-headless", "opencv-contrib-python",
                        "opencv-contrib-python-headless")
MISSING = {
    "onnxruntime": "ONNX Runtime is not installed: pip install 'clipad-edge[cpu]' on a CPU box or "
                   "'clipad-edge[gpu]' with an NVIDIA GPU (never both); on a Jetson install NVIDIA's onnxruntime-gpu "
                   "wheel for your JetPack (README: Installing on a Jetson)",
    "cv2": "OpenCV is not installed: pip install 'clipad-edge[cpu]' (or '[gpu]'); on a Jetson use JetPack's OpenCV "
           "(python3-opencv, built with GStreamer) from a venv made with --system-site-packages",
}


def missing_module_message(name: str | None) -> str | None:
    """The install hint for a module the base install leaves out, None for any other module."""
    return MISSING.get((name or "").split(".")[0])


def installed(distributions) -> dict[str, str]:
    out = {}
    for dist in distributions:
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    return out


def onnxruntime_distributions() -> dict[str, str]:
    return installed(ONNXRUNTIME_DISTRIBUTIONS)


def two_onnxruntimes_fix(dists: dict[str, str]) -> str:
    keep = next((d for d in dists if d != "onnxruntime"), None) or sorted(dists)[0]
    others = " ".join(d for d in dists if d != keep)
    again = (f"install NVIDIA's {keep} wheel for your JetPack again" if platform.machine() == "aarch64"
             else f"pip install {keep}=={dists[keep]}")
    return f"pip uninstall -y {' '.join(dists)} && {again}  (keeps {keep}; {others} overwrote its files)"


_warned = False


def warn_if_two_onnxruntimes() -> None:
    """Once per process: two ONNX Runtime distributions share one ``onnxruntime`` folder, so which one runs is
    whichever pip wrote last, while ``pip show`` lists both."""
    global _warned
    dists = onnxruntime_distributions()
    if len(dists) > 1 and not _warned:
        _warned = True
        log.warning("%s are installed together and overwrite each other's files; fix: %s (edge-doctor checks)",
                    " and ".join(f"{d} {v}" for d, v in dists.items()), two_onnxruntimes_fix(dists))


def onnxruntime_upgrade_hint(minimum: str) -> str:
    """`pip install -U` for the ONNX Runtime distribution that is installed (never adds the CPU one to a GPU box)."""
    dists = onnxruntime_distributions()
    dist = next((d for d in dists if d != "onnxruntime"), "onnxruntime")
    return f"pip install -U '{dist}>={minimum}'"
