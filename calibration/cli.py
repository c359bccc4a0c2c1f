"""``edge-calibrate``: OK/NG and defect-region thresholds for an exported model from defect-free images only."""
from __future__ import annotations

import argparse
import datetime
import hashlib
import logging
import os
import sys

import numpy as np

from clipad.runtime.commands import add_model_options, open_detector, run_cli
from clipad.runtime.errors import ClipadError

EPILOG = """\
examples:
  edge-calibrate --model crane_l14 --normal line3/train/good
  edge-calibrate --model aa_line3 --normal 'good/*.png' --class-name screw --target-fpr 0.005
  edge-calibrate --model crane_int8 --normal line3/good --backend tensorrt --precision int8

how: every normal image runs through the model as edge-detect runs it (same backend and precision). A seeded
--holdout share is set aside; on the rest the decision score's constants are fitted (AA-CLIP's per-class
normalisation) and the image threshold is chosen by --method (conformal: the k-th smallest normal score,
k = ceil((n+1)(1-target)), so P(false alarm) <= target for parts like the normal ones). The pixel threshold for
defect regions follows the same rule over the per-image map maxima. The held-out images report the false-alarm
rate actually observed. Everything goes into manifest.json (per precision and backend, each class with its own
method, target, image count and date; never into the graph), and edge-detect then labels OK/NG without --threshold.
Folders list their files with an image extension; everything is checked (image count for the target, hold-out,
a writable model folder) before the first image runs.
"""

log = logging.getLogger("clipad")


def parse_args(argv):
    from .thresholds import METHODS

    ap = argparse.ArgumentParser(prog="edge-calibrate", formatter_class=argparse.RawDescriptionHelpFormatter,
                                 description="Calibrate OK/NG thresholds of a model exported by export-engine from "
                                             "defect-free images.", epilog=EPILOG)
    add_model_options(ap)
    ap.add_argument("--normal", required=True, metavar="DIR_OR_GLOB", help="defect-free images: a folder or a glob")
    ap.add_argument("--class-name", nargs="+", metavar="NAME", help="classes to calibrate (default: all)")
    ap.add_argument("--target-fpr", type=float, default=0.01, metavar="ALPHA",
                    help="false-alarm rate to allow on normal parts (default 0.01)")
    ap.add_argument("--method", choices=METHODS, default="conformal",
                    help="conformal (default; a guarantee), quantile (empirical), meanstd (mean + z·std)")
    ap.add_argument("--holdout", type=float, default=0.2, metavar="SHARE",
                    help="share of the normal images kept out to measure the false-alarm rate (default 0.2)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the hold-out draw (default 0)")
    ap.add_argument("-q", "--quiet", action="store_true", help="no progress bar or summary")
    return ap.parse_args(argv)


def collect(detector, files: list[str], classes: list[int], quiet: bool):
    """Per class index: NormalStats over the readable images; and the readable files with their sha256."""
    from tqdm import tqdm

    from clipad.runtime.preprocess import prepare

    from .thresholds import NormalStats

    rows, used, unreadable = [], [], []
    for path in tqdm(files, desc="normal images", unit="img", disable=quiet, file=sys.stderr):
        try:
            batch = prepare(path, detector.image_size)[None]
        except ClipadError as exc:
            unreadable.append(str(exc))
            continue
        maps, scores = detector.run(batch)
        values = [(float(maps[0, k].min()), float(maps[0, k].max()), float(scores[0, k])) for k in classes]
        if not np.isfinite(values).all():
            raise ClipadError(f"{path}: the model gives non-finite outputs on a normal image; calibration refused "
                              f"(check the model with edge-detect)")
        rows.append(values)
        with open(path, "rb") as fh:
            used.append(hashlib.sha256(fh.read()).hexdigest())
    for message in unreadable:
        log.warning("WARNING: skipped %s", message)
    if len(rows) < 2:
        raise ClipadError(f"only {len(rows)} readable normal image(s) of {len(files)}; at least 2 are needed")
    table = np.asarray(rows, np.float64)  # [images, classes, (min, max, score)]
    stats = {k: NormalStats(table[:, i, 0], table[:, i, 1], table[:, i, 2]) for i, k in enumerate(classes)}
    return stats, used, unreadable


def check_counts(n: int, holdout: float, method: str, alpha: float) -> None:
    """What the image count allows, checked before any image runs (and again after unreadable ones are skipped)."""
    from .thresholds import holdout_split, threshold

    held = holdout_split(n, holdout)
    fit = int((~held).sum())
    if n < 2:
        raise ClipadError(f"only {n} readable normal image(s); at least 2 are needed")
    if holdout > 0 and held.sum() == 0:
        raise ClipadError(f"--holdout {holdout}: holds out nothing of {n} images")
    threshold(method, np.arange(fit, dtype=float), alpha)   # raises with the count the target needs


def run(args) -> int:
    from clipad import __version__
    from clipad.runtime.inputs import list_images
    from clipad.runtime.manifest import Manifest, check_writable

    from .thresholds import calibrate_class, holdout_split

    if not 0 < args.target_fpr < 1:
        raise ClipadError(f"--target-fpr {args.target_fpr}: must be between 0 and 1")
    if not 0 <= args.holdout < 1:
        raise ClipadError(f"--holdout {args.holdout}: must be at least 0 and below 1")
    manifest = check_writable(args.model)   # a read-only model folder fails now, not after the images ran
    unknown = [n for n in args.class_name or [] if n not in manifest.class_names]
    if unknown:
        raise ClipadError(f"unknown class name {unknown[0]!r}; this model has: {', '.join(manifest.class_names)}")
    listing = list_images(args.normal, "--normal", single_file=False)
    if listing.skipped and not args.quiet:
        log.warning("WARNING: --normal %s: %s", args.normal, listing.skipped_note())
    files = listing.paths
    check_counts(len(files), args.holdout, args.method, args.target_fpr)
    with open_detector(args) as detector:
        names = args.class_name or detector.class_names
        classes = [detector.class_index(n) for n in names]
        if not args.quiet:
            log.info("calibrating %s (%s) on %s: %d normal file(s), %s, target false-alarm rate %g", args.model,
                     ", ".join(names), detector.backend.description, len(files), args.method, args.target_fpr)
        stats, hashes, unreadable = collect(detector, files, classes, args.quiet)
        precision, backend, rule = detector.backend.precision, detector.backend.name, detector.rule
    check_counts(len(hashes), args.holdout, args.method, args.target_fpr)
    held = holdout_split(len(hashes), args.holdout, args.seed)
    provenance = {"method": args.method, "target_fpr": args.target_fpr, "images": int((~held).sum()),
                  "normal": os.path.abspath(args.normal),
                  "images_sha256": hashlib.sha256("".join(sorted(hashes)).encode()).hexdigest(),
                  "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    extra = {"tool": f"clipad-edge {__version__}", "unreadable": len(unreadable), "seed": args.seed}
    per_class = {detector.class_names[k]: calibrate_class(rule, stats[k], held, args.method, args.target_fpr,
                                                          provenance, extra) for k in classes}

    def store(manifest: Manifest) -> None:
        for name, cal in per_class.items():
            manifest.set_class_calibration(precision, backend, name, cal)

    Manifest.update(args.model, store)
    if not args.quiet:
        for name, cal in per_class.items():
            fpr = cal.holdout_fpr
            log.info("%s: NG when %s >= %.6g; regions where map >= %.6g; hold-out false alarms %d/%d (%s, target %g)",
                     name, rule, cal.image_threshold, cal.pixel_threshold, cal.holdout_false_alarms,
                     cal.holdout_images, "n/a" if fpr is None else f"{fpr:.3f}", args.target_fpr)
        log.info("written to %s; edge-detect --model %s now labels OK/NG without --threshold",
                 os.path.join(args.model, "manifest.json"), args.model)
    return 0


def main(argv=None) -> int:
    args = parse_args(argv)
    return run_cli("edge-calibrate", lambda: run(args), args.quiet, "interrupted; manifest unchanged")


if __name__ == "__main__":
    sys.exit(main())
