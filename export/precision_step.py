"""The FP16/INT8 step: write model.<precision>.onnx from the FP32 ONNX into a folder and gate it against FP32.

A leaf of the orchestrator (``pipeline``): explicit parameters in, (file name, manifest entry, report) out. It needs
no torch, so it also runs on an existing export (``--from-onnx DIR --precision int8 --calib-data …``).
"""
from __future__ import annotations

import logging
import os

import numpy as np

from clipad.runtime.errors import ClipadError
from clipad.runtime.manifest import FileEntry, PrecisionReport, file_entry, precision_file

from .options import CalibrationOptions

log = logging.getLogger("clipad")


def cache_dir() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "clipad", "calibration")


def make_precision(precision: str, fp32_file: str, out_dir: str, verify: tuple[np.ndarray, list[str]],
                   batch: tuple[int, int], image_size: int, calibration: CalibrationOptions,
                   accept_accuracy_loss: bool) -> tuple[str, FileEntry, PrecisionReport]:
    """Write ``out_dir/model.<precision>.onnx`` and gate it; a failing gate raises unless accepted.

    The gate images are ``verify``; for INT8 without --verify-images (``verify`` is None) every fifth calibration
    image is held back instead.
    """
    from clipad.calibration.images import load_set, split_holdout

    from . import precision as conversions
    from .onnx_export import OPSET

    name = precision_file(precision)
    dst = os.path.join(out_dir, name)
    if precision == "int8":
        if not calibration.data:
            raise ClipadError(INT8_NEEDS_CALIBRATION)
        calib, calib_names = load_set(calibration.data, image_size, cache_dir(), min_images=2)
        if verify is None:
            calib, calib_names, gate_data, gate_names = split_holdout(calib, calib_names)
        else:
            gate_data, gate_names = verify
        log.info("[3b] INT8 calibration (%s) on %d image(s) …", calibration.method, len(calib))
        conversion = conversions.to_int8(fp32_file, dst, calib, calibration.method, batch[1],
                                         high_precision=calibration.high_precision, cache_dir=cache_dir(),
                                         keep_float=tuple(calibration.keep_float))
        conversion["calibration_data"] = os.path.abspath(calibration.data)
    elif precision == "int8-cpu":
        gate_data, gate_names = verify
        log.info("[3b] INT8 for CPUs (dynamic quantization of the linear layers) …")
        conversion = conversions.to_int8_dynamic(fp32_file, dst)
    else:
        gate_data, gate_names = verify
        log.info("[3b] FP16 conversion …")
        conversion = conversions.to_fp16(fp32_file, dst)
    log.info("[3c] %s accuracy gate on %d image(s) …", precision.upper(), len(gate_data))
    report = conversions.precision_gate(precision, fp32_file, dst, gate_data,
                                        [os.path.basename(n) for n in gate_names], batch)
    c = report.comparison
    log.info("      map Pearson min %s, score Spearman %s, score max|Δ| %.2e",
             "n/a" if c.map_pearson_min is None else f"{c.map_pearson_min:.5f}",
             "n/a" if c.score_spearman is None else f"{c.score_spearman:.4f}", c.image_score.max_abs)
    if not report.passed:
        failures = "; ".join(report.failures)
        if not accept_accuracy_loss:
            raise ClipadError(f"{precision.upper()} accuracy gate failed: {failures}; nothing written "
                              f"(--accept-accuracy-loss to keep it anyway)")
        log.warning("WARNING: %s accuracy gate failed (%s); kept because of --accept-accuracy-loss",
                    precision.upper(), failures)
        report.accepted_despite_failure = True
    opset = conversions.INT8_FP16_OPSET if precision == "int8" and calibration.high_precision == "fp16" else OPSET
    entry = file_entry(dst, "int8" if precision == "int8-cpu" else precision, opset)
    entry.target = "cpu" if precision == "int8-cpu" else None
    return name, entry, PrecisionReport(gate=report, conversion=conversion)


INT8_NEEDS_CALIBRATION = "--precision int8 needs --calib-data DIR (a folder of normal images, ≥100 recommended)"
