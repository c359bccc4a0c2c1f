"""The FP16/INT8 step of ``export-engine``: write model.<precision>.onnx from the FP32 ONNX and gate it.

It runs inside a fresh export, or on an existing export directory (``--from-onnx DIR --precision int8 --calib-data
…``: no torch needed), e.g. to calibrate INT8 on the production line's own normal images.
"""
from __future__ import annotations

import logging
import os
import shutil
import tempfile

from clipad.runtime import manifest as manifest_io
from clipad.runtime.errors import ClipadError

log = logging.getLogger("clipad")


def cache_dir() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "clipad", "calibration")


def _gate_failure(gate: dict) -> str:
    rho = gate["score_spearman_min"]
    text = f"map Pearson min {gate['map_pearson_min']:.5f} (need ≥ {gate['limits']['map_pearson_min']})"
    if "score_spearman_min" in gate["limits"]:
        text += (f", score Spearman {rho:.4f}" if rho is not None else
                 ", score Spearman not computable (fewer than 3 verify images)")
        text += (f" (need ≥ {gate['limits']['score_spearman_min']}; FP32 score std over the images "
                 f"{gate['score_fp32_std']:.2e}, max|Δscore| {gate['score_max_abs']:.2e})")
    return text


def precision_step(args, image_size: int, tmp: str, fp32_file: str, verify, hi: int) -> tuple[dict, dict]:
    """Write model.fp16.onnx / model.int8.onnx into ``tmp`` and gate them against FP32.

    Returns (files entries, precisions report). The gate images are --verify-images if given; otherwise for INT8
    every fifth calibration image is held back, and FP16 uses the parity images.
    """
    from clipad.calibration.images import load_set, split_holdout

    from . import precision
    from .onnx_export import file_entry

    if args.precision == "fp32":
        return {}, {}
    gate_data, gate_names = verify
    if args.precision == "int8":
        if not args.calib_data:
            raise ClipadError("--precision int8 needs --calib-data DIR (a folder of normal images, ≥100 recommended)")
        calib, names = load_set(args.calib_data, image_size, cache_dir(), min_images=2)
        if not args.verify_images:
            calib, names, gate_data, gate_names = split_holdout(calib, names)
        log.info("[3b] INT8 calibration (%s) on %d image(s) …", args.calib_method, len(calib))
        info = precision.to_int8(fp32_file, os.path.join(tmp, "model.int8.onnx"), calib, args.calib_method, hi,
                                 high_precision=args.int8_high_precision, cache_dir=cache_dir(),
                                 keep_float=tuple(args.int8_keep_float))
        info["calibration_data"] = os.path.abspath(args.calib_data)
    else:
        log.info("[3b] FP16 conversion …")
        info = precision.to_fp16(fp32_file, os.path.join(tmp, "model.fp16.onnx"))
    name = f"model.{args.precision}.onnx"
    log.info("[3c] %s accuracy gate on %d image(s) …", args.precision.upper(), len(gate_data))
    gate = precision.accuracy_gate(args.precision, fp32_file, os.path.join(tmp, name), gate_data,
                                   [os.path.basename(n) for n in gate_names], hi)
    log.info("      map Pearson min %.5f, score Spearman %s, score max|Δ| %.2e", gate["map_pearson_min"],
             "n/a" if gate["score_spearman_min"] is None else f"{gate['score_spearman_min']:.4f}",
             gate["score_max_abs"])
    if not gate["passed"]:
        if not args.accept_accuracy_loss:
            raise ClipadError(f"{args.precision.upper()} accuracy gate failed: {_gate_failure(gate)}; nothing "
                              f"written (--accept-accuracy-loss to keep it anyway)")
        log.warning("WARNING: %s accuracy gate failed (%s); kept because of --accept-accuracy-loss",
                    args.precision.upper(), _gate_failure(gate))
        gate["accepted_despite_failure"] = True
    return {name: file_entry(os.path.join(tmp, name), args.precision)}, {args.precision: {**info, "gate": gate}}


def needs_precision_step(args, manifest: dict) -> bool:
    """--from-onnx: (re)make the precision's ONNX when it is missing, or when new calibration data is given."""
    if args.precision == "fp32":
        return False
    return f"model.{args.precision}.onnx" not in manifest["files"] or bool(args.calib_data)


def add_precision(args, model_dir: str) -> None:
    """Add (or redo) model.<precision>.onnx in an existing export, atomically; engines built from the old file of
    that precision are removed, since they no longer match it."""
    from .pipeline import verify_batch

    manifest = manifest_io.read(model_dir)
    if manifest["schema_version"] != manifest_io.SCHEMA_VERSION:
        raise ClipadError(f"{model_dir}: manifest schema {manifest['schema_version']} was written by another "
                          f"clipad-edge version; re-export with this one")
    fp32 = manifest_io.verify_file(model_dir, manifest, "model.onnx")
    size, hi = manifest["model"]["image_size"], manifest["batch"]["max"]
    verify = verify_batch(args.verify_images, size)
    tmp = tempfile.mkdtemp(prefix=".precision.partial-", dir=model_dir)
    try:
        files, report = precision_step(args, size, tmp, fp32, verify, hi)
        name = f"model.{args.precision}.onnx"
        stale = [e for e in manifest.get("engines", []) if e.get("precision") == args.precision]
        os.replace(os.path.join(tmp, name), os.path.join(model_dir, name))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    manifest["files"].update(files)
    manifest.setdefault("precisions", {}).update(report)
    manifest["engines"] = [e for e in manifest.get("engines", []) if e not in stale]
    manifest_io.write_json_atomic(os.path.join(model_dir, manifest_io.MANIFEST_NAME), manifest)
    for entry in stale:
        log.warning("removed %s: it was built from the previous %s", entry["file"], name)
        try:
            os.remove(os.path.join(model_dir, entry["file"]))
        except FileNotFoundError:
            pass
    log.info("%s written into %s", name, model_dir)
