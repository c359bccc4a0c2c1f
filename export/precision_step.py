"""The precision step: write a precision's file from the FP32 ONNX into a folder and gate it against FP32.

A leaf of the orchestrator (``pipeline``): explicit parameters in, (file name, manifest entry, report) out. It needs
no torch, so it also runs on an existing export (``--from-onnx DIR --precision int8 --calib-data …``).
"""
from __future__ import annotations

import contextlib
import logging
import os

import numpy as np

from clipad.runtime import precisions
from clipad.runtime.errors import ClipadError
from clipad.runtime.manifest import FileEntry, PrecisionReport, file_entry

from .options import CalibrationOptions

log = logging.getLogger("clipad")
INT8_CONVERSIONS = ("static-qdq", "dynamic-int8", "weight-int8")
DECISION_NORMALS = 40   # normal images run through both sides for the OK/NG check (ViT-L@518: ~5 min on 2 cores)


def cache_dir() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "clipad", "calibration")


def make_precision(precision: str, fp32_file: str, out_dir: str, verify: tuple[np.ndarray, list[str]] | None,
                   batch: tuple[int, int], image_size: int, calibration: CalibrationOptions,
                   accept_accuracy_loss: bool, decision_rule: str = "map_max"
                   ) -> tuple[str, FileEntry, PrecisionReport]:
    """Write ``out_dir/<the precision's file>`` by its registry ``conversion`` and gate it; a failing gate raises
    unless accepted.

    The gate images are ``verify``; for a precision made from calibration data without --verify-images (``verify``
    is None) every fifth calibration image is held back instead. With --calib-data (any precision) the gate also
    compares OK/NG decisions at each side's own threshold from those normal images (at most ``DECISION_NORMALS``,
    spread evenly), and they decide instead of the score rank.
    """
    from clipad.calibration.images import load_set, split_holdout

    wanted = precisions.get(precision)
    if wanted.conversion is None:
        raise ClipadError(f"--precision {precision}: export-engine makes no file for it ({wanted.summary})")
    dst = os.path.join(out_dir, wanted.file)
    gate_data, gate_names = verify if verify is not None else (None, None)
    if wanted.needs_calibration_data:
        if not calibration.data:
            raise ClipadError(needs_calibration(precision))
        calib, calib_names = load_set(calibration.data, image_size, cache_dir(), min_images=2)
        if verify is None:
            calib, calib_names, gate_data, gate_names = split_holdout(calib, calib_names)
        how = calibration.method
        if wanted.conversion == "static-qdq":
            how = {"nncf": "NNCF", "modelopt": f"ModelOpt, {how}"}.get(calibration.quantizer, how)
        log.info("[3b] %s calibration (%s) on %d image(s) …", precision.upper(), how, len(calib))
    else:
        calib = None
        if calibration.data:
            calib, calib_names = load_set(calibration.data, image_size, cache_dir(), min_images=2,
                                          purpose=f"the {precision.upper()} OK/NG gate")
        log.info("[3b] %s conversion …", precision.upper())
    with _weights_as_constants(fp32_file, out_dir) as src:
        return _convert_and_gate(precision, wanted, src, fp32_file, dst, calib, gate_data, gate_names, batch,
                                 image_size, calibration, accept_accuracy_loss, decision_rule)


@contextlib.contextmanager
def _weights_as_constants(fp32_file: str, out_dir: str):
    """The FP32 file to convert from: ``fp32_file`` itself, or, for an export made before the exporter folded its
    constant weight reads (Crane's transposed out-projections, AA-CLIP's gathered adapters), a folded working copy,
    so every precision sees those layers as linear layers (same numbers; removed afterwards)."""
    import tempfile

    import onnx

    from .onnx_graph import fold_constant_weight_reads

    model = onnx.load(fp32_file)
    folded = fold_constant_weight_reads(model)
    if not folded:
        del model
        yield fp32_file
        return
    with tempfile.TemporaryDirectory(prefix=".folded-", dir=out_dir) as tmp:
        path = os.path.join(tmp, "model.onnx")
        try:
            onnx.save(model, path)
        except OSError as exc:   # a full disk: the folder goes with the context; nothing of the export is touched
            raise ClipadError(f"{out_dir}: cannot write the folded working copy of {os.path.basename(fp32_file)} "
                              f"({exc.strerror or exc}); free {os.path.getsize(fp32_file) / 1e9:.1f} GB there or "
                              "export again") from None
        del model
        log.info("      %d constant weight read(s) folded into a working copy of the FP32 file (an export made "
                 "before the exporter folded them; export again to skip this)", folded)
        yield path


def _convert_and_gate(precision, wanted, src, fp32_file, dst, calib, gate_data, gate_names, batch, image_size,
                      calibration, accept_accuracy_loss, decision_rule):
    from clipad.calibration.images import evenly_spaced

    from . import convert
    from .onnx_export import OPSET

    def convert_file(keep_nodes: tuple[str, ...] = ()) -> dict:
        if wanted.conversion == "float16":
            return convert.to_fp16(src, dst)
        if wanted.conversion == "static-qdq":
            made = convert.to_int8(src, dst, calib, calibration.method, batch[1],
                                   high_precision=wanted.int8_remainder or calibration.high_precision,
                                   cache_dir=cache_dir(),
                                   keep_float=tuple(calibration.keep_float), keep_nodes=keep_nodes,
                                   quantizer=calibration.quantizer, smooth_alpha=calibration.smooth_alpha,
                                   centre=calibration.shift)
            made["calibration_data"] = os.path.abspath(calibration.data)
            return made
        if wanted.conversion == "dynamic-int8":
            return convert.to_int8_dynamic(src, dst, keep_nodes=keep_nodes,
                                           keep_float=tuple(calibration.keep_float))
        if wanted.conversion == "weight-int8":
            from .convert_weight_int8 import to_int8_dynamic_bf16

            return to_int8_dynamic_bf16(src, dst, wanted.openvino_dynamic_quantization, keep_nodes=keep_nodes,
                                        keep_float=tuple(calibration.keep_float))
        if wanted.conversion == "bfloat16":
            from .convert_bf16 import to_bf16

            return to_bf16(src, dst, attention=True)
        raise ClipadError(f"internal error: no converter for {wanted.conversion!r}")

    conversion = convert_file()
    normals = None
    if calib is not None:
        normals = evenly_spaced(calib, DECISION_NORMALS)
    log.info("[3c] %s accuracy gate on %d image(s)%s …", precision.upper(), len(gate_data),
             f" and OK/NG decisions from {len(normals)} normal image(s)" if normals is not None else "")
    gate_names = [os.path.basename(n) for n in gate_names]

    from .gate_reference import RecordedReference
    from .onnx_export import onnx_backend

    reference = RecordedReference(lambda: onnx_backend(fp32_file, image_size, batch), batch)

    def run_gate(subset: np.ndarray | None = None):
        """The gate on all gate images, or on ``subset`` (indices) of them; FP32 outputs recorded across calls."""
        data, names = ((gate_data, gate_names) if subset is None
                       else (gate_data[subset], [gate_names[i] for i in subset]))
        return convert.precision_gate(precision, fp32_file, dst, data, names, batch, image_size, normals,
                                      decision_rule, reference=reference,
                                      map_pearson_min=calibration.map_min if wanted.conversion in INT8_CONVERSIONS
                                      else None)

    report = run_gate()
    if not report.passed and wanted.conversion in INT8_CONVERSIONS and normals is not None \
            and calibration.sensitivity:
        from .int8_sensitivity_step import keep_sensitive_float

        static = (static_activation_absmax(src, calib, calibration, batch[1])
                  if wanted.conversion == "static-qdq" else None)
        report, conversion = keep_sensitive_float(precision, src, conversion, convert_file, run_gate,
                                                  report, normals, gate_data, batch[0], decision_rule, static)
    c, d = report.comparison, report.decision
    log.info("      map Pearson min %s, score Spearman %s%s, score max|Δ| %.2e%s",
             "n/a" if c.map_pearson_min is None else f"{c.map_pearson_min:.5f}",
             "n/a" if c.score_spearman is None else f"{c.score_spearman:.4f}",
             f" (95% CI {d.spearman_ci95[0]:.3f}–{d.spearman_ci95[1]:.3f})" if d and d.spearman_ci95 else "",
             c.image_score.max_abs,
             f", patch_features cosine min {c.patch_features.cosine_min:.5f} (few-shot)" if c.patch_features else "")
    if d is not None:
        log.info("      OK/NG at α %s: flips on %d held-back normal images %s, on %d verify images %s; score error "
                 "/ margin %s", "/".join(f"{a:g}" for a in d.alphas), d.held_back_images, d.held_back_flips,
                 d.verify_images, d.verify_flips,
                 "n/a" if d.score_error_over_margin is None else f"{d.score_error_over_margin:.3f}")
        for note in d.notes:
            log.info("      %s", note)
    enforce_gate(report, f"{precision.upper()} accuracy gate", accept_accuracy_loss)
    entry = file_entry(dst, precision, conversion.pop("opset", None) or OPSET)
    return wanted.file, entry, PrecisionReport(gate=report, conversion=conversion)


def static_activation_absmax(src: str, calib: np.ndarray, calibration: CalibrationOptions, batch: int
                             ) -> dict[str, float] | None:
    """The calibrated range (max |value|) per activation tensor that our static Q/DQ file was made with (the
    conversion's cached ranges), for the sensitivity pass to round at; None where the file's scales are not those
    ranges (NNCF or ModelOpt place their own; SmoothQuant and the centring shift transform the graph first)."""
    from .convert import calibrate
    from .options import QUANTIZERS

    if calibration.quantizer != QUANTIZERS[0] or calibration.smooth_alpha is not None or calibration.shift:
        return None
    _, _, ranges = calibrate(src, calib, calibration.method, batch, cache_dir())
    return {name: float(max(abs(float(lo)), abs(float(hi)))) for name in ranges.keys()
            for lo, hi in [ranges[name].range_value]}


def needs_calibration(precision: str) -> str:
    return f"--precision {precision} needs --calib-data DIR (a folder of normal images, ≥100 recommended)"


def enforce_gate(report, what: str, accept: bool, why: str = "") -> None:
    """A failed gate stops the export (one line, nothing written, ``why`` appended when the model kind knows a
    reason), unless ``accept`` (--accept-accuracy-loss): then it is a warning and the report says it was accepted."""
    if report.passed:
        return
    failures = "; ".join(report.failures)
    if not accept:
        raise ClipadError(f"{what} failed: {failures}; nothing written (--accept-accuracy-loss to keep it anyway)"
                          + (f"; {why}" if why else ""))
    log.warning("WARNING: %s failed (%s); kept because of --accept-accuracy-loss (recorded in the manifest)", what,
                failures)
    report.accepted_despite_failure = True
