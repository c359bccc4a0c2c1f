"""``edge-calibrate``: OK/NG and defect-region thresholds for an exported model from defect-free images only."""
from __future__ import annotations

import argparse
import datetime
import hashlib
import logging
import os
import sys

import numpy as np

from clipad.runtime.commands import add_model_options, model_options, run_cli
from clipad.runtime.decision import FUSED
from clipad.runtime.detector import Detector
from clipad.runtime.errors import ClipadError

from . import memory

EPILOG = """\
examples:
  edge-calibrate --model crane_l14 --normal line3/train/good
  edge-calibrate --model aa_line3 --normal 'good/*.png' --class-name screw --target-fpr 0.005
  edge-calibrate --model crane_int8 --normal line3/good --backend tensorrt --precision int8
  edge-calibrate --model crane_l14 --normal line3/train/good --memory 16 --coreset 0.1

few-shot (an export made with --memory-features): --memory K takes K of the --normal images (seeded), or
--memory-from DIR exactly the images of DIR, runs them through the same backend and precision, and stores their
patch features beside the model (memory-*.npy, FP16). The thresholds are then fitted on the fused decision score
(zero-shot + few-shot, docs/few-shot.md) over the --normal images that are not in the memory (by content sha256),
so the false-alarm promise stays honest.

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
    ap.add_argument("--seed", type=int, default=0, help="seed of the hold-out and memory draws (default 0)")
    fs = ap.add_argument_group("few-shot memory (exports made with --memory-features)")
    fs.add_argument("--memory", type=int, metavar="K", help="build a memory from K of the --normal images")
    fs.add_argument("--memory-from", metavar="DIR_OR_GLOB", help="build the memory from exactly these images")
    fs.add_argument("--coreset", type=float, metavar="SHARE",
                    help="keep this share of the memory's patches per tap, chosen by PatchCore's greedy coreset "
                         "(default: all patches)")
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


def check_memory_options(args, manifest) -> None:
    """The few-shot options, checked before any image runs."""
    from clipad.runtime.fewshot import require_features

    if args.memory is not None and args.memory_from is not None:
        raise ClipadError("--memory K and --memory-from DIR: give one (K of the --normal images, or exactly DIR)")
    memory.check_coreset(args.coreset)
    if args.coreset is not None and args.memory is None and args.memory_from is None:
        raise ClipadError("--coreset thins a few-shot memory: give --memory K or --memory-from DIR too")
    if args.memory is not None or args.memory_from is not None:
        taps, patches, channels = require_features(manifest, args.model)
        if args.memory is not None:
            memory.check_size(args.memory, taps, patches, channels, args.coreset)


def memory_images(args, normal_files: list[str]) -> list[str]:
    from clipad.runtime.inputs import list_images

    if args.memory_from is None:
        return memory.pick(normal_files, args.memory, args.seed)
    listing = list_images(args.memory_from, "--memory-from", single_file=False)
    if not listing.paths:
        raise ClipadError(f"--memory-from {args.memory_from}: no images")
    return listing.paths


def memory_graph(args, detector):
    """The few-shot graph and the model file the memory will belong to, checked before any image runs."""
    from clipad.runtime.detector import graph_settings
    from clipad.runtime.fewshot import model_file_of, open_graph

    model_file = model_file_of(detector.backend.precision)
    if model_file not in detector.manifest.files:
        raise ClipadError(f"{args.model}: no {model_file} in the manifest for a {detector.backend.precision} memory")
    graph = open_graph(args.model, detector.manifest, detector.backend.name, **graph_settings(detector.backend))
    return graph, model_file, detector.manifest.files[model_file].sha256


def attach_memory(args, detector, graph, model_file: str, model_sha256: str, files: list[str],
                  class_names: list[str]) -> dict:
    """Build and attach the memory the thresholds will be fitted with, then store it (last, so nothing before can
    leave a file behind); its manifest record."""
    from clipad.runtime.fewshot import FewShot, as_loaded, save_memory

    features, hashes = memory.features_of(detector, files, args.quiet)
    bank = memory.make_bank(features, args.coreset, args.seed, args.quiet)
    detector.fewshot = FewShot(graph, {n: as_loaded(bank) for n in class_names})   # what edge-detect will load
    source = os.path.abspath(args.memory_from) if args.memory_from else \
        f"{args.memory} of {os.path.abspath(args.normal)}"
    name, digest = save_memory(args.model, bank)
    if not args.quiet:
        log.info("few-shot memory %s: %d image(s), %d patch(es) × %d tap(s), %.1f MB", name, len(hashes),
                 bank.shape[1], bank.shape[0], bank.astype(np.float16).nbytes / 1e6)
    return memory.record(name, digest, bank, model_file, model_sha256, hashes, args.coreset, args.seed, source)


def discard_unreferenced(model_dir: str, record: dict | None) -> None:
    """The memory file this run wrote, when the manifest does not name it (interrupted, failed): it goes again. The
    file is this run's own (``save_memory`` names it per run), so no other calibration can be using it."""
    from clipad.runtime.manifest import Manifest

    if record is None:
        return
    try:
        if record["file"] in Manifest.read(model_dir).memory_files():
            return
    except ClipadError:
        pass
    remove_quietly(os.path.join(model_dir, record["file"]))


def remove_replaced(model_dir: str, names: set[str]) -> None:
    """Memory files this calibration replaced, removed under the export's lock unless something still names them."""
    from clipad.runtime.manifest import Manifest, lock

    if not names:
        return
    with lock(model_dir):
        used = set(Manifest.read(model_dir).memory_files())
        for name in names - used:
            remove_quietly(os.path.join(model_dir, name))


def remove_quietly(path: str) -> None:
    try:
        os.remove(path)
    except OSError:
        pass


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
    wants_memory = args.memory is not None or args.memory_from is not None
    check_memory_options(args, manifest)
    unknown = [n for n in args.class_name or [] if n not in manifest.class_names]
    if unknown:
        raise ClipadError(f"unknown class name {unknown[0]!r}; this model has: {', '.join(manifest.class_names)}")
    listing = list_images(args.normal, "--normal", single_file=False)
    if listing.skipped and not args.quiet:
        log.warning("WARNING: --normal %s: %s", args.normal, listing.skipped_note())
    files = listing.paths
    memory_files = memory_images(args, files) if wants_memory else []
    if args.memory_from is not None:
        from clipad.runtime.fewshot import require_features

        memory.check_size(len(memory_files), *require_features(manifest, args.model), args.coreset)
    if memory_files:
        in_memory = {memory.file_sha256(f) for f in memory_files}
        files = [f for f in files if memory.file_sha256(f) not in in_memory]
        if not args.quiet:
            log.info("few-shot memory: %d image(s); %d normal image(s) left for the thresholds", len(memory_files),
                     len(files))
    check_counts(len(files), args.holdout, args.method, args.target_fpr)
    model_dir, backend_name, options = model_options(args)
    new_memory = None
    # never with the current memory: thresholds are fitted on this run's outputs only (a new memory, or none)
    with Detector.open(model_dir, backend=backend_name, memory=False, **options) as detector:
        names = args.class_name or detector.class_names
        classes = [detector.class_index(n) for n in names]
        if not args.quiet:
            log.info("calibrating %s (%s) on %s: %d normal file(s), %s, target false-alarm rate %g", args.model,
                     ", ".join(names), detector.backend.description, len(files), args.method, args.target_fpr)
        graph = memory_graph(args, detector) if wants_memory else None
        try:
            if wants_memory:
                new_memory = attach_memory(args, detector, *graph, memory_files, names)
            stats, hashes, unreadable = collect(detector, files, classes, args.quiet)
        except BaseException:
            discard_unreferenced(args.model, new_memory)
            raise
        precision, backend, rule = detector.backend.precision, detector.backend.name, detector.rule
        if new_memory is not None:
            rule = FUSED
    check_counts(len(hashes), args.holdout, args.method, args.target_fpr)
    held = holdout_split(len(hashes), args.holdout, args.seed)
    provenance = {"method": args.method, "target_fpr": args.target_fpr, "images": int((~held).sum()),
                  "normal": os.path.abspath(args.normal),
                  "images_sha256": hashlib.sha256("".join(sorted(hashes)).encode()).hexdigest(),
                  "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    extra = {"tool": f"clipad-edge {__version__}", "unreadable": len(unreadable), "seed": args.seed}
    per_class = {detector.class_names[k]: calibrate_class(rule, stats[k], held, args.method, args.target_fpr,
                                                          provenance, extra) for k in classes}
    for cal in per_class.values():
        if new_memory is not None:
            cal.decision["rule"], cal.memory = FUSED, new_memory
    replaced: set[str] = set()

    def store(manifest: Manifest) -> None:
        for name, cal in per_class.items():
            old, _ = manifest.calibration(precision, backend)
            previous = old.classes.get(name) if old is not None and (old.precision, old.backend) == \
                (precision, backend) else None
            if previous is not None and previous.memory is not None:
                replaced.add(previous.memory["file"])
            manifest.set_class_calibration(precision, backend, name, cal)
        replaced.difference_update(manifest.memory_files())

    try:
        Manifest.update(args.model, store)
    except BaseException:
        discard_unreferenced(args.model, new_memory)
        raise
    remove_replaced(args.model, replaced)
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
