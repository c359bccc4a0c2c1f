"""A REAL TensorRT engine, built and run on this machine's GPU, against the FP32 ONNX through the same comparator and
gate as export-engine's precision gates. Runs wherever TensorRT (or TensorRT-RTX for an RTX-supported GPU) and a
CUDA GPU exist; skipped with the reason elsewhere (CI has no GPU: tests/test_tensorrt_plumbing.py covers the
backend's bookkeeping against simulated modules there)."""
from __future__ import annotations

import pytest

from clipad.calibration.images import load_verify_set
from clipad.calibration.samples import write_samples
from clipad.export.onnx_export import run_onnx
from clipad.runtime.backends import cuda_buffers
from clipad.runtime.compare import PRECISION_LIMITS, compare, gate
from clipad.runtime.detector import Detector
from tiny_fixtures import export_tiny


def _can_build_and_run() -> str | None:
    """None when an engine can be built and run here, else why not."""
    from clipad.export.tensorrt_build import RTX_TARGETS, resolve_flavor

    gpu = cuda_buffers.gpu_info()
    if gpu is None:
        return f"no CUDA GPU here ({cuda_buffers.no_gpu_reason()})"
    try:
        flavor, _, _ = resolve_flavor("auto", None)
    except Exception as exc:  # noqa: BLE001  (the reason is what matters)
        return f"TensorRT cannot build here: {exc}"
    if flavor is None:
        return "neither tensorrt nor tensorrt_rtx is installed"
    if flavor == "rtx" and gpu["compute_capability"] not in RTX_TARGETS:
        return f"only TensorRT-RTX is installed and it does not support sm {gpu['compute_capability']}"
    return None


REASON = _can_build_and_run()
pytestmark = pytest.mark.skipif(REASON is not None, reason=f"needs TensorRT and a GPU: {REASON}")

# FP32 engines may use TF32 tensor cores: they are held to the FP16 limits, not to bit parity.
LIMITS = {"fp32": PRECISION_LIMITS["fp16"], "fp16": PRECISION_LIMITS["fp16"]}


@pytest.mark.parametrize("precision, cuda_graph", [("fp32", False), ("fp16", False), ("fp16", True)])
def test_engine_matches_fp32_onnx(tiny_files, tmp_path, precision, cuda_graph):
    out = tmp_path / "m"
    args = ["--dynamic-batch", "1:2"] + ([] if precision == "fp32" else ["--precision", precision])
    assert export_tiny(tiny_files, out, "aaclip", args) == 0   # builds the engine: TensorRT can build here
    folder = tmp_path / "verify"
    write_samples(str(folder), count=5, seed=11)
    data, names = load_verify_set(str(folder), 56)
    reference = run_onnx(str(out / "model.onnx"), data, (1, 2))
    with Detector.open(str(out), backend="tensorrt", cuda_graph=cuda_graph) as det:
        assert det.backend.entry.precision == precision
        candidate = det.run(data)
        again = det.run(data)   # a second pass replays the CUDA graph when there is one
    report = gate(compare(reference, candidate, names), LIMITS[precision], f"engine-{precision}",
                  "onnxruntime fp32", det.backend.description)
    assert report.passed, report.failures
    assert report.comparison.nonfinite_images == {"reference": [], "candidate": []}
    assert gate(compare(candidate, again, names), LIMITS[precision], "replay", "first", "second").passed

