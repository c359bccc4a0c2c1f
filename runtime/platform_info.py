"""Facts about the box: CPU model and the flags low-precision speed depends on, and, on a Jetson, the module and
its L4T / JetPack release. Used by edge-doctor and beside every edge-bench number."""
from __future__ import annotations

import os
import platform
import re

CPU_FLAGS = ("avx2", "fma", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "avx512_fp16", "amx_tile",
             "amx_bf16", "amx_int8",   # x86: what low-precision CPU speed depends on
             "asimd", "asimddp", "i8mm", "bf16", "sve")  # Arm (Jetson Orin: asimddp, no i8mm/bf16)
# L4T release → JetPack (NVIDIA's release notes); other releases are shown as "L4T x.y.z".
JETPACK = {"36.4.4": "6.2.1", "36.4.3": "6.2", "36.4.0": "6.1", "36.3.0": "6.0", "36.2.0": "6.0 DP",
           "35.6.1": "5.1.5", "35.6.0": "5.1.4", "35.5.0": "5.1.3", "35.4.1": "5.1.2", "35.3.1": "5.1.1",
           "35.2.1": "5.1", "35.1.0": "5.0.2", "32.7.6": "4.6.6", "32.7.5": "4.6.5", "32.7.4": "4.6.4"}


def cpu_info(cpuinfo: str = "/proc/cpuinfo") -> dict:
    """{"model", "flags"}: model name and which of CPU_FLAGS it has ([] where /proc/cpuinfo is not readable)."""
    model, present = platform.processor() or platform.machine(), []
    try:
        with open(cpuinfo) as fh:
            lines = fh.read().splitlines()
    except OSError:
        return {"model": model, "flags": []}
    for key in ("model name", "Model", "Hardware", "CPU part"):
        found = next((line.split(":", 1)[1].strip() for line in lines if line.split(":")[0].strip() == key), None)
        if found:
            model = found
            break
    for key in ("flags", "Features"):  # x86, Arm
        present = next((line.split(":", 1)[1].split() for line in lines if line.split(":")[0].strip() == key), [])
        if present:
            break
    return {"model": model, "flags": [f for f in CPU_FLAGS if f in present]}


def jetson_info(root: str = "/") -> dict | None:
    """{"model", "l4t", "jetpack"} on a Jetson (from /etc/nv_tegra_release and the device tree), None elsewhere."""
    try:
        with open(os.path.join(root, "etc/nv_tegra_release")) as fh:
            release = fh.readline()
    except OSError:
        return None
    match = re.search(r"R(\d+)\s*\(release\),\s*REVISION:\s*([\d.]+)", release)
    l4t = None
    if match:
        revision = match.group(2).split(".")
        l4t = ".".join([match.group(1), *revision, "0"][:3])
    model = None
    try:
        with open(os.path.join(root, "proc/device-tree/model"), "rb") as fh:
            model = fh.read().rstrip(b"\0").decode(errors="replace").strip() or None
    except OSError:
        pass
    jetpack = JETPACK.get(l4t or "")
    if jetpack is None and l4t:
        jetpack = {"36": "6.x", "35": "5.x", "32": "4.x"}.get(l4t.split(".")[0])
    return {"model": model, "l4t": l4t, "jetpack": jetpack}
