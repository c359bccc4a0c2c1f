"""The one orchestrator behind ``export-engine``: it runs the steps in order and owns the manifest.

From a checkpoint: torch model → FP32 ONNX → parity gate → FP16/INT8 ONNX + accuracy gate → manifest, written
atomically as a whole folder; then a TensorRT engine when TensorRT can build here. From an existing export
(``--from-onnx``): add or redo the precision's ONNX, then build its engine or write a Triton repository. Every change
to an existing export goes through ``Manifest.update`` (lock, re-read, files and manifest together), so a calibration
or another export step that finished meanwhile is kept. The steps (``onnx_export``, ``precision_step``,
``tensorrt_build``, ``triton_repo``) take explicit parameters and never import this module.
"""
from __future__ import annotations

import datetime
import logging
import os
import platform
import resource
import shlex
import shutil
import time

from clipad import __version__
from clipad.runtime import precisions
from clipad.runtime.atomic import make_temp_dir_beside, remove_stale_temp_dirs, replace_dir
from clipad.runtime.errors import ClipadError
from clipad.runtime.manifest import (
    SCHEMA_VERSION,
    BatchRange,
    InputSpec,
    Manifest,
    ModelInfo,
    TensorSpec,
    check_writable,
    file_entry,
    sha256_file,
)

from .models.registry import get_kind
from .export_checks import check_arguments, check_images, check_output, gates_on_holdout, kept_from_manifest, \
    require_calibration
from .options import ExportOptions
from .precision_step import enforce_gate

log = logging.getLogger("clipad")


def run(opts: ExportOptions) -> int:
    return export_from_checkpoint(opts) if opts.model is not None else export_from_onnx(opts)


# ---- from a training checkpoint --------------------------------------------------------------------------------------
def export_from_checkpoint(opts: ExportOptions) -> int:
    import torch

    from clipad.calibration.images import load_verify_set

    from .models.factory import build_detector
    from .onnx_export import OPSET, export_onnx, parity_gate
    from .precision_step import make_precision

    m = opts.model
    out = os.path.abspath(opts.output)
    check_output(out)
    lo, hi = opts.batch
    require_calibration(opts)
    check_arguments(opts)
    if opts.threads:
        torch.set_num_threads(opts.threads)
    if m.random_init:
        log.warning("WARNING: --random-init: seeded RANDOM base weights (seed %d). The anomaly maps mean nothing; "
                    "use this only to try the pipeline. The manifest records it.", m.seed)
    started = time.perf_counter()
    log.info("[1/4] building %s on %s at %d px …", m.kind, m.arch, m.image_size)
    built = build_detector(m.kind, arch=m.arch, image_size=m.image_size, clip_weights=m.clip_weights,
                           random_init=m.random_init, seed=m.seed, ckpt=m.ckpt, epoch=m.epoch,
                           class_names=m.class_names, dataset=m.dataset, domain=m.domain, quick_gelu=m.quick_gelu,
                           dino_weights=m.dino_weights, memory_features=m.memory_features)
    verify = load_verify_set(opts.verify_images, m.image_size)
    for name in remove_stale_temp_dirs(out, "partial"):
        log.info("removed %s, left by an export that was killed", name)
    tmp = make_temp_dir_beside(out, "partial")
    try:
        onnx_file = os.path.join(tmp, "model.onnx")
        t = time.perf_counter()
        log.info("[2/4] exporting ONNX (opset %d, batch %s) …", OPSET, lo if lo == hi else f"{lo}:{hi}")
        export_onnx(built, onnx_file, lo, hi)
        log.info("      %.1f s, %.1f MB", time.perf_counter() - t, os.path.getsize(onnx_file) / 1e6)
        log.info("[3/4] parity gate: torch reference vs ONNX Runtime on %d image(s) …", len(verify[0]))
        parity = parity_gate(built, onnx_file, *verify, (lo, hi))
        c = parity.comparison
        log.info("      anomaly_map max|Δ| %.2e (%.2e of range), image_score max|Δ| %.2e%s",
                 c.anomaly_map.max_abs, c.map_error_over_range, c.image_score.max_abs,
                 f", patch_features cosine min {c.patch_features.cosine_min:.7f}" if c.patch_features else "")
        enforce_gate(parity, "parity gate", opts.accept_accuracy_loss, get_kind(m.kind).parity_note)
        fewshot = fewshot_step(built, onnx_file, tmp) if m.memory_features else None
        del built.module  # free the torch model before the ONNX-only steps
        manifest = new_manifest(opts, built, onnx_file, parity, time.perf_counter() - started)
        if fewshot is not None:
            add_fewshot(manifest, onnx_file, *fewshot)
        if not precisions.get(opts.precision).reference:
            name, entry, report = make_precision(opts.precision, onnx_file, tmp,
                                                 None if gates_on_holdout(opts) else verify,
                                                 (lo, hi), m.image_size, opts.calibration,
                                                 opts.accept_accuracy_loss, manifest.model.decision_score)
            manifest.files[name] = entry
            manifest.precisions[opts.precision] = report
        log.info("[4/4] writing manifest …")
        manifest.write(tmp)
        replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    log.info("ONNX export done in %.1f s (peak memory %.0f MB): %s", time.perf_counter() - started, peak_mb, out)
    rc = engine_step(opts, out, required=False) if opts.engine.build else 0
    log.info("next: edge-detect --model %s --source IMAGES_OR_VIDEO --save overlays/", shlex.quote(opts.output))
    return rc


def new_manifest(opts: ExportOptions, built, onnx_file: str, parity, seconds: float) -> Manifest:
    from clipad.runtime.preprocess import OPENAI_MEAN, OPENAI_STD

    from .onnx_export import INPUT_NAME, OPSET

    m, (lo, hi) = opts.model, opts.batch
    s, k = built.image_size, len(built.class_names)
    batch_dim = lo if lo == hi else "batch"
    return Manifest(
        schema_version=SCHEMA_VERSION,
        model=ModelInfo(kind=built.kind, arch=built.arch, image_size=s, class_names=built.class_names,
                        prompt_names=built.prompt_names, domain=built.domain, anchor_sha256=built.anchor_sha256,
                        decision_score=built.decision_score,
                        random_init=built.random_init, details=dict(built.info)),
        input=InputSpec(name=INPUT_NAME, dtype="uint8", shape=[batch_dim, s, s, 3], layout="NHWC", color="RGB",
                        host_preprocessing="PIL bicubic resize (antialiased when shrinking) to SxS, aspect squashed",
                        in_graph={"scale": 1 / 255, "mean": list(OPENAI_MEAN), "std": list(OPENAI_STD)}),
        outputs=[TensorSpec("anomaly_map", "float32", [batch_dim, k, s, s]),
                 TensorSpec("image_score", "float32", [batch_dim, k])],
        batch=BatchRange(min=lo, max=hi, opt=lo),
        files={precisions.REFERENCE.file: file_entry(onnx_file, precisions.REFERENCE.name, OPSET)},
        sources={"clip_weights": {"random_init": True, "seed": m.seed} if m.random_init else
                 source_entry(m.clip_weights), "checkpoint": source_entry(m.ckpt),
                 **({"dino_weights": source_entry(m.dino_weights)} if m.dino_weights else {})},
        export={"exporter": "torch.onnx.export(dynamo=True)", "opset": OPSET, "versions": versions(),
                "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                "seconds": round(seconds, 1), "host": platform.node()},
        parity=parity)


def fewshot_step(built, onnx_file: str, folder: str) -> tuple[str, dict]:
    """fewshot.onnx beside the model, checked against its numpy reference; (path, recipe for the manifest)."""
    from . import fewshot_graph
    from .onnx_export import MEMORY_FEATURES, output_shapes

    _, taps, _, channels = output_shapes(onnx_file)[MEMORY_FEATURES]
    head = built.module.core.head
    path = os.path.join(folder, fewshot_graph.FILE)
    recipe = fewshot_graph.recipe(head, head.grid, built.kind)
    fewshot_graph.export_fewshot(head, head.grid, taps, channels, path)
    error = fewshot_graph.check_against_reference(path, recipe, taps, channels)
    log.info("      few-shot graph: %d tap(s) × %d channels at a %d×%d grid, matches its numpy reference "
             "(max|Δ| %.1e)", taps, channels, head.grid, head.grid, error)
    return path, recipe


def add_fewshot(manifest: Manifest, onnx_file: str, path: str, recipe: dict) -> None:
    from .onnx_export import MEMORY_FEATURES, OPSET, output_shapes

    shape = output_shapes(onnx_file)[MEMORY_FEATURES]
    manifest.outputs.append(TensorSpec(MEMORY_FEATURES, "float32", [manifest.outputs[0].shape[0], *shape[1:]]))
    manifest.files[os.path.basename(path)] = file_entry(path, precisions.REFERENCE.name, OPSET)
    manifest.model.details["fewshot"] = recipe


def source_entry(path: str | None) -> dict | None:
    if not path:
        return None
    if os.path.isdir(path):
        files = sorted(f for f in os.listdir(path) if f.endswith(".pth"))
        return {"path": os.path.abspath(path), "files": {f: sha256_file(os.path.join(path, f)) for f in files}}
    return {"path": os.path.abspath(path), "sha256": sha256_file(path)}


def versions() -> dict:
    import onnx
    import onnxruntime
    import open_clip
    import torch

    return {"clipad-edge": __version__, "python": platform.python_version(), "torch": torch.__version__,
            "open_clip": open_clip.__version__, "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__}




# ---- on an existing export -------------------------------------------------------------------------------------------
def export_from_onnx(opts: ExportOptions) -> int:
    model_dir = os.path.abspath(opts.output)
    manifest = Manifest.read(model_dir)  # clear errors before importing TensorRT
    wanted = precisions.get(opts.precision)
    serves_engine = opts.triton is not None and opts.triton.flavor == "tensorrt"
    make_file = not wanted.reference and (wanted.file not in manifest.files or bool(opts.calibration.data)) \
        and not serves_engine
    if make_file:
        require_calibration(opts, manifest)
        opts.calibration.keep_float = kept_from_manifest(opts.calibration.keep_float, manifest)
        check_images(opts)
        check_writable(model_dir)
        add_precision(opts, model_dir, manifest)
    if opts.triton is not None:
        return triton_step(opts, model_dir)
    if make_file:
        return engine_step(opts, model_dir, required=False) if opts.engine.build else 0
    if not opts.engine.build:
        log.info("%s is already in %s and --no-engine was given: nothing to do", wanted.file, model_dir)
        return 0
    check_writable(model_dir)
    return engine_step(opts, model_dir, required=True)


def add_precision(opts: ExportOptions, model_dir: str, manifest: Manifest) -> None:
    """Add (or redo) a precision's file in an existing export. The work happens on the manifest as read at the
    start; the file and its manifest entry are then installed together under the lock, on the manifest as it is
    then. Engines and calibrations made from the previous file of that precision are removed, since they no longer
    match it."""
    from clipad.calibration.images import load_verify_set

    from .precision_step import make_precision

    fp32 = manifest.verify_file(model_dir, precisions.REFERENCE.file)
    name = precisions.get(opts.precision).file
    try:
        import onnx  # noqa: F401  (the conversions need it; the lean edge install does not have it)
    except ImportError:
        raise ClipadError(f"{model_dir} has no {name}, and making it needs the workstation install (pip install "
                          f"'clipad-edge[export]'): run export-engine --from-onnx DIR --precision {opts.precision} "
                          f"there and copy the folder here") from None
    size, batch = manifest.image_size, (manifest.batch.min, manifest.batch.max)
    verify = None if gates_on_holdout(opts) else load_verify_set(opts.verify_images, size)
    remove_stale_temp_dirs(os.path.join(model_dir, "precision"), "partial")
    tmp = make_temp_dir_beside(os.path.join(model_dir, "precision"), "partial")
    try:
        name, entry, report = make_precision(opts.precision, fp32, tmp, verify, batch, size,
                                             opts.calibration, opts.accept_accuracy_loss,
                                             manifest.model.decision_score)

        def install(current: Manifest):
            if current.files[precisions.REFERENCE.file].sha256 != manifest.files[precisions.REFERENCE.file].sha256:
                raise ClipadError(f"{model_dir}: {precisions.REFERENCE.file} changed while {name} was being made "
                                  f"(re-exported meanwhile?); nothing was changed, run the command again")
            stale = [e for e in current.engines if e.precision == opts.precision]
            dropped = [c for c in current.calibrations if c.precision == opts.precision]
            current.files[name] = entry
            current.precisions[opts.precision] = report
            current.engines = [e for e in current.engines if e not in stale]
            current.calibrations = [c for c in current.calibrations if c not in dropped]
            return stale, dropped

        stale, dropped = Manifest.update(model_dir, install, files={name: os.path.join(tmp, name)})
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    for calibration in dropped:
        log.warning("removed the %s thresholds calibrated on %s: they were measured on the previous %s; run "
                    "edge-calibrate --precision %s again", calibration.precision, calibration.backend, name,
                    calibration.precision)
    for engine in stale:
        log.warning("removed %s: it was built from the previous %s", engine.file, name)
        try:
            os.remove(os.path.join(model_dir, engine.file))
        except FileNotFoundError:
            pass
    log.info("%s written into %s", name, model_dir)


def engine_step(opts: ExportOptions, model_dir: str, required: bool) -> int:
    """Build the precision's engine when TensorRT can build here and record it; otherwise print the command to run
    on the target (or fail, when building was the whole request)."""
    from .tensorrt_build import build_command, build_engine, resolve_flavor

    e = opts.engine
    wanted = precisions.get(opts.precision)
    if not wanted.builds_engine:
        if required:
            raise ClipadError(f"no TensorRT engine is built from {wanted.name} ({wanted.summary}); engines are built "
                              f"from --precision {', '.join(precisions.ENGINE_PRECISIONS)}")
        log.info("%s: no TensorRT engine is built from it (%s)", wanted.file, wanted.summary)
        return 0
    flavor, trt, gpu = resolve_flavor(e.flavor, e.compute_capability, e.device)
    if flavor is None:
        if required:
            raise ClipadError("TensorRT cannot build here: no GPU with the tensorrt package, and TensorRT-RTX needs "
                              "--compute-capability X.Y (pip install tensorrt-rtx-cu13) for an ahead-of-time build")
        # Printed even with --quiet: it is the one thing the user has to do next.
        print("No TensorRT build here (no GPU with TensorRT, and no --trt-flavor rtx --compute-capability). "
              f"On the target run:\n  {build_command(model_dir, opts.precision)}")
        return 0
    manifest = Manifest.read(model_dir)
    if wanted.file not in manifest.files:
        raise ClipadError(f"{model_dir}: no {wanted.file} in this export; re-run export-engine with --precision "
                          f"{opts.precision}")
    onnx_path = manifest.verify_file(model_dir, wanted.file)
    target = e.compute_capability or (gpu or {}).get("compute_capability", "?")
    log.info("[engine] TensorRT %s %s: %s engine for %s …", flavor, trt.__version__, opts.precision.upper(),
             f"sm {target}" if not gpu else f"{gpu.get('name')} (sm {gpu.get('compute_capability')})")
    tmp = make_temp_dir_beside(os.path.join(model_dir, "engine"), "partial")
    try:
        entry = build_engine(onnx_path, tmp, opts.precision, manifest.batch, manifest.image_size, flavor, trt, gpu,
                             e.compute_capability, e.workspace_gb, e.timing_cache, e.version_compatible,
                             command_dir=model_dir)

        def record(current: Manifest) -> None:
            if current.files.get(wanted.file) is None or current.files[wanted.file].sha256 != entry.onnx_sha256:
                raise ClipadError(f"{model_dir}: {wanted.file} changed while its engine was built; nothing was "
                                  f"changed, run the command again")
            current.engines = [x for x in current.engines if x.file != entry.file] + [entry]

        Manifest.update(model_dir, record, files={entry.file: os.path.join(tmp, entry.file)})
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("         %s (%.1f MB, %.1f s)", entry.file, entry.bytes / 1e6, entry.build_seconds)
    return 0


def triton_step(opts: ExportOptions, model_dir: str) -> int:
    """Write the export (serving ``opts.precision``) into a Triton model repository."""
    from .triton_repo import write_triton_repository

    t = opts.triton
    try:
        written = write_triton_repository(model_dir, t, opts.precision)
    except OSError as exc:   # full disk, permissions: nothing half-written is left (staging folder removed)
        raise ClipadError(f"--triton-repo {t.repo}: {exc.strerror or exc} ({exc.filename or ''}); nothing was "
                          f"replaced") from None
    log.info("written into %s: %s", t.repo, ", ".join(written))
    print(f"serve it with: edge-serve {shlex.quote(t.repo)}")
    return 0
