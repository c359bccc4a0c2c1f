"""The TensorRT step of ``export-engine``: build an engine into an export directory and record it."""
from __future__ import annotations

import logging
import os

from clipad.runtime import manifest as manifest_io
from clipad.runtime.errors import ClipadError

from .tensorrt_build import build_command, build_engine, resolve_flavor

log = logging.getLogger("clipad")


def _onnx_for(model_dir: str, manifest: dict, precision: str) -> str:
    name = "model.onnx" if precision == "fp32" else f"model.{precision}.onnx"
    if name not in manifest["files"]:
        raise ClipadError(f"{model_dir}: no {name} in this export; re-run export-engine with --precision {precision}")
    return manifest_io.verify_file(model_dir, manifest, name)


def build_into(model_dir: str, precision: str, flavor: str, trt, gpu, args) -> dict:
    manifest = manifest_io.read(model_dir)
    if manifest["schema_version"] != manifest_io.SCHEMA_VERSION:
        raise ClipadError(f"{model_dir}: manifest schema {manifest['schema_version']} was written by another "
                          f"clipad-edge version; re-export with this one")
    onnx_path = _onnx_for(model_dir, manifest, precision)
    target = args.compute_capability or (gpu or {}).get("compute_capability", "?")
    log.info("[engine] TensorRT %s %s: %s engine for %s …", flavor, trt.__version__, precision.upper(),
             f"sm {target}" if not gpu else f"{gpu.get('name')} (sm {gpu.get('compute_capability')})")
    entry = build_engine(onnx_path, model_dir, precision, manifest["batch"], manifest["model"]["image_size"],
                         flavor, trt, gpu, args.compute_capability, args.workspace, args.timing_cache,
                         args.version_compatible)
    manifest["engines"] = [e for e in manifest.get("engines", []) if e["file"] != entry["file"]] + [entry]
    manifest_io.write_json_atomic(os.path.join(model_dir, manifest_io.MANIFEST_NAME), manifest)
    log.info("         %s (%.1f MB, %.1f s)", entry["file"], entry["bytes"] / 1e6, entry["build_seconds"])
    return entry


def maybe_build_engine(args, model_dir: str) -> int:
    """After an ONNX export: build when TensorRT can build here, else print the command for the target."""
    flavor, trt, gpu = resolve_flavor(args.trt_flavor, args.compute_capability)
    if flavor is None:
        # Printed even with --quiet: it is the one thing the user has to do next.
        print("No TensorRT build here (no GPU with TensorRT, and no --trt-flavor rtx --compute-capability). "
              f"On the target run:\n  {build_command(model_dir, args.precision)}")
        return 0
    build_into(model_dir, args.precision, flavor, trt, gpu, args)
    return 0


def build_from_onnx(args) -> int:
    from .precision_step import add_precision, needs_precision_step

    model_dir = os.path.abspath(args.from_onnx)
    manifest = manifest_io.read(model_dir)  # clear errors before importing TensorRT
    if needs_precision_step(args, manifest):
        add_precision(args, model_dir)
        return 0 if args.no_engine else maybe_build_engine(args, model_dir)
    flavor, trt, gpu = resolve_flavor(args.trt_flavor, args.compute_capability)
    if flavor is None:
        raise ClipadError("TensorRT cannot build here: no GPU with the tensorrt package, and TensorRT-RTX needs "
                          "--compute-capability X.Y (pip install tensorrt-rtx-cu13) for an ahead-of-time build")
    build_into(model_dir, args.precision, flavor, trt, gpu, args)
    return 0
