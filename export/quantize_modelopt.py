"""The INT8 Q/DQ file placed and calibrated by NVIDIA ModelOpt's ONNX PTQ (``modelopt.onnx.quantization``, the
quantizer NVIDIA ships for TensorRT): ``export-engine --precision int8 --int8-quantizer modelopt``.

ModelOpt pins its own onnx and onnxruntime-gpu (and needs torch), so it never shares the user's environment: it runs
in a Python of its own, named by ``CLIPAD_MODELOPT_PYTHON`` (``scripts/setup_env.sh`` makes ``.venv-modelopt``), as a
child process that reads a job file and writes the Q/DQ file (``modelopt_worker.py``). Same policy as the other
quantizers: only our linear layers (``nodes_to_quantize``), calibrated on the CPU provider, the remainder FP32 in
ModelOpt and then FP16 with our keep-list here; its attention Q/DQ is off (our attention products are not linear
layers)."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile

import numpy as np

from clipad.runtime.errors import ClipadError

from .modelopt_worker import PROGRESS

ENV = "CLIPAD_MODELOPT_PYTHON"
PIN = "nvidia-modelopt[onnx]==0.47.0"
METHODS = {"minmax": "max", "entropy": "entropy"}   # our --calib-method → ModelOpt's INT8 calibration_method
_INSTALL = (f"python3 -m venv ~/.clipad-modelopt && ~/.clipad-modelopt/bin/pip install '{PIN}', then "
            f"{ENV}=~/.clipad-modelopt/bin/python")


def python() -> str:
    """The interpreter of ModelOpt's environment (``$CLIPAD_MODELOPT_PYTHON``), or a one-line ClipadError."""
    path = os.environ.get(ENV, "").strip()
    if not path:
        raise ClipadError(f"--int8-quantizer modelopt runs NVIDIA ModelOpt in an environment of its own (it pins "
                          f"onnxruntime-gpu and torch); set {ENV} to its python: {_INSTALL}")
    path = os.path.expanduser(path)
    found = shutil.which(path)
    if not found:
        raise ClipadError(f"{ENV}={path}: no such executable ({_INSTALL})")
    return found


def available() -> str | None:
    """None when ModelOpt's environment answers, else the one-line reason."""
    try:
        py = python()
    except ClipadError as exc:
        return str(exc)
    try:
        probe = subprocess.run([py, "-I", "-c", "from importlib.metadata import version; print(version("
                                "'nvidia-modelopt'))"], capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"{ENV}={py}: does not run ({exc})"
    if probe.returncode != 0:
        return f"{ENV}={py}: nvidia-modelopt is not installed there (pip install '{PIN}')"
    return None


def method_for(method: str) -> str:
    if method not in METHODS:
        raise ClipadError(f"--calib-method {method}: ModelOpt calibrates INT8 with {' or '.join(METHODS)} only")
    return METHODS[method]


def quantize(src: str, calib: np.ndarray, nodes: list[str], method: str, work_dir: str
             ) -> tuple[object, str, int]:
    """ModelOpt's Q/DQ of ``nodes`` (and nothing else) in FP32 → (ModelProto, ModelOpt's version, calibration
    batches it read over all its passes). The job's
    files live in a temporary folder in ``work_dir`` (beside the output, so a full disk fails there and nothing
    half-written is left). The caller has checked ``available()``."""
    import onnx

    from .onnx_graph import INPUT_NAME

    py, how = python(), method_for(method)
    with tempfile.TemporaryDirectory(prefix=".modelopt-", dir=work_dir) as tmp:
        job = {"source": os.path.abspath(src), "calibration": os.path.join(tmp, "calibration.npy"),
               "input": INPUT_NAME, "nodes": list(nodes), "method": how, "per_node": False,
               "output": os.path.join(tmp, "qdq.onnx"), "result": os.path.join(tmp, "result.json")}
        np.save(job["calibration"], np.ascontiguousarray(calib), allow_pickle=False)
        with open(os.path.join(tmp, "job.json"), "w") as f:
            json.dump(job, f)
        worker = os.path.join(os.path.dirname(os.path.abspath(__file__)), "modelopt_worker.py")
        log_file = os.path.join(tmp, "modelopt.log")
        with open(log_file, "w") as log:
            # -I: the worker's folder (this package) stays off sys.path, so nothing of clipad shadows ModelOpt's.
            code = _run_with_progress([py, "-I", worker, os.path.join(tmp, "job.json")], log)
        if code < 0:
            import signal

            name = signal.Signals(-code).name
            raise ClipadError(f"ModelOpt quantization was killed by {name}" + (
                " (out of memory? it held 16 GB at ViT-L@518)" if name == "SIGKILL" else ""))
        if code != 0 or not os.path.isfile(job["result"]):
            raise ClipadError(f"ModelOpt quantization failed (exit {code}): {_last_error(log_file)}")
        with open(job["result"]) as f:
            result = json.load(f)
        return onnx.load(job["output"]), result["modelopt"], int(result.get("calibration_batches", 0))


def _run_with_progress(command: list[str], log) -> int:
    """Run the worker; its progress lines become a bar (one per calibration pass), everything else goes to ``log``.
    Ctrl-C or any error here ends the child too."""
    import logging

    from tqdm import tqdm

    bar, show = None, logging.getLogger("clipad").isEnabledFor(logging.INFO)
    child = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=log, text=True, errors="replace")
    try:
        for line in child.stdout:
            words = line.split()
            if len(words) == 3 and words[0] == PROGRESS and words[1].isdigit() and words[2].isdigit():
                served, per_pass = int(words[1]), max(int(words[2]), 1)
                if bar is None or served % per_pass == 1 or per_pass == 1:
                    if bar is not None:
                        bar.close()
                    bar = tqdm(total=per_pass, unit="batch", leave=False, disable=not show,
                               desc=f"ModelOpt calibration, pass {(served - 1) // per_pass + 1}")
                bar.update(1)
            else:
                log.write(line)
        return child.wait()
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
        if bar is not None:
            bar.close()


def _last_error(log_file: str) -> str:
    with open(log_file, errors="replace") as f:
        lines = [line.strip() for line in f if line.strip()]
    errors = [line for line in lines if "Error" in line or "error" in line]
    return ((errors or lines or ["no output"])[-1])[:300]

