"""``edge-eval``: the accuracy of a deployed model (the backend and precision that run on the box) on a test set in
MVTec AD layout, and with ``--compare`` how far another precision or backend moves it."""
from __future__ import annotations

import argparse
import logging
import sys

from clipad.runtime import precisions
from clipad.runtime.backends import registry
from clipad.runtime.commands import add_model_options, open_detector, run_cli
from clipad.runtime.errors import ClipadError

EPILOG = """\
examples:
  edge-eval --model crane_l14 --data mvtec_ad --json crane.json --markdown crane.md --plots plots/
  edge-eval --model aa_tile --data ../shared/data --classes magnetic_tile --compare int8
  edge-eval --model aa_line3 --data line3_test --class-map parts=screw --backend tensorrt --precision fp16
  edge-eval --model crane_feat --data ../shared/data --fewshot 4      (an export made with --memory-features)

data: ROOT/<class>/test/<defect>/<stem>.<ext>, masks ROOT/<class>/ground_truth/<defect>/<stem>_mask.png
(0/255 masks: defect where > 127; 0/1 masks, whose maximum is 1, are read as such and counted); train/ is read
only by --fewshot. Each data class runs as the model class of the same name, or the model's only class, or as
--class-map DATA=MODEL says.

metrics, per class and their unweighted mean: image AUROC, AP, F1-max on the decision score (the calibrated one, or
for AA-CLIP without calibration the official per-class min-max over the test set); pixel AUROC, AP, F1-max and
AUPRO up to FPR 0.3 as the MVTec AD evaluation defines it, at the model's SxS (masks thresholded, then resized with
nearest neighbour), streamed so memory does not grow with the images; with calibration the OK/NG false-alarm and miss
rates. --compare runs every image through a second precision or backend too: metric deltas, per-image map Pearson,
score Spearman and the OK/NG agreement at each side's calibrated thresholds. --fewshot K adds a memory of K
images from each class's train/good (seeded; a train image whose content is also a test image is left out) and
reports zero-shot, few-shot (decided on its map maximum) and fused (docs/few-shot.md) side by side from one pass.
"""

log = logging.getLogger("clipad")


COMPARE_BACKENDS = tuple(b for b in registry.EDGE_CHOICES if b not in (registry.AUTO, registry.BEST))

def parse_args(argv):
    ap = argparse.ArgumentParser(prog="edge-eval", formatter_class=argparse.RawDescriptionHelpFormatter,
                                 description="Image and pixel metrics of a model exported by export-engine, as it "
                                             "runs on this machine.", epilog=EPILOG)
    add_model_options(ap)
    ap.add_argument("--data", required=True, metavar="ROOT", help="test set root in MVTec AD layout")
    ap.add_argument("--classes", nargs="+", metavar="NAME", help="data classes to evaluate (default: all)")
    ap.add_argument("--class-map", nargs="+", default=[], metavar="DATA=MODEL",
                    help="run data class DATA as the model's class MODEL")
    ap.add_argument("--compare", metavar="PRECISION_OR_BACKEND",
                    help=f"also run another precision ({', '.join(precisions.NAMES)}) on the same backend, or the same "
                         f"precision on another backend ({', '.join(COMPARE_BACKENDS)})")
    ap.add_argument("--fewshot", type=int, metavar="K", help="also a few-shot memory of K train/good images per "
                                                             "class: zero-shot, few-shot and fused side by side")
    ap.add_argument("--coreset", type=float, metavar="SHARE", help="--fewshot: keep this share of the memory's "
                                                                   "patches (PatchCore's greedy coreset)")
    ap.add_argument("--seed", type=int, default=0, help="--fewshot: seed of the memory draw (default 0)")
    ap.add_argument("--json", metavar="FILE", help="full report (per class, mean, every image)")
    ap.add_argument("--csv", metavar="FILE", help="the per-class table as CSV")
    ap.add_argument("--markdown", metavar="FILE", help="the tables as markdown (also printed)")
    ap.add_argument("--plots", metavar="DIR", help="ROC/PR curves, score histograms and worst cases as PNG")
    ap.add_argument("--save-maps", metavar="DIR", help="raw maps as DIR/<class>/<defect>/<stem>.npy (with --fewshot "
                    "also <stem>.fewshot.npy and <stem>.fused.npy)")
    ap.add_argument("-q", "--quiet", action="store_true", help="no progress bar; only the table")
    return ap.parse_args(argv)


def class_map(testset, model_classes: list[str], pairs: list[str]) -> dict[str, str]:
    explicit = {}
    for pair in pairs:
        data, sep, model = pair.partition("=")
        if not sep or model not in model_classes:
            raise ClipadError(f"--class-map {pair}: expected DATA=MODEL with MODEL one of {', '.join(model_classes)}")
        explicit[data] = model
    out = {}
    for cls in testset.classes:
        if cls in explicit:
            out[cls] = explicit[cls]
        elif cls in model_classes:
            out[cls] = cls
        elif len(model_classes) == 1:
            out[cls] = model_classes[0]
        else:
            raise ClipadError(f"data class {cls!r} is not a class of this model ({', '.join(model_classes)}); "
                              f"map it with --class-map {cls}=MODEL_CLASS")
    return out


COMPARE_CHOICES = (*precisions.NAMES, *COMPARE_BACKENDS)


def _second(args, detector):
    """The Detector that --compare asks for: another precision on the same backend, or the same precision on
    another backend."""
    from clipad.runtime.detector import Detector

    if args.compare in precisions.PRECISIONS:
        backend, precision = detector.backend.name, args.compare
    else:
        backend, precision = args.compare, detector.backend.precision
    spec = registry.get(backend)
    options = {k: v for k, v in dict(threads=args.threads, device=args.device, precision=precision).items()
               if k in spec.options}
    return Detector.open(args.model, backend=backend, **options)


def fewshot_options(args):
    """The --fewshot options, checked before anything runs; None without --fewshot."""
    from clipad.calibration.memory import check_coreset, check_images

    from .fewshot_eval import FewShotEval

    if args.fewshot is None:
        if args.coreset is not None:
            raise ClipadError("--coreset thins a few-shot memory: give --fewshot K too")
        return None
    check_images(args.fewshot, "--fewshot")
    if args.compare is not None:
        raise ClipadError("--fewshot and --compare: give one (each compares side by side)")
    check_coreset(args.coreset)
    return FewShotEval(args.fewshot, args.coreset, args.seed, args.data, quiet=args.quiet)


def run(args) -> int:
    from tqdm import tqdm

    from clipad.runtime.atomic import write_bytes_atomic, write_json_atomic
    from clipad.runtime.files import probe_file, probe_folder, refuse_reports_over
    from clipad.runtime.schema import dump

    from . import report as reports
    from .dataset import scan
    from .evaluate import evaluate

    if args.compare is not None and args.compare not in COMPARE_CHOICES:
        raise ClipadError(f"--compare {args.compare}: give a precision or a backend ({', '.join(COMPARE_CHOICES)})")
    fewshot = fewshot_options(args)
    testset = scan(args.data, args.classes)
    reports_given = {"--json": args.json, "--csv": args.csv, "--markdown": args.markdown}
    refuse_reports_over(reports_given, args.model,
                        [p for samples in testset.classes.values() for s in samples for p in (s.path, s.mask_path)
                         if p])
    for flag, path in reports_given.items():   # every report path is checked before the first image runs
        probe_file(path, flag)
    for flag, folder in (("--plots", args.plots), ("--save-maps", args.save_maps)):
        if folder:
            probe_folder(folder, flag)
    if args.plots:
        reports.check_plotting()
    detector = open_detector(args, memory=fewshot is None)
    other = None
    try:
        if fewshot is not None:
            fewshot.open(detector)
            fewshot.choose(testset)
        mapping = class_map(testset, detector.class_names, args.class_map)
        other = _second(args, detector) if args.compare else None
        total = sum(len(v) for v in testset.classes.values())
        if not args.quiet:
            warning = detector.policy.take_warning()
            if warning:
                log.warning("WARNING: %s", warning)
            log.info("evaluating %s on %s: %d image(s) in %d class(es)%s", args.model, detector.backend.description,
                     total, len(testset.classes), f"; compared with {other.backend.description}" if other else "")
        with tqdm(total=total, unit="img", disable=args.quiet, file=sys.stderr, dynamic_ncols=True) as bar:
            result = evaluate(detector, testset, mapping, other, args.save_maps, bar.update, fewshot)
        result.update(model=args.model, backend=detector.backend.description, precision=detector.backend.precision,
                      random_weights=bool(detector.manifest.model.random_init), class_map=mapping)
        if result["random_weights"]:
            result["note"] = ("the manifest says this model has RANDOM weights: these numbers measure how faithfully "
                              "the deployment reproduces the reference model, not detection quality")
        if other is not None:
            result["compare"]["candidate"] = other.backend.description
        if not result["classes"]:
            raise ClipadError("no class could be evaluated (every image unreadable?)")
        if args.plots:
            reports.plots(args.plots, result, detector)
    finally:
        detector.close()
        if other is not None:
            other.close()
    text = reports.markdown(result)
    print(text)
    if args.json:
        write_json_atomic(args.json, dump(result))
    if args.csv:
        reports.write_csv(args.csv, result)
    if args.markdown:
        write_bytes_atomic(args.markdown, text.encode())
    return 0


def main(argv=None) -> int:
    args = parse_args(argv)
    return run_cli("edge-eval", lambda: run(args), args.quiet, "interrupted; no report written")


if __name__ == "__main__":
    sys.exit(main())
