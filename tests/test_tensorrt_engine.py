"""A REAL TensorRT engine, built and run on this machine's GPU, against the FP32 ONNX through the same comparator and
gate as export-engine's precision gates. Runs wherever TensorRT (or TensorRT-RTX for an RTX-supported GPU) and a
CUDA GPU exist; skipped with the reason elsewhere (CI has no GPU: tests/test_tensorrt_plumbing.py covers the
backend's bookkeeping against simulated modules there)."""
from __future__ import annotations

import pytest

from clipad.calibration.images import load_verify_set
from clipad.calibration.samples import write_samples
from clipad.runtime import precisions
from clipad.runtime.backends import cuda_buffers
from clipad.runtime.backends.registry import open_backend
from clipad.runtime.compare import compare, compare_runners, gate
from clipad.runtime.manifest import Manifest
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
LIMITS = {"fp32": precisions.get("fp16").gate, "fp16": precisions.get("fp16").gate}


@pytest.mark.parametrize("precision, cuda_graph", [("fp32", False), ("fp16", False), ("fp16", True)])
def test_engine_matches_fp32_onnx(tiny_files, tmp_path, precision, cuda_graph):
    out = tmp_path / "m"
    args = ["--dynamic-batch", "1:2"] + ([] if precision == "fp32" else ["--precision", precision])
    assert export_tiny(tiny_files, out, "aaclip", args) == 0   # builds the engine: TensorRT can build here
    folder = tmp_path / "verify"
    write_samples(str(folder), count=5, seed=11)
    data, names = load_verify_set(str(folder), 56)
    manifest = Manifest.read(str(out))
    reference = open_backend("onnxruntime", str(out), manifest)
    engine = open_backend("tensorrt", str(out), manifest, cuda_graph=cuda_graph)
    try:
        assert engine.entry.precision == precision
        comparison = compare_runners(reference, engine, data, names)
        first = engine.run(data[:2])
        again = engine.run(data[:2])   # a second pass replays the CUDA graph when there is one
    finally:
        engine.close()
        reference.close()
    report = gate(comparison, LIMITS[precision], f"engine-{precision}", "onnxruntime fp32", engine.description)
    assert report.passed, report.failures
    assert report.comparison.nonfinite_images == {"reference": [], "candidate": []}
    assert gate(compare(first, again, names[:2]), LIMITS[precision], "replay", "first", "second").passed

