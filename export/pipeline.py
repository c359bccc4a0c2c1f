"""The export run behind ``export-engine``: torch model → FP32 ONNX (+ FP16/INT8) → parity and accuracy gates →
manifest, written atomically; then an engine build when TensorRT can run here (see engine_step)."""
from __future__ import annotations

import datetime
import logging
import os
import platform
import resource
import shutil
import tempfile
import time

import numpy as np

from clipad import __version__
from clipad.runtime import manifest as manifest_io
from clipad.runtime.errors import ClipadError

log = logging.getLogger("clipad")


def batch_range(args) -> tuple[int, int]:
    if args.dynamic_batch:
        try:
            lo, hi = (int(v) for v in args.dynamic_batch.split(":"))
        except ValueError:
            raise ClipadError(f"--dynamic-batch {args.dynamic_batch!r}: expected MIN:MAX, e.g. 1:8") from None
        if not 1 <= lo < hi:
            raise ClipadError(f"--dynamic-batch {args.dynamic_batch}: need 1 <= MIN < MAX")
        return lo, hi
    n = 1 if args.batch is None else args.batch
    if n < 1:
        raise ClipadError(f"--batch {n}: must be at least 1")
    return n, n


def verify_batch(folder: str | None, size: int) -> tuple[np.ndarray, list[str]]:
    from clipad.runtime.preprocess import prepare
    from clipad.runtime.samples import synthetic_image

    if folder is None:
        images = [synthetic_image(i, seed=7)[0] for i in range(3)]
        return np.stack([prepare(im, size) for im in images]), ["generated:3"]
    if not os.path.isdir(folder):
        raise ClipadError(f"--verify-images {folder}: not a directory")
    names = sorted(f for f in os.listdir(folder) if not f.startswith(".")
                   and os.path.isfile(os.path.join(folder, f)))
    if not names:
        raise ClipadError(f"--verify-images {folder}: no files")
    return np.stack([prepare(os.path.join(folder, f), size) for f in names]), names


def source_entry(path: str | None) -> dict | None:
    if not path:
        return None
    if os.path.isdir(path):
        files = sorted(f for f in os.listdir(path) if f.endswith(".pth"))
        return {"path": os.path.abspath(path),
                "files": {f: manifest_io.sha256_file(os.path.join(path, f)) for f in files}}
    return {"path": os.path.abspath(path), "sha256": manifest_io.sha256_file(path)}


def versions() -> dict:
    import onnx
    import onnxruntime
    import open_clip
    import torch

    return {"clipad-edge": __version__, "python": platform.python_version(), "torch": torch.__version__,
            "open_clip": open_clip.__version__, "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__}


def build_manifest(args, built, lo, hi, onnx_file, parity, seconds) -> dict:
    from .onnx_export import INPUT_NAME, OPSET, file_entry
    from clipad.runtime.preprocess import OPENAI_MEAN, OPENAI_STD

    s, k = built.image_size, len(built.class_names)
    batch_dim = lo if lo == hi else "batch"
    return {
        "schema_version": manifest_io.SCHEMA_VERSION,
        "model": {"kind": built.kind, "arch": built.arch, "image_size": s, "class_names": built.class_names,
                  "prompt_names": built.prompt_names, "domain": built.domain,
                  "anchor_sha256": built.anchor_sha256, **built.info},
        "input": {"name": INPUT_NAME, "dtype": "uint8", "layout": "NHWC", "shape": [batch_dim, s, s, 3],
                  "color": "RGB",
                  "host_preprocessing": "PIL bicubic resize (antialiased when shrinking) to SxS, aspect squashed",
                  "in_graph": {"scale": 1 / 255, "mean": list(OPENAI_MEAN), "std": list(OPENAI_STD)}},
        "outputs": [{"name": "anomaly_map", "dtype": "float32", "shape": [batch_dim, k, s, s]},
                    {"name": "image_score", "dtype": "float32", "shape": [batch_dim, k]}],
        "batch": {"min": lo, "max": hi, "opt": lo},
        "files": {"model.onnx": file_entry(onnx_file, "fp32")},
        "sources": {"clip_weights": source_entry(args.clip_weights) if not args.random_init else
                    {"random_init": True, "seed": args.seed}, "checkpoint": source_entry(args.ckpt)},
        "export": {"exporter": "torch.onnx.export(dynamo=True)", "opset": OPSET, "versions": versions(),
                   "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                   "seconds": round(seconds, 1), "host": platform.node()},
        "parity": parity,
        "thresholds": {},
        "engines": [],
    }


def replace_dir(tmp: str, out: str) -> None:
    """Swap the finished temp dir into place; an existing export is replaced, anything else is refused."""
    if os.path.exists(out):
        old = tempfile.mkdtemp(prefix=f".{os.path.basename(out)}.old-", dir=os.path.dirname(out))
        os.rmdir(old)
        os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out)


def check_output(out: str) -> None:
    parent = os.path.dirname(out) or "."
    if not os.path.isdir(parent):
        raise ClipadError(f"--output {out}: parent directory {parent} does not exist")
    if os.path.exists(out) and (not os.path.isdir(out) or (
            os.listdir(out) and not os.path.isfile(os.path.join(out, manifest_io.MANIFEST_NAME)))):
        raise ClipadError(f"--output {out}: exists and is not an export-engine directory; refusing to replace it")


def run(args) -> int:
    import torch

    from .engine_step import maybe_build_engine
    from .models.factory import build_detector
    from .onnx_export import export_onnx, parity_report
    from .precision_step import precision_step

    out = os.path.abspath(args.output)
    check_output(out)
    lo, hi = batch_range(args)
    if args.precision == "int8" and not args.calib_data:
        raise ClipadError("--precision int8 needs --calib-data DIR (a folder of normal images, ≥100 recommended)")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.random_init:
        log.warning("WARNING: --random-init: seeded RANDOM base weights (seed %d). The anomaly maps mean nothing; "
                    "use this only to try the pipeline. The manifest records it.", args.seed)
    started = time.perf_counter()
    log.info("[1/4] building %s on %s at %d px …", args.model, args.arch, args.image_size)
    quick = None if args.activation is None else args.activation == "quick_gelu"
    built = build_detector(args.model, arch=args.arch, image_size=args.image_size, clip_weights=args.clip_weights,
                           random_init=args.random_init, seed=args.seed, ckpt=args.ckpt, epoch=args.epoch,
                           class_names=args.class_names, dataset=args.dataset, domain=args.domain,
                           quick_gelu=quick)
    verify, verify_names = verify_batch(args.verify_images, args.image_size)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out)}.partial-", dir=os.path.dirname(out))
    try:
        onnx_file = os.path.join(tmp, "model.onnx")
        t = time.perf_counter()
        log.info("[2/4] exporting ONNX (opset 18, batch %s) …", lo if lo == hi else f"{lo}:{hi}")
        export_onnx(built, onnx_file, lo, hi)
        log.info("      %.1f s, %.1f MB", time.perf_counter() - t, os.path.getsize(onnx_file) / 1e6)
        log.info("[3/4] parity gate: torch reference vs ONNX Runtime on %d image(s) …", len(verify))
        parity = parity_report(built, onnx_file, verify, hi)
        parity["verify_images"] = verify_names
        log.info("      anomaly_map max|Δ| %.2e (%.2e of range), image_score max|Δ| %.2e",
                 parity["anomaly_map"]["max_abs"], parity["map_error_over_range"], parity["image_score"]["max_abs"])
        if not parity["passed"]:
            raise ClipadError(
                f"parity gate failed: anomaly_map error {parity['map_error_over_range']:.2e} of range (limit 1e-4), "
                f"image_score error {parity['image_score']['max_abs']:.2e} (limit 1e-5); nothing written")
        del built.module  # free the torch model before the ONNX-only steps
        files, precisions = precision_step(args, built.image_size, tmp, onnx_file, (verify, verify_names), hi)
        log.info("[4/4] writing manifest …")
        manifest = build_manifest(args, built, lo, hi, onnx_file, parity, time.perf_counter() - started)
        manifest["files"].update(files)
        manifest["precisions"] = precisions
        manifest_io.write_json_atomic(os.path.join(tmp, manifest_io.MANIFEST_NAME), manifest)
        replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    log.info("ONNX export done in %.1f s (peak memory %.0f MB): %s", time.perf_counter() - started, peak_mb, out)
    rc = 0 if args.no_engine else maybe_build_engine(args, out)
    log.info("next: edge-detect --model %s --source IMAGES_OR_VIDEO --save overlays/", args.output)
    return rc
