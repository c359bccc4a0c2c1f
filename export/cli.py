"""``export-engine``: training checkpoint → ONNX + manifest.json, verified against the torch reference."""
from __future__ import annotations

import argparse
import datetime
import logging
import os
import platform
import resource
import shutil
import sys
import tempfile
import time

import numpy as np

from clipad import __version__
from clipad.runtime import manifest as manifest_io
from clipad.runtime.errors import ClipadError

EPILOG = """\
examples:
  export-engine --model crane --ckpt trained_on_mvtec_crane/epoch_5.pth --clip-weights ViT-L-14-336px.pt --output crane_l14
  export-engine --model aaclip --ckpt aaclip_save_dir --clip-weights ViT-L-14-336px.pt --class-name bottle --output aa_bottle
  export-engine --model clip --clip-weights ViT-L-14-336px.pt --class-name "speckled tile surface" --output zs_tile
  export-engine --model clip --random-init --arch ViT-B-16 --image-size 224 --class-name tile --output try_it

class names: AA-CLIP and zero-shot CLIP put the class name into their prompts. The official dataset names
(MVTec: bottle, cable, capsule, carpet, grid, hazelnut, leather, metal_nut, pill, screw, tile, transistor,
toothbrush, wood, zipper; VisA: candle, capsules, cashew, chewinggum, fryum, macaroni1, macaroni2, pcb1..pcb4,
pipe_fryum; MPDD, BTAD 01..03, medical Brain/Liver/Retina/colon sets) map to AA-CLIP's descriptions
(e.g. bottle -> "dark bottle", Brain -> "scan", medical domain). Any other name is used literally: pick a short
visual description of your product, as the authors did. Crane's prompts are learned and class-agnostic.

output: DIR/model.onnx (FP32, input "images" uint8 [B,S,S,3] RGB already resized to SxS; outputs
"anomaly_map" [B,K,S,S] and "image_score" [B,K] float32, raw) and DIR/manifest.json. Written atomically: a failed
export leaves no DIR, or the previous one intact.
"""

log = logging.getLogger("clipad")


def parse_args(argv):
    ap = argparse.ArgumentParser(prog="export-engine", formatter_class=argparse.RawDescriptionHelpFormatter,
                                 description="Export a CLIP anomaly detector (AA-CLIP, Crane, zero-shot CLIP) to "
                                             "ONNX with baked text anchors, verified against the torch reference.",
                                 epilog=EPILOG)
    ap.add_argument("--model", required=True, choices=["aaclip", "crane", "clip"], help="model kind")
    ap.add_argument("--ckpt", help="AA-CLIP: the training save folder (text_adapter.pth + image_adapter_<N>.pth); "
                                   "Crane: an epoch_N.pth prompt checkpoint. Required for aaclip and crane.")
    ap.add_argument("--epoch", type=int, help="AA-CLIP: image_adapter epoch to use (default: the latest)")
    ap.add_argument("--clip-weights", help="local CLIP base weights: OpenAI ViT-L-14-336px.pt (TorchScript), "
                                           "a state dict, an open_clip checkpoint or .safetensors (never downloaded)")
    ap.add_argument("--random-init", action="store_true",
                    help="use seeded random base weights instead of --clip-weights (pipeline trials only: "
                         "the maps mean nothing)")
    ap.add_argument("--seed", type=int, default=0, help="seed for --random-init (default 0)")
    ap.add_argument("--output", required=True, help="output directory (replaced atomically)")
    ap.add_argument("--arch", default="ViT-L-14-336", help="open_clip architecture (default ViT-L-14-336)")
    ap.add_argument("--image-size", type=int, default=518, help="square input size S (default 518: 37x37 patches)")
    ap.add_argument("--class-name", nargs="+", dest="class_names", metavar="NAME",
                    help="one or more object names baked into the graph (aaclip, clip: required)")
    ap.add_argument("--dataset", choices=["MVTec", "VisA", "MPDD", "BTAD", "Medical"],
                    help="require --class-name to be an official name of this dataset")
    ap.add_argument("--domain", choices=["industrial", "medical"],
                    help="AA-CLIP blur: industrial 7/σ1, medical 9/σ1.5 (default: from the class names)")
    ap.add_argument("--activation", choices=["quick_gelu", "gelu"],
                    help="zero-shot CLIP MLP activation (default quick_gelu, as OpenAI weights need)")
    batch = ap.add_mutually_exclusive_group()
    batch.add_argument("--batch", type=int, default=None, help="fixed batch size (default 1)")
    batch.add_argument("--dynamic-batch", metavar="MIN:MAX", help="dynamic batch range, e.g. 1:8")
    ap.add_argument("--verify-images", metavar="DIR",
                    help="images for the torch-vs-ONNX parity gate (default: a few generated ones)")
    ap.add_argument("--threads", type=int, default=None, help="CPU threads for torch and ONNX Runtime")
    ap.add_argument("-q", "--quiet", action="store_true", help="only errors")
    return ap.parse_args(argv)


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

    from .models.factory import build_detector
    from .onnx_export import export_onnx, parity_report

    out = os.path.abspath(args.output)
    check_output(out)
    lo, hi = batch_range(args)
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
        log.info("[4/4] writing manifest …")
        seconds = time.perf_counter() - started
        manifest_io.write_json_atomic(os.path.join(tmp, manifest_io.MANIFEST_NAME),
                                      build_manifest(args, built, lo, hi, onnx_file, parity, seconds))
        replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    log.info("done in %.1f s (peak memory %.0f MB): %s", time.perf_counter() - started, peak_mb, out)
    log.info("next: edge-detect --model %s --source IMAGES_OR_VIDEO --save overlays/", args.output)
    return 0


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.ERROR if args.quiet else logging.INFO, format="%(message)s")
    try:
        return run(args)
    except ClipadError as exc:
        print(f"export-engine: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("export-engine: interrupted; nothing written", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
