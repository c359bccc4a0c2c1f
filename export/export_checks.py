"""What ``export-engine`` checks before minutes of work: the output folder, the arguments, the image folders, the
calibration a precision needs, and ``--int8-keep-float from:PRECISION`` read from the export's manifest. Each
failure is one ``ClipadError`` line."""
from __future__ import annotations

import logging
import os
import re

from clipad.runtime import precisions
from clipad.runtime.errors import ClipadError
from clipad.runtime.manifest import MANIFEST_NAME, Manifest

from .models.registry import get_kind
from .options import CalibrationOptions, ExportOptions
from .precision_step import INT8_CONVERSIONS, needs_calibration

log = logging.getLogger("clipad")
KEPT_FROM = "from:"   # --int8-keep-float from:PRECISION


def check_output(out: str) -> None:
    """A new folder, an empty one, or a previous export holding nothing but what export-engine wrote (it is
    replaced as a whole, so anything else in it would be lost: refused, never deleted)."""
    parent = os.path.dirname(out) or "."
    if not os.path.isdir(parent):
        raise ClipadError(f"--output {out}: parent directory {parent} does not exist")
    if not os.path.exists(out):
        return
    if not os.path.isdir(out) or (os.listdir(out) and not os.path.isfile(os.path.join(out, MANIFEST_NAME))):
        raise ClipadError(f"--output {out}: exists and is not an export-engine directory; refusing to replace it")
    if not os.listdir(out):
        return
    try:
        previous = Manifest.read(out)
    except ClipadError:
        raise ClipadError(f"--output {out}: its manifest.json is unreadable, so what it owns is unknown; refusing "
                          f"to replace it") from None
    owned = set(previous.owned_files())
    # a few-shot memory whose calibration was dropped (INT8 redone) is still edge-calibrate's, not the user's
    foreign = sorted(f for f in os.listdir(out) if f not in owned and not re.fullmatch(r"memory-[0-9a-f-]+\.npy", f))
    if foreign:
        shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        raise ClipadError(f"--output {out}: holds files export-engine did not write ({shown}); move them or choose "
                          f"another --output (a re-export replaces the whole folder)")


def check_arguments(opts: ExportOptions) -> None:
    """Every argument that can be checked without loading weights, so a typo fails in seconds, not after minutes."""
    from . import archs

    m = opts.model
    kind = get_kind(m.kind)
    spec = archs.arch_spec(m.arch)
    if m.image_size < spec.patch_size:
        raise ClipadError(f"--image-size {m.image_size}: must be a positive multiple of the patch size "
                          f"{spec.patch_size} of {m.arch}")
    spec.grid(m.image_size)
    if m.ckpt and not kind.needs_checkpoint:
        raise ClipadError(f"--ckpt {m.ckpt}: --model {m.kind} takes no checkpoint")
    if m.ckpt and not os.path.exists(m.ckpt):
        raise ClipadError(f"--ckpt {m.ckpt}: no such file or folder")
    if m.clip_weights and m.random_init:
        raise ClipadError("--clip-weights and --random-init exclude each other")
    if m.dino_weights and m.kind != "crane_plus":
        raise ClipadError(f"--dino-weights: --model {m.kind} does not use DINOv2")
    if m.dino_weights and m.random_init:
        raise ClipadError("--dino-weights and --random-init exclude each other")
    if m.kind == "crane_plus" and not (m.dino_weights or m.random_init):
        raise ClipadError("--dino-weights is required for --model crane_plus (Meta's dinov2_vitb14_reg4_pretrain.pth, "
                          "a local file); or --random-init")
    if any(k.startswith(KEPT_FROM) for k in opts.calibration.keep_float):
        raise ClipadError(f"--int8-keep-float {KEPT_FROM}PRECISION: reads an existing export's manifest; use it with "
                          "--from-onnx DIR")
    if m.dino_weights and not os.path.isfile(m.dino_weights):
        raise ClipadError(f"--dino-weights {m.dino_weights}: no such file")
    if m.clip_weights and not os.path.isfile(m.clip_weights):
        raise ClipadError(f"--clip-weights {m.clip_weights}: " + ("is a folder, not a weight file"
                                                                  if os.path.isdir(m.clip_weights) else "no such file"))
    check_images(opts)


def check_images(opts: ExportOptions) -> None:
    from clipad.runtime.inputs import list_images

    if opts.verify_images:
        list_images(opts.verify_images, "--verify-images", single_file=False)
    if opts.calibration.data:
        list_images(opts.calibration.data, "--calib-data", single_file=False)


def require_calibration(opts: ExportOptions, manifest: Manifest | None = None) -> None:
    """A precision made from calibration data needs --calib-data, unless the export already has its file; the INT8
    quantizer choice applies to the Q/DQ file only."""
    wanted = precisions.get(opts.precision)
    alpha = opts.calibration.smooth_alpha
    qdq_only = [flag for flag, given in ((f"--int8-quantizer {opts.calibration.quantizer}",
                                          opts.calibration.quantizer != CalibrationOptions.quantizer),
                                         ("--int8-smoothquant", alpha is not None),
                                         ("--int8-shift", opts.calibration.shift)) if given]
    if qdq_only and wanted.conversion != "static-qdq":
        raise ClipadError(f"{qdq_only[0]}: applies to the Q/DQ INT8 file (--precision "
                          f"{next(p.name for p in precisions.PRECISIONS.values() if p.conversion == 'static-qdq')}), "
                          f"not to --precision {wanted.name}")
    map_min = opts.calibration.map_min
    if map_min is not None:
        if wanted.conversion not in INT8_CONVERSIONS:
            raise ClipadError(f"--int8-map-min: applies to the INT8 files, not to --precision {wanted.name}")
        own = wanted.gate.map_pearson_min
        if not own <= map_min <= 1.0:   # NaN fails too
            raise ClipadError(f"--int8-map-min {map_min:g}: must lie between the INT8 gate's own {own:g} and 1 (it "
                              "can only make the gate stricter)")
    if alpha is not None and not 0.0 < alpha < 1.0:
        raise ClipadError(f"--int8-smoothquant {alpha:g}: α must lie between 0 and 1 (0.5 is SmoothQuant's default)")
    if opts.calibration.quantizer == "modelopt":   # its own environment: checked before minutes of export
        from . import quantize_modelopt

        quantize_modelopt.method_for(opts.calibration.method)
        why = quantize_modelopt.available()
        if why:
            raise ClipadError(why)
    if not wanted.needs_calibration_data or opts.calibration.data:
        return
    if manifest is not None and wanted.file in manifest.files:
        return
    raise ClipadError(needs_calibration(wanted.name))


def gates_on_holdout(opts: ExportOptions) -> bool:
    """The accuracy gate's images are --verify-images, else for a precision made from calibration data a hold-out of
    the calibration set, else the parity images."""
    return precisions.get(opts.precision).needs_calibration_data and not opts.verify_images


def kept_from_manifest(keep_float: tuple[str, ...], manifest: Manifest) -> tuple[str, ...]:
    """``from:int8-cpu`` in --int8-keep-float becomes the layers that file's conversion kept float (its manifest's
    kept_float_nodes), so the Q/DQ file can start from what the other INT8 file's sensitivity pass found."""
    out: list[str] = []
    for k in keep_float:
        if not k.startswith(KEPT_FROM):
            out.append(k)
            continue
        name = k[len(KEPT_FROM):]
        report = manifest.precisions.get(name)
        if report is None:
            have = ", ".join(sorted(manifest.precisions)) or "none"
            raise ClipadError(f"--int8-keep-float {k}: this export has no {name!r} file to take the kept layers "
                              f"from (it has: {have})")
        nodes = (report.conversion or {}).get("kept_float_nodes") or []
        if not nodes:
            raise ClipadError(f"--int8-keep-float {k}: the {name} file keeps no linear layer float (its manifest "
                              "lists no kept_float_nodes)")
        log.info("      --int8-keep-float %s: %d layer(s) its conversion kept float", k, len(nodes))
        out.extend(nodes)
    return tuple(dict.fromkeys(out))
