"""torch → ONNX (opset 18, explicit-matmul attention, single LayerNormalization nodes) and the parity gate."""
from __future__ import annotations

import logging
import os
import warnings

import numpy as np
import torch

from clipad.runtime.errors import ClipadError
from clipad.runtime.preprocess import pad_batch

from .models.factory import BuiltDetector

OPSET = 18
INPUT_NAME = "images"
OUTPUT_NAMES = ("anomaly_map", "image_score")
MAP_RANGE_TOLERANCE = 1e-4   # max |Δmap| / (max(map) − min(map))
SCORE_TOLERANCE = 1e-5       # max |Δscore|


def export_onnx(built: BuiltDetector, path: str, batch_min: int, batch_max: int) -> None:
    """Write ``built.module`` as ONNX: uint8 NHWC input, float32 outputs, batch fixed or dynamic in [min, max]."""
    size = built.image_size
    example = torch.zeros(batch_max if batch_min == batch_max else max(2, batch_min), size, size, 3,
                          dtype=torch.uint8)
    dynamic = None
    if batch_min != batch_max:
        batch = torch.export.Dim("batch", min=batch_min, max=batch_max)
        dynamic = ({0: batch},)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name in ("torch.onnx", "torch.export", "onnxscript", "onnx_ir"):
            logging.getLogger(name).setLevel(logging.ERROR)
        try:
            program = torch.onnx.export(built.module, (example,), dynamo=True, opset_version=OPSET,
                                        input_names=[INPUT_NAME], output_names=list(OUTPUT_NAMES),
                                        dynamic_shapes=dynamic, optimize=True, verbose=False)
        except Exception as exc:  # the exporter raises many types; the message is what matters
            raise ClipadError(f"ONNX export failed: {str(exc).strip().splitlines()[0][:300]}") from exc
    program.save(path, external_data=False)
    check_graph(path)


def check_graph(path: str) -> None:
    """The deployment rules the graph must follow (TensorRT 10.3 … 11.x)."""
    import onnx

    model = onnx.load(path, load_external_data=False)
    opset = max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
    ops = {n.op_type for n in model.graph.node}
    for fn in model.functions:
        ops |= {n.op_type for n in fn.node}
    bad = ops & {"Attention", "If", "Loop", "Scan"}
    if bad or not 17 <= opset <= 20:
        raise ClipadError(f"exported graph breaks TensorRT rules: opset {opset}, ops {sorted(bad)}")


def ort_session(path: str, threads: int | None = None):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = threads
    return ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])


def parity_report(built: BuiltDetector, onnx_path: str, batch_u8: np.ndarray, batch_max: int) -> dict:
    """Torch reference vs ONNX Runtime (CPU) on the verify images; raises ClipadError past the tolerances."""
    from .reference import TorchReference

    ref = TorchReference(built)
    session = ort_session(onnx_path)
    worst = {name: {"max_abs": 0.0, "max_rel": 0.0} for name in OUTPUT_NAMES}
    ranges = []
    for start in range(0, len(batch_u8), batch_max):
        chunk = batch_u8[start:start + batch_max]
        if session.get_inputs()[0].shape[0] == batch_max:
            chunk = pad_batch(chunk, batch_max)
        torch_out = ref.run_batch(chunk)
        ort_out = session.run(list(OUTPUT_NAMES), {INPUT_NAME: chunk})
        for name, t, o in zip(OUTPUT_NAMES, torch_out, ort_out):
            diff = np.abs(t.astype(np.float64) - o)
            worst[name]["max_abs"] = max(worst[name]["max_abs"], float(diff.max()))
            worst[name]["max_rel"] = max(worst[name]["max_rel"],
                                         float((diff / np.maximum(np.abs(t), 1e-12)).max()))
        ranges.append(float(torch_out[0].max() - torch_out[0].min()))
    map_range = max(max(ranges), 1e-12)
    report = {"images": int(len(batch_u8)), "backend": "onnxruntime CPUExecutionProvider", **worst,
              "map_range": map_range,
              "map_error_over_range": worst["anomaly_map"]["max_abs"] / map_range,
              "limits": {"map_error_over_range": MAP_RANGE_TOLERANCE, "image_score_max_abs": SCORE_TOLERANCE}}
    report["passed"] = (report["map_error_over_range"] <= MAP_RANGE_TOLERANCE
                        and worst["image_score"]["max_abs"] <= SCORE_TOLERANCE)
    return report


def file_entry(path: str, precision: str) -> dict:
    from clipad.runtime.manifest import sha256_file

    return {"sha256": sha256_file(path), "bytes": os.path.getsize(path), "precision": precision,
            "format": "onnx", "opset": OPSET}
